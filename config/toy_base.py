# Toy stage 0, the visual base. There is no pretrained toy visual LLM (the 7B model starts from LLaVA-OneVision), so
# one is trained here from the toy language model (config/toy_text.py), as LLaVA-OneVision was from Qwen2: the LLM,
# the projector and the newline embedding learn to describe single images and videos (what changes from frame to
# frame, in order). The frozen encoders are the toy's pretrained ones, loaded with the language model.
init_from = "out/toy/text/final"
lora_r = 0
trainable = ("llm.", "projector.", "image_newline")
use_audio = False
train_data = ("data/toyav/base_train.jsonl," * 3 + "data/toyav/image_train.jsonl,"  # videos three times, single
              "data/toyav/copy_train.jsonl,data/toyav/text_train.jsonl")  # images, and the text stage's items: without
# them the tiny LLM forgets in a few hundred steps what the frozen LLM of audio alignment needs (copying, the sound
# sentences) and what SFT builds on (the speech sentences, reading a question)
val_data = "data/toyav/base_val.jsonl"
tasks = ("caption", "image", "text")
batch_size = 16
steps = 1000
lr = 2e-3
warmup_ratio = 0.05
out_dir = "out/toy/base"
cache_dir = "out/toy/cache"
log_every = 50
eval_every = 0
ckpt_every = 200
