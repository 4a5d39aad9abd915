# Toy audio-visual SFT: LoRA on captions and QA. The paper trains the aligner here too; the toy keeps it
# as aligned, since trained at the toy's learning rate its snapped tokens leave their words (speech stated: 0 % against
# 36-46 % with it kept; dev/LOG.md, session 7).
init_from = "out/toy/align/final"
train_data = "data/toyav/train.jsonl"
val_data = "data/toyav/val.jsonl"
tasks = ("caption", "qa")
lora_r = 8  # 1/16 of the toy width (the 7B's 128 is 1/28 of 3,584)
# every linear of the LLM, where the release adapts q, k, v: on q, k, v alone the toy SFT never answers a question in
# the answer sentence (0 of 100 test questions; 75 of 100 right with every linear: dev/LOG.md, session 10)
lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
lora_alpha = 16  # scale 2.0, as released
lora_dropout = 0.05
trainable = ("lora_",)
batch_size = 16
steps = 400
lr = 2e-3
warmup_ratio = 0.05
out_dir = "out/toy/sft"
cache_dir = "out/toy/cache"
log_every = 25
eval_every = 0
ckpt_every = 100
