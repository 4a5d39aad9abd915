# Toy audio alignment: only the audio aligner trains, on toy speech (ASR) and sound descriptions. Two toy-only aids
# (not in the paper; dev/LOG.md, sessions 5-7): the anchor (training.py's anchor: CTC of each item's written soundtrack
# over the aligner's tokens scored against the frozen LLM's embeddings), without which the tiny LLM's gradient
# collapses the tokens onto one direction; and the snap (model.snap), which hands the LLM each token's nearest word,
# since the tiny LLM reads its own embeddings and little between them.
init_from = "out/toy/base/final"
train_data = "data/toyav/align_train.jsonl"
val_data = "data/toyav/align_val.jsonl"
anchor = 1.0
anchor_sounds = True  # the sound descriptions' kinds too ("low tone"), as the base read them
snap_audio = True
batch_size = 16
steps = 600
lr = 1e-3
warmup_ratio = 0.05
out_dir = "out/toy/align"
cache_dir = "out/toy/cache"
log_every = 25
eval_every = 0
ckpt_every = 100
