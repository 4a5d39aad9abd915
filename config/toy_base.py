# Toy stage 0, the base, from the LLM that learned to see (config/toy_vision.py), then to copy (config/toy_copy.py).
# It learns what a real base LLM brings to alignment and SFT and a tiny one trained in minutes lacks: to read words
# placed among the visual tokens. Its clips and alignment items hear their soundtrack written in words where the
# aligner's tokens will go (training.py's written_audio: each utterance's words and each sound's kind, one token to a
# 0.5 s window), and every clip with audio comes with soundtracks drawn again (data/toyav/written_*.jsonl), so that what
# is heard has to be read rather than recalled from the picture. The visual captions stay in the mix: it goes on
# learning to see. Not in the paper, whose LLM reads already (dev/LOG.md, sessions 6-7).
init_from = "out/toy/copy/final"
lora_r = 0
trainable = ("llm.", "projector.", "image_newline")
use_audio = True
written_audio = True
time_aligned = True  # each frame its own second's two audio tokens: 4-12 s clips in 4 s segments, spread evenly as
# released, would repeat and pad tokens between the words the toy LLM reads in order (dev/LOG.md, session 6)
train_data = ("data/toyav/written_train.jsonl," * 2 + "data/toyav/base_train.jsonl,data/toyav/align_train.jsonl")
val_data = "data/toyav/written_val.jsonl"
tasks = ("caption", "asr", "audio_caption")
batch_size = 16  # 1,500 steps of 16 read the utterances' words that 1,000 of 32 did not, in two thirds of the time
steps = 2000  # 1,500 read the written sounds in one run (98 %) and half of them in the next, which differed by
# rounding only; 2,000 in that second run: 62 % (dev/LOG.md, session 8)
lr = 2e-3
warmup_ratio = 0.05
out_dir = "out/toy/base"
cache_dir = "out/toy/cache"
log_every = 50
eval_every = 0
ckpt_every = 250
