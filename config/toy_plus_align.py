# Toy video-SALMONN 2+ audio alignment: only the Q-Former, q_tokens and audio_proj train (--train_qformer).
init_from = "out/toy_plus/base/final"
train_data = "data/toyav/align_train.jsonl"
val_data = "data/toyav/align_val.jsonl"
trainable = ("audio.qformer.", "audio.q_tokens", "audio.audio_proj.")
fps = 2.0
max_frames = 40
batch_size = 8
steps = 300
lr = 2e-3
warmup_ratio = 0.05
out_dir = "out/toy_plus/align"
cache_dir = "out/toy_plus/cache"
log_every = 25
eval_every = 0
ckpt_every = 100
