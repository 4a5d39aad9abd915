# video-SALMONN 2+ 72B, MrDPO (the authors' README, step 5: --train_type gdpo, LoRA 128 / 256, lr 5e-6,
# 1 epoch a round, --train_qformer --train_proj), on 8 nodes of 8 GPUs (the authors' test_8.sh runs 72B on 8 GPUs with ZeRO-3). Each round: 2 captions sampled per video (top_p
# 0.9, up to 1,024 tokens), judged against the atomic events, pairs kept by Table 6, gDPO (beta 0.1, CE 0.1)
# on a fresh LoRA proxy merged at the next round's start. The 2+ round count is not published: the paper's 6.
init_from = "out/vs2plus_72b/sft/final"
train_data = "manifests/mrdpo_train.jsonl"
val_data = "manifests/mrdpo_val.jsonl"
test_data = "manifests/caption_test.jsonl"
judge = "llm"
rounds = 6
steps_per_round = 1000  # 1 epoch of the round's pairs on 64 GPUs (--epoch 1); set it for your data
round_lrs = (5e-6,)  # every round
beta = 0.1
ce_weight = 0.1
samples_per_video = 2
top_p = 0.9
temperature = 1.0
max_new_tokens = 1024
lora_r = 128
lora_alpha = 256
trainable = ("lora_", "visual.merger.", "audio.qformer.", "audio.q_tokens", "audio.audio_proj.")
batch_size = 1
val_items = 200
fps = 10.0  # --interval 0.1
max_frames = 768  # --max_frames 768 (--max_pixels 61250 and min_frames 64 are in the model's config)
warmup_ratio = 0.03
weight_decay = 0.0
grad_clip = 1.0
activation_checkpointing = True
seed = 2025
out_dir = "out/vs2plus_72b/mrdpo"
cache_dir = "out/vs2plus_72b/cache"
results = "out/vs2plus_72b/results.json"
log_every = 10
ckpt_every = 200  # --save_steps 200
