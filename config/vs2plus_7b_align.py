# video-SALMONN 2+ 7B, audio alignment (the authors' README, step 3, and scripts/train.sh), on one 8-GPU node:
# the base is Qwen2.5-VL-7B-Instruct with Whisper-large-v3's encoder copied into audio.* and a fresh Q-Former
# (scripts/gen_audio_model.py); only the Q-Former, q_tokens and audio_proj train (--train_qformer).
# Data (issue #9): LibriSpeech-960h, AudioCaps, CommonVoice, WavCaps ("Please transcribe the speech." /
# "Please describe the audio.").
qwen_vl = "checkpoints/Qwen2.5-VL-7B-Instruct"
whisper = "checkpoints/whisper-large-v3"
train_data = "manifests/align_train.jsonl"
val_data = "manifests/align_val.jsonl"
tasks = ("asr", "audio_caption")
lora_r = 0
trainable = ("audio.qformer.", "audio.q_tokens", "audio.audio_proj.")
batch_size = 16  # --bs 16 per GPU
steps = 20000  # 5 epochs (--epoch 5): 5 x items / (16 x 8 GPUs); set it for your manifest, the authors' size is not public
lr = 2e-5
fps = 10.0  # --interval 0.1
max_frames = 768  # --max_frames 768 (--max_pixels 61250 and min_frames 64 are in the model's config)
warmup_ratio = 0.03
weight_decay = 0.0
grad_clip = 1.0
activation_checkpointing = True
seed = 2025
out_dir = "out/vs2plus_7b/align"
cache_dir = "out/vs2plus_7b/cache"
log_every = 10
eval_every = 1000
ckpt_every = 1000
