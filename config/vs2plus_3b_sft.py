# video-SALMONN 2+ 3B, audio-visual SFT (the authors' README, step 4), on one 8-GPU node: LoRA r 128 /
# alpha 256 on q, k, v plus the merger, the Q-Former, q_tokens and audio_proj (--use_lora --train_qformer --train_proj).
init_from = "out/vs2plus_3b/align/final"
train_data = "manifests/sft_train.jsonl"
val_data = "manifests/sft_val.jsonl"
tasks = ("caption", "qa")
lora_r = 128
lora_alpha = 256
lora_dropout = 0.05
trainable = ("lora_", "visual.merger.", "audio.qformer.", "audio.q_tokens", "audio.audio_proj.")
batch_size = 1
steps = 15000  # 5 epochs (--epoch 5): 5 x items / 8 GPUs; set it for your manifest
lr = 2e-5
fps = 10.0  # --interval 0.1
max_frames = 768  # --max_frames 768 (--max_pixels 61250 and min_frames 64 are in the model's config)
warmup_ratio = 0.03
weight_decay = 0.0
grad_clip = 1.0
activation_checkpointing = True
seed = 2025
out_dir = "out/vs2plus_3b/sft"
cache_dir = "out/vs2plus_3b/cache"
log_every = 10
eval_every = 1000
ckpt_every = 2000  # --save_steps 2000
