# video-SALMONN 2+ 3B, audio alignment (the authors' README, step 3, and scripts/train.sh), on one 8-GPU node:
# the base is Qwen2.5-VL-3B-Instruct with Whisper-large-v3's encoder copied into audio.* and a fresh Q-Former
# (scripts/gen_audio_model.py); only the Q-Former, q_tokens and audio_proj train (--train_qformer).
# Data (issue #9): LibriSpeech-960h, AudioCaps, CommonVoice, WavCaps ("Please transcribe the speech." /
# "Please describe the audio.").
from config.vs2plus_7b_align import *  # noqa: F401,F403  the 7B settings; what differs at 3B follows

qwen_vl = "checkpoints/Qwen2.5-VL-3B-Instruct"
out_dir = "out/vs2plus_3b/align"
cache_dir = "out/vs2plus_3b/cache"
