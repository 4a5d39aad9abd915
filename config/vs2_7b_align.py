# video-SALMONN 2 7B, audio alignment (paper 3.2 and 4.2; Table 1: 32 x H800, batch 8 per GPU,
# 30,000 updates, 3 hours). LibriSpeech-960h for ASR and AudioCaps for audio captioning.
llava = "checkpoints/llava-onevision-qwen2-7b-ov"  # lmms-lab or llava-hf layout
whisper = "checkpoints/whisper-large-v3"
train_data = "manifests/align_train.jsonl"
val_data = "manifests/align_val.jsonl"
batch_size = 8
steps = 30000
lr = 2e-5  # AdamW, weight decay 0, warmup 3 %, cosine (released run.sh)
warmup_ratio = 0.03
weight_decay = 0.0
grad_clip = 1.0
activation_checkpointing = True
out_dir = "out/vs2_7b/align"
cache_dir = "out/vs2_7b/cache"
log_every = 10
eval_every = 1000
ckpt_every = 1000
