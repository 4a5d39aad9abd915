# Toy stage -1b, copying: the LLM that learned to see (config/toy_vision.py) learns to say again the toy words it is
# shown, by content, among runs of blanks (an utterance reaches the LLM as a few word tokens among the audio tokens of
# silence), which a real base LLM does from its text pretraining. Copying alone, the LLM forgets some of its seeing;
# config/toy_base.py brings it back. Copying learned beside seeing is learned far slower: this stage copies all 50
# held-out blank copies in 1,500 steps, the two mixed 4 of 50 in 800 (dev/LOG.md).
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
