# video-SALMONN 2 7B, MrDPO (paper 3.3 and 4.2; Table 1: rounds 1-5 on 8 x H800, batch 1 per GPU, 1,000
# updates, 2 hours each; round 6 on 32 GPUs, 841 updates). Each round samples 2 captions per training video
# (top_p 0.9, up to 1,024 tokens, as released), has the LLM judge rate them against the video's atomic events,
# keeps the pairs of Table 6 and trains the gDPO loss (beta 0.1, lambda 0.1) on a fresh LoRA proxy.
init_from = "out/vs2_7b/sft/final"  # the AV SFT model, its LoRA merged
train_data = "manifests/mrdpo_train.jsonl"  # caption items with atomic events (and QA items for round 6)
val_data = "manifests/mrdpo_val.jsonl"  # per-round validation captions with atomic events
test_data = "manifests/caption_test.jsonl"  # the released caption test set (per round, one judge seed)
judge = "llm"  # judge.JudgeClient: OPENAI_BASE_URL, OPENAI_API_KEY, JUDGE_MODEL
rounds = 6
steps_per_round = 1000
round_lrs = (2e-5, 2e-5, 1e-5, 2e-6, 2e-6, 2e-6)
beta = 0.1
ce_weight = 0.1
samples_per_video = 2
top_p = 0.9
temperature = 1.0
max_new_tokens = 1024
lora_r = 128
lora_alpha = 256
batch_size = 1
val_items = 200
fps = 1.0
max_frames = 110
out_dir = "out/vs2_7b/mrdpo"
cache_dir = "out/vs2_7b/cache"
results = "out/vs2_7b/results.json"
log_every = 10
ckpt_every = 100
activation_checkpointing = True
