# Toy stage 0, the visual base. There is no pretrained toy visual LLM (the 7B model starts from
# LLaVA-OneVision), so one is trained here: the LLM, the projector and the newline embedding learn to
# describe the frames. The tower and Whisper keep their random weights (frozen, as in every stage).
init_from = "scratch"
tokenizer = "data/toyav/tokenizer.json"
arch = dict(  # every class as in the 7B model, tiny; vocab_size is taken from the tokenizer
    llm=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=True),
    vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                image_size=64, patch_size=8),  # an 8 x 8 patch grid, max-pooled to 4 x 4 (+4 newlines)
    whisper=dict(num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4,
                 encoder_ffn_dim=128, max_source_positions=200),  # 4 s segments (400 mel frames)
    qformer=dict(encoder_width=64, hidden=64, heads=4, intermediate=128, window=10,
                 frames_per_segment=200, llm_dim=128),  # 0.2 s windows: 20 tokens per 4 s segment
    pool=2, segment_seconds=4.0, time_aligned=False)
lora_r = 0
trainable = ("llm.", "projector.", "image_newline")
use_audio = False
train_data = "data/toyav/base_train.jsonl,data/toyav/text_train.jsonl"  # frames -> visual captions, and
# text-only items (a text, then an instruction to say it): the language skills a real base LLM already has
val_data = "data/toyav/base_val.jsonl"
tasks = ("caption", "text")
batch_size = 8
steps = 300
lr = 2e-3
warmup_ratio = 0.05
out_dir = "out/toy/base"
cache_dir = "out/toy/cache"
log_every = 25
eval_every = 0
ckpt_every = 100
