# Toy stage 0, copying: the LLM that learned to see (config/toy_vision.py) learns what a real base LLM brings to audio
# alignment, which freezes it: to say again the toy words it is shown, by content, among runs of blanks (an
# utterance reaches the LLM as a few word tokens among the audio tokens of silence). Copying alone, the LLM forgets
# how to see; config/toy_base.py brings that back. Copying learned beside seeing is learned far slower: this stage
# copies all 50 held-out blank copies in 1,500 steps, the two mixed 4 of 50 in 800 (dev/LOG.md).
init_from = "out/toy/vision/final"
lora_r = 0
trainable = ("llm.",)
use_audio = False
train_data = "data/toyav/copy_train.jsonl"
val_data = "data/toyav/copy_val.jsonl"
tasks = ("text",)
batch_size = 32
steps = 1500
lr = 2e-3
warmup_ratio = 0.05
out_dir = "out/toy/copy"
cache_dir = "out/toy/cache"
log_every = 50
eval_every = 0
ckpt_every = 0
