# Toy stage -1, the LLM from scratch, learning the toy language by describing videos. The 7B model's LLM (Qwen2)
# comes pretrained on text and its visual base (LLaVA-OneVision) from it; the toy's LLM learns to see first, and to copy
# and read after (config/toy_copy.py, config/toy_base.py): a 4-layer LLM trained on copying first learned to describe
# videos far slower (51 % of visual events stated exactly after 500 steps, against 75 % from scratch; dev/LOG.md).
init_from = "scratch"
tokenizer = "data/toyav/tokenizer.json"
encoders = "out/toy/encoders.safetensors"  # the toy's pretrained SigLIP and Whisper (data/toyav/pretrain_encoders.py)
arch = dict(  # every class as in the 7B model, tiny; vocab_size is taken from the tokenizer
    llm=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=True),
    vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                image_size=64, patch_size=16),  # a 4 x 4 patch grid, max-pooled to 2 x 2 (+2 newlines): 6 tokens a frame
    whisper=dict(num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4,
                 encoder_ffn_dim=128, max_source_positions=200),  # 4 s segments (400 mel frames)
    qformer=dict(encoder_width=64, hidden=64, heads=4, intermediate=128, window=25,
                 frames_per_segment=200, llm_dim=128),  # 0.5 s windows, as released: 8 tokens per 4 s segment
    pool=2, segment_seconds=4.0, time_aligned=False)
lora_r = 0
use_audio = False
trainable = ("llm.", "projector.", "image_newline")
train_data = "data/toyav/base_train.jsonl"
val_data = "data/toyav/base_val.jsonl"
tasks = ("caption",)
batch_size = 16
steps = 500
lr = 2e-3
warmup_ratio = 0.05
out_dir = "out/toy/vision"
cache_dir = "out/toy/cache"
log_every = 50
eval_every = 0
ckpt_every = 0
