# video-SALMONN 2+ 72B, MrDPO (the authors' README, step 5: --train_type gdpo, LoRA 128 / 256, lr 5e-6,
# 1 epoch a round, --train_qformer --train_proj), on 8 nodes of 8 GPUs (the authors' test_8.sh runs 72B on 8 GPUs with ZeRO-3). Each round: 2 captions sampled per video (top_p
# 0.9, up to 1,024 tokens), judged against the atomic events, pairs kept by Table 6, gDPO (beta 0.1, CE 0.1)
# on a fresh LoRA proxy merged at the next round's start. The 2+ round count is not published: the paper's 6.
from config.vs2plus_7b_mrdpo import *  # noqa: F401,F403  the 7B settings; what differs at 72B follows

init_from = "out/vs2plus_72b/sft/final"
out_dir = "out/vs2plus_72b/mrdpo"
cache_dir = "out/vs2plus_72b/cache"
results = "out/vs2plus_72b/results.json"
