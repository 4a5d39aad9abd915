# Toy audio alignment: only the audio aligner trains, on toy speech (ASR) and sound descriptions, with each item's
# tokens anchored to the frozen LLM's embeddings of its written soundtrack (training.py's anchor: its words, or its
# sounds' kinds), the words the visual base learned to read there. Not in the paper: a 7B LLM reads whatever vectors
# its aligner learns to give it; an aligner trained through the tiny toy LLM alone collapses (dev/LOG.md).
init_from = "out/toy/base/final"
train_data = "data/toyav/align_train.jsonl"
val_data = "data/toyav/align_val.jsonl"
anchor = 1.0
anchor_sounds = True
batch_size = 16
steps = 600
lr = 1e-3
warmup_ratio = 0.05
out_dir = "out/toy/align"
cache_dir = "out/toy/cache"
log_every = 25
eval_every = 0
ckpt_every = 100
