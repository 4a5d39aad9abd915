# Toy video-SALMONN 2+, stage 0: the visual base. The real 2+ starts from Qwen2.5-VL-Instruct, a visual LLM;
# there is no toy one, so one is trained here: the LLM and the ViT's merger learn to describe the frames. The
# ViT blocks and Whisper keep their random weights (frozen, as in every stage).
init_from = "scratch"
tokenizer = "data/toyav/tokenizer.json"  # the 2+ special tokens (<|vision_start|>, <|video_pad|>, ...) are added
arch = dict(  # every class as in the 2+ 7B model, tiny; vocab_size is the tokenizer's
    llm=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             rope_theta=10000.0, tie_word_embeddings=True, mrope_section=(4, 6, 6)),  # 16 rotary pairs: time, rows, columns
    vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128, window_size=56,
                fullatt_block_indexes=(1,)),  # 64 px frames -> 56 x 56: a 4 x 4 patch grid, 2 x 2 tokens per 2 frames
    whisper=dict(num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                 max_source_positions=1500),  # the authors' 30 s chunks
    qformer=dict(encoder_width=64, hidden=64, heads=4, intermediate=128, layers=2, window=25, frames_per_segment=1500,
                 llm_dim=128, final_linear=False),  # 0.5 s windows: 60 tokens per 30 s, as released
    tokens={}, min_frames=4, max_pixels=3136, min_pixels=784)
fps = 2.0  # the toy clips hold every visual state 2 s: one 2-frame grid a second
max_frames = 40  # 20 s, the longest toy clip
lora_r = 0
trainable = ("llm.", "visual.merger.")
use_audio = False
train_data = "data/toyav/base_train.jsonl,data/toyav/text_train.jsonl"
val_data = "data/toyav/base_val.jsonl"
tasks = ("caption", "text")
batch_size = 8
steps = 300
lr = 2e-3
warmup_ratio = 0.05
out_dir = "out/toy_plus/base"
cache_dir = "out/toy_plus/cache"
log_every = 25
eval_every = 0
ckpt_every = 100
