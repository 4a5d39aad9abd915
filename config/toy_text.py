# Toy stage -1, the language model. The 7B model's LLM (Qwen2) comes pretrained on text; the toy's is trained here
# from scratch on text-only items: words of the toy language among blanks, transcripts, sound descriptions and
# captions, each followed by an instruction to say it again (the copying every real LLM does, which audio alignment
# needs: a frozen LLM that cannot copy cannot say a transcript however well the aligner hears it; and every sentence
# the captions use), and a caption followed by one of its questions (reading).
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
trainable = ("llm.",)
use_audio = False
train_data = "data/toyav/copy_train.jsonl,data/toyav/text_train.jsonl"
val_data = "data/toyav/copy_val.jsonl"
tasks = ("text",)
batch_size = 32
steps = 800
lr = 3e-3
warmup_ratio = 0.05
out_dir = "out/toy/text"
cache_dir = "out/toy/cache"
log_every = 50
eval_every = 0
ckpt_every = 0
