# Toy audio alignment: only the audio aligner trains, on toy speech (ASR) and sound descriptions.
init_from = "out/toy/base/final"
train_data = "data/toyav/align_train.jsonl"
val_data = "data/toyav/align_val.jsonl"
batch_size = 16
steps = 400
lr = 1e-3
warmup_ratio = 0.05
out_dir = "out/toy/align"
cache_dir = "out/toy/cache"
log_every = 25
eval_every = 0
ckpt_every = 100
