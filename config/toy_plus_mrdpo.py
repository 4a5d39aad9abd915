# Toy video-SALMONN 2+ MrDPO: config/toy_mrdpo.py's rounds on the toy 2+ SFT model; the proxy LoRA, the merger
# and the Q-Former train (--train_qformer --train_proj, as released).
init_from = "out/toy_plus/sft/final"
rounds = 6
steps_per_round = 40
round_lrs = (5e-4, 5e-4, 2.5e-4, 5e-5, 5e-5, 5e-5)
lora_r = 16
lora_alpha = 32
trainable = ("lora_", "visual.merger.", "audio.qformer.", "audio.q_tokens", "audio.audio_proj.")
fps = 2.0
max_frames = 40
batch_size = 8
max_new_tokens = 120
videos_per_round = 160
val_items = 20
log_every = 10
ckpt_every = 20
out_dir = "out/toy_plus/mrdpo"
cache_dir = "out/toy_plus/cache"
results = "out/toy_plus/results.json"
