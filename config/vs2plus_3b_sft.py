# video-SALMONN 2+ 3B, audio-visual SFT (the authors' README, step 4), on one 8-GPU node: LoRA r 128 /
# alpha 256 on q, k, v plus the merger, the Q-Former, q_tokens and audio_proj (--use_lora --train_qformer --train_proj).
from config.vs2plus_7b_sft import *  # noqa: F401,F403  the 7B settings; what differs at 3B follows

init_from = "out/vs2plus_3b/align/final"
out_dir = "out/vs2plus_3b/sft"
cache_dir = "out/vs2plus_3b/cache"
