# Toy stage 0, the visual base, from the LLM that learned to see (config/toy_vision.py): it goes on describing videos
# while it learns what a real base LLM brings to audio alignment, which freezes it: to copy words by content (random
# toy words among runs of blanks, to say again) and to say every transcript and sound description of the alignment
# items (each written out, to say again). The videos stay in the mix and it goes on learning to see (visual events
# stated: 75 % after the vision stage, 84.5 % after this one), but it copies poorly (8 % of held-out blank copies exact
# after 800 steps; dev/LOG.md).
init_from = "out/toy/vision/final"
lora_r = 0
trainable = ("llm.", "projector.", "image_newline")
use_audio = False
train_data = "data/toyav/copy_train.jsonl" + ",data/toyav/base_train.jsonl" * 2
val_data = "data/toyav/copy_val.jsonl"
tasks = ("caption", "text")
batch_size = 32
steps = 800
lr = 2e-3
warmup_ratio = 0.05
out_dir = "out/toy/base"
cache_dir = "out/toy/cache"
log_every = 50
eval_every = 0
ckpt_every = 200
