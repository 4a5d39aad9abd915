# video-SALMONN 2+ 72B, audio-visual SFT (the authors' README, step 4), on 8 nodes of 8 GPUs (the authors' test_8.sh runs 72B on 8 GPUs with ZeRO-3): LoRA r 128 /
# alpha 256 on q, k, v plus the merger, the Q-Former, q_tokens and audio_proj (--use_lora --train_qformer --train_proj).
from config.vs2plus_7b_sft import *  # noqa: F401,F403  the 7B settings; what differs at 72B follows

init_from = "out/vs2plus_72b/align/final"
out_dir = "out/vs2plus_72b/sft"
cache_dir = "out/vs2plus_72b/cache"
