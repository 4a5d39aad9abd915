# video-SALMONN 2 7B, audio-visual SFT (paper 3.2 and 4.2; Table 1: 32 x H800, batch 1 per GPU,
# 15,475 updates, 14 hours) on ~13k audio-rich videos (LLaVA-Video-178K, FineVideo): captions and QA.
init_from = "out/vs2_7b/align/final"
train_data = "manifests/sft_train.jsonl"
val_data = "manifests/sft_val.jsonl"
tasks = ("caption", "qa")
lora_r = 128  # released: r 128, alpha 256 (scale 2.0), dropout 0.05, on q, k, v only
lora_alpha = 256
lora_dropout = 0.05
trainable = ("lora_", "audio.speech_Qformer.", "audio.speech_query_tokens", "audio.final_linear.",
             "projector.", "image_newline")  # the released trainable set (speech_llama_proj and ln_speech stay)
fps = 1.0
max_frames = 110  # about 20,000 video tokens
batch_size = 1
steps = 15475
lr = 2e-5
warmup_ratio = 0.03
weight_decay = 0.0
grad_clip = 1.0
activation_checkpointing = True
out_dir = "out/vs2_7b/sft"
cache_dir = "out/vs2_7b/cache"
log_every = 10
eval_every = 1000
ckpt_every = 500
