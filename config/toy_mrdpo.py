# Toy MrDPO: the paper's rounds on the toy SFT model, with the exact toy judge. Learning rates keep the
# paper's schedule shape (2e-5, 2e-5, 1e-5, then 2e-6), scaled up by 25 (the toy SFT's is 100x the paper's).
init_from = "out/toy/sft/final"
rounds = 6
steps_per_round = 60
round_lrs = (5e-4, 5e-4, 2.5e-4, 5e-5, 5e-5, 5e-5)
lora_r = 4  # 1/32 of the toy width, as the paper's 128 is 1/28 of 3,584: each round's proxy is a small subspace
lora_alpha = 8  # scale 2.0, as released
batch_size = 8
max_new_tokens = 120
videos_per_round = 160  # half the training videos a round, to stay within make toy's time
sample_batch = 32  # the toy's captions decode faster 32 at a time than the CPU default's 8 (a round 24 s against 28),
# and the same: each row draws what it draws alone (engine.py)
val_items = 20
log_every = 10
ckpt_every = 20
out_dir = "out/toy/mrdpo"
cache_dir = "out/toy/cache"
