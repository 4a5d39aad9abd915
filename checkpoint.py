"""
Every checkpoint layout video-SALMONN 2 meets, side by side: the key maps, the config readers and the loaders.

- Hugging Face Qwen2ForCausalLM, and the LLM inside either LLaVA-OneVision layout (lmms-lab original, llava-hf)
- Whisper (WhisperForConditionalGeneration / WhisperModel: the encoder only)
- SigLIP (SiglipVisionModel, SiglipModel, either LLaVA-OneVision layout)
- the released video-SALMONN 2 layout (tsinghua-ee/video-SALMONN-2; ours write it too, with their full config)
- export: the LLM alone as a Hugging Face Qwen2ForCausalLM

Models are built on the meta device and the safetensors tensors assigned in place, so a 7B model is never
held twice; a checkpoint that does not fit, or a file that is missing or cut short (a download that stopped),
fails with a CheckpointError naming the file and the missing, unexpected or misshapen keys.
"""
import json
import os
from dataclasses import fields, is_dataclass

import torch
import torch.nn as nn
from safetensors import safe_open

from config import UserError, of_type
from encoders import Qwen25VisionConfig, SiglipVision, SiglipVisionConfig, WhisperConfig, WhisperEncoder
from model import AVConfig, Qwen2, Qwen2Config
from qformer import AudioAligner, QFormerConfig, qformer_plus_config

# google/siglip-so400m-patch14-384, whose config the original LLaVA-OneVision layout does not carry
SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                     image_size=384, patch_size=14)
# openai/whisper-large-v3's encoder, whose config the released checkpoint does not carry
WHISPER_LARGE_V3 = dict(num_mel_bins=128, d_model=1280, encoder_layers=32, encoder_attention_heads=20,
                        encoder_ffn_dim=5120, max_source_positions=1500)

# buffers that Hugging Face's save_pretrained writes but that are no parameters (the authors' Q-Former carries
# speech_Qformer.bert.embeddings.position_ids, an arange): a checkpoint key ending in one of these names is ignored
NON_PARAMETER_BUFFERS = ("position_ids",)
# the released demo prompt (scripts/demo_data.yaml): caption.py's for a checkpoint that does not say its own
DEMO_PROMPT = ("Give a detailed account of everything in the video, capturing all the specifics. While doing so, "
               "also include as much information from the audio as possible, ensuring that the descriptions of "
               "audio and video are well-synchronized.")


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, unreadable (a half-downloaded file) or does not fit the model; names the file."""


# -----------------------------------------------------------------------------
# the machinery: configs, safetensors files, renaming


def read_config(path):
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise CheckpointError(f"{path}: no config.json (expected a checkpoint directory)" if os.path.isdir(path)
                              else f"{path}: no such checkpoint directory")
    return read_json_object(file)


def read_json_object(file):
    """A JSON file that must hold an object (config.json, train_config.json, meta.json): one cut short, or holding a
    list, is named in one line rather than failing later in the first .get()."""
    try:
        with open(file) as f:
            d = json.load(f)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{file}: not a JSON object ({e})") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{file}: not a JSON object (a {type(d).__name__})")
    return d


def train_config(path):
    """The settings a checkpoint was trained with (train_config.json, as our training scripts write it); {} for a
    checkpoint without them (a released one)."""
    file = os.path.join(path or "", "train_config.json")
    return read_json_object(file) if os.path.exists(file) else {}


def trained_prompt(path):
    """The caption prompt a checkpoint was trained with, else the released demo prompt (the released checkpoint has
    none)."""
    return train_config(path).get("caption_prompt") or DEMO_PROMPT


def open_safetensors(file, device="cpu"):
    """safe_open, a missing or cut-short file named in one line (safetensors checks the size against the header)."""
    try:
        return safe_open(file, framework="pt", device=str(device))
    except Exception as e:  # SafetensorError, FileNotFoundError
        raise CheckpointError(f"{file}: cannot be read, an incomplete download? ({e})") from e


def make_config(cls, d, **overrides):
    """A config dataclass from a Hugging Face config dict (unknown keys ignored)."""
    d = dict(d)
    if "rope_theta" not in d and isinstance(d.get("rope_parameters"), dict):  # transformers >= 5 layout
        d["rope_theta"] = d["rope_parameters"].get("rope_theta", 10000.0)
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in {**d, **overrides}.items() if k in names})


def checkpoint_keys(path):
    """{tensor name: safetensors file} for model.safetensors or a sharded index."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                files = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
        except (ValueError, KeyError, OSError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
        for file in sorted(set(files.values())):  # every shard whole before any is read: no late failure at 7B
            with open_safetensors(file):
                pass
        return files
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    with open_safetensors(single) as f:
        return {k: single for k in f.keys()}


def load_into(model, path, rename, dtype=None, device="cpu", only=None):
    """Load every checkpoint tensor whose rename(key) is not None into model (built on meta).
    rename maps a checkpoint key to a parameter name, or None for tensors deliberately left out;
    only (a tuple of name prefixes) restricts the load to part of the model."""
    files = checkpoint_keys(path)
    wanted = {}
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {k for k in shapes if only is None or k.startswith(only)}
    for key, file in files.items():
        name = rename(key)
        if name is not None and name not in expected and name.rsplit(".", 1)[-1] in NON_PARAMETER_BUFFERS:
            continue
        if name is not None and (only is None or name.startswith(only)):
            wanted.setdefault(file, []).append((key, name))
    got = {name for pairs in wanted.values() for _, name in pairs}
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        raise CheckpointError(f"{path}: cannot load {type(model).__name__}: "
                         f"{len(missing)} missing keys {missing[:8]}, {len(unexpected)} unexpected keys {unexpected[:8]}")
    for file, pairs in wanted.items():  # every shape checked before any tensor is read: no late failure at 7B
        with open_safetensors(file) as f:
            for key, name in pairs:
                if (shape := tuple(f.get_slice(key).get_shape())) != shapes[name]:
                    raise CheckpointError(f"{file}: {key} is {list(shape)}, {type(model).__name__}'s {name} is "
                                          f"{list(shapes[name])} (weights for another config?)")
    state = {}
    for file, pairs in wanted.items():
        with open_safetensors(file, device) as f:
            for key, name in pairs:
                t = f.get_tensor(key)
                state[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    model.load_state_dict(state, strict=only is None, assign=True)
    return model


def strip(prefix):
    return lambda k: k[len(prefix):] if k.startswith(prefix) else None


# -----------------------------------------------------------------------------
# the backbones alone


def load_qwen2(cls, path, dtype=None, device="cpu"):
    cfg = make_config(Qwen2Config, read_config(path).get("text_config", read_config(path)))  # llava-hf nests it
    with torch.device("meta"):
        model = cls(cfg)
    hf = any(k.startswith("language_model.") for k in checkpoint_keys(path))
    body, head = ("language_model.model.", "language_model.lm_head.") if hf else ("model.", "lm_head.")
    skip = ("model.vision_tower.", "model.mm_projector.", "model.image_newline")  # the visual half of LLaVA

    def rename(k):
        if k.startswith(head):  # some exports of a tied model still carry the duplicate head
            return None if cfg.tie_word_embeddings else "lm_head." + k[len(head):]
        return None if k.startswith(skip) else strip(body)(k)
    return load_into(model, path, rename, dtype, device)



def load_whisper(cls, path, dtype=None, device="cpu"):
    cfg = make_config(WhisperConfig, read_config(path))
    with torch.device("meta"):
        model = cls(cfg)
    keys = checkpoint_keys(path)
    prefix = "model.encoder." if any(k.startswith("model.encoder.") for k in keys) else "encoder."
    return load_into(model, path, strip(prefix), dtype, device)



# SiglipVisionModel; SiglipVisionModel as transformers 5 saves it
SIGLIP_PREFIXES = ("model.vision_tower.vision_tower.vision_model.", "vision_tower.vision_model.", "vision_tower.",
                   "vision_model.", "")


def load_siglip(cls, path, dtype=None, device="cpu", keep_layers=None):
    raw = read_config(path)
    if "mm_vision_tower" in raw:  # original LLaVA-OneVision: so400m with its last layer dropped (26 of 27)
        cfg = make_config(SiglipVisionConfig, SIGLIP_SO400M)
        keep_layers = keep_layers or cfg.num_hidden_layers - 1
    elif raw.get("model_type") == "llava_onevision":  # llava-hf keeps the 26 layers it uses
        cfg = make_config(SiglipVisionConfig, raw["vision_config"])
    else:  # SiglipVisionModel, or SiglipModel whose vision half is nested
        cfg = make_config(SiglipVisionConfig, raw.get("vision_config", raw))
    if keep_layers:
        cfg.keep_layers = keep_layers
    with torch.device("meta"):
        model = cls(cfg)
    keys = checkpoint_keys(path)
    prefix = next((p for p in SIGLIP_PREFIXES if p + "embeddings.patch_embedding.weight" in keys), "vision_model.")
    n_run = cfg.keep_layers or cfg.num_hidden_layers
    return load_into(model, path, lambda k: tower_key(strip(prefix)(k), n_run), dtype, device)


def tower_key(k, n_run):
    """A SigLIP key (below the vision_model prefix) we load, or None: we return features before
    post-layernorm, never use the pooling head, and skip the layers past the kept ones."""
    if k is None or k.startswith(("post_layernorm.", "head.")):
        return None
    if k.startswith("encoder.layers.") and int(k.split(".")[2]) >= n_run:
        return None
    return k




# -----------------------------------------------------------------------------
# the released video-SALMONN 2 layout

def save_safetensors(state, path, max_shard_bytes=None):
    """model.safetensors, or, past max_shard_bytes, model-0000i-of-0000n.safetensors shards and the
    model.safetensors.index.json that Hugging Face loaders (and checkpoint_keys) read."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    shards, size, total = [{}], 0, 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards, size = shards + [{}], 0
        shards[-1][k], size, total = v.detach().contiguous().cpu(), size + nbytes, total + nbytes
    if len(shards) == 1:
        return save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)


# (released key prefix, our prefix), most specific first
RELEASED_PREFIXES = [("model.vision_tower.vision_tower.vision_model.", "tower."), ("model.mm_projector.", "projector."),
                     ("model.image_newline", "image_newline"), ("lm_head.", "llm.lm_head."), ("model.", "llm."),
                     ("speech_encoder.", "speech_encoder."), ("ln_speech.", "audio.ln_speech."),
                     ("speech_Qformer.", "audio.speech_Qformer."), ("speech_query_tokens", "audio.speech_query_tokens"),
                     ("speech_llama_proj.", "audio.speech_llama_proj."), ("final_linear.", "audio.final_linear.")]


def released_to_ours(key):
    return next((new + key[len(old):] for old, new in RELEASED_PREFIXES if key.startswith(old)), None)


def ours_to_released(key):
    return next(old + key[len(new):] for old, new in RELEASED_PREFIXES if key.startswith(new))


def av_config_from_hf(raw):
    """Ours carry the full AVConfig; the released checkpoint only its LLM config, the rest are constants."""
    if "video_salmonn_2" in raw:
        return AVConfig.from_dict(raw["video_salmonn_2"])
    llm, whisper = make_config(Qwen2Config, raw), make_config(WhisperConfig, WHISPER_LARGE_V3)
    vision = make_config(SiglipVisionConfig, SIGLIP_SO400M)
    vision.keep_layers = vision.num_hidden_layers - 1  # LLaVA-OneVision drops the last layer
    return AVConfig(llm, vision, whisper, QFormerConfig(encoder_width=whisper.d_model, llm_dim=llm.hidden_size))



def load_video_salmonn2(cls, path, dtype=None, device="cpu"):
    """A checkpoint in the released video-SALMONN 2 layout into cls (VideoSALMONN2)."""
    _, cfg = model_config(path)
    with torch.device("meta"):
        model = cls(cfg)
    n_run = cfg.vision.keep_layers or cfg.vision.num_hidden_layers

    def rename(k):
        ours = released_to_ours(k)
        if ours is not None and ours.startswith("tower."):
            return "tower." + t if (t := tower_key(ours[len("tower."):], n_run)) else None
        return ours
    load_into(model, path, rename, dtype, device)
    return model.freeze_encoders()


def load_base(cls, llava_path, whisper_path, qformer_cfg=None, dtype=None, device="cpu"):
    """The starting point of audio alignment: LLaVA-OneVision (either layout) and a Whisper checkpoint, with a
    fresh audio aligner."""
    llm = load_qwen2(Qwen2, llava_path, dtype, device)
    tower = load_siglip(SiglipVision, llava_path, dtype, device)
    whisper = load_whisper(WhisperEncoder, whisper_path, dtype, device)
    qformer_cfg = qformer_cfg or QFormerConfig(encoder_width=whisper.cfg.d_model, llm_dim=llm.cfg.hidden_size)
    with torch.device("meta"):
        model = cls(AVConfig(llm.cfg, tower.cfg, whisper.cfg, qformer_cfg))
    model.llm, model.tower, model.speech_encoder = llm, tower, whisper
    model.audio = AudioAligner(qformer_cfg).to(device, dtype)
    hf_names = {"multi_modal_projector.linear_1.": "projector.0.", "multi_modal_projector.linear_2.": "projector.2.",
                "image_newline": "image_newline"}

    def rename(k):  # llava-hf names, else the original (released-like) ones
        old = next((o for o in hf_names if k.startswith(o)), None)
        return hf_names[old] + k[len(old):] if old else released_to_ours(k)
    load_into(model, llava_path, rename, dtype, device, only=("projector.", "image_newline"))
    return model.freeze_encoders()


def save_video_salmonn2(model, path, state=None, max_shard_bytes=None):
    """config.json and safetensors in the released video-SALMONN 2 layout; state: our {name: tensor} when it is
    not model.state_dict() (gathered from FSDP shards, say)."""
    state = model.state_dict() if state is None else state
    save_safetensors({ours_to_released(k): v for k, v in state.items()}, path, max_shard_bytes)
    config = {**vars(model.cfg.llm), "model_type": "video_salmonn_2", "mm_vision_tower": "siglip",
              "video_salmonn_2": model.cfg.to_dict()}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)


# -----------------------------------------------------------------------------
# export: the LLM alone as a Hugging Face Qwen2ForCausalLM, for tools that serve Qwen2 (text only)

MAX_POSITIONS = 32768  # Qwen2-7B-Instruct's; RoPE has no learned positions, so for serving this is only advertised
CHAT_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
                 "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")  # Qwen2-Instruct's


def save_hf_qwen2(state, cfg, tok, path, dtype, max_shard_bytes=None):
    """Our LLM weights ({"llm.*": tensor}) and tokenizer as a Qwen2ForCausalLM directory: config.json,
    generation_config.json, safetensors shards, tokenizer.json and tokenizer_config.json with the chat template."""
    save_safetensors({ours_to_released(k): v for k, v in state.items() if k.startswith("llm.")}, path, max_shard_bytes)
    tok.save(os.path.join(path, "tokenizer.json"))
    im_end = tok.token_to_id("<|im_end|>")
    hf = {**{k: v for k, v in vars(cfg).items() if k != "mrope_section"}, "architectures": ["Qwen2ForCausalLM"],
          "model_type": "qwen2", "hidden_act": "silu",
          "max_position_embeddings": MAX_POSITIONS, "attention_dropout": 0.0, "use_sliding_window": False,
          "bos_token_id": tok.token_to_id("<|endoftext|>"), "eos_token_id": im_end, "torch_dtype": str(dtype).split(".")[-1]}
    files = {"config.json": hf,
             "generation_config.json": {"bos_token_id": hf["bos_token_id"], "eos_token_id": hf["eos_token_id"]},
             "tokenizer_config.json": {"tokenizer_class": "Qwen2TokenizerFast", "chat_template": CHAT_TEMPLATE,
                                       "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
                                       "model_max_length": MAX_POSITIONS}}
    for name, obj in files.items():
        with open(os.path.join(path, name), "w") as f:
            json.dump(obj, f, indent=1)


# -----------------------------------------------------------------------------
# video-SALMONN 2+: the authors' full layout (model.* = the LLM, lm_head, visual.*, audio.*), the Qwen2.5-VL base

# (checkpoint key prefix, our prefix), most specific first; transformers >= 4.52 nests the LLM and the ViT
PLUS_PREFIXES = [("model.language_model.", "llm."), ("model.visual.", "visual."), ("visual.", "visual."),
                 ("audio.", "audio."), ("lm_head.", "llm.lm_head."), ("model.", "llm.")]


def plus_to_ours(key):
    return next((new + key[len(old):] for old, new in PLUS_PREFIXES if key.startswith(old)), None)


def plus_config_from_hf(raw, audio_token_id=None):
    """A PlusConfig from a 2+ (or Qwen2.5-VL) config.json: the LLM's fields flat (transformers 4.x, the
    authors' releases) or under text_config, M-RoPE sections under rope_scaling or rope_parameters."""
    from model_plus import TOKEN_FIELDS, PlusConfig
    text = raw.get("text_config") or raw
    rope = text.get("rope_scaling") or text.get("rope_parameters") or raw.get("rope_scaling") or {}
    llm = make_config(Qwen2Config, {**text, "tie_word_embeddings": raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False)),
                                    "mrope_section": tuple(rope.get("mrope_section", (16, 24, 24)))})
    vision = make_config(Qwen25VisionConfig, raw["vision_config"])
    audio = raw.get("audio_config") or {}
    whisper = make_config(WhisperConfig, {**WHISPER_LARGE_V3, **audio})
    tokens = {k: raw[k] for k in TOKEN_FIELDS if k in raw}
    if audio_token_id is not None:
        tokens["audio_token_id"] = audio_token_id
    return PlusConfig(llm, vision, whisper, qformer_plus_config(audio, llm.hidden_size), tokens)


def load_video_salmonn2_plus(cls, path, dtype=None, device="cpu"):
    _, cfg = model_config(path)
    with torch.device("meta"):
        model = cls(cfg)

    def rename(k):
        if k.startswith("lm_head.") and cfg.llm.tie_word_embeddings:  # (the Q-Former's position_ids: load_into skips it)
            return None
        return plus_to_ours(k)
    load_into(model, path, rename, dtype, device)
    return model.freeze_encoders()


def load_plus_base(cls, qwen_vl_path, whisper_path, audio_config=None, dtype=None, device="cpu"):
    """gen_audio_model.py: Qwen2.5-VL-Instruct (LLM, ViT) and Whisper's encoder into audio.*, a fresh Q-Former
    and audio_proj (BERT's N(0, 0.02)), and <|audio_pad|> the next id after the tokenizer's last. audio_config
    (window seconds, qformer_config) defaults to the authors' configuration_qwen2_5_vl.py."""
    raw = read_config(qwen_vl_path)
    audio_id = raw.get("audio_token_id")
    if audio_id is None:
        tok = os.path.join(qwen_vl_path, "tokenizer.json")
        if not os.path.exists(tok):
            raise CheckpointError(f"{qwen_vl_path}: no audio_token_id in config.json and no tokenizer.json to add <|audio_pad|> to")
        from tokenizers import Tokenizer
        audio_id = Tokenizer.from_file(tok).get_vocab_size(with_added_tokens=True)
    whisper_raw = read_config(whisper_path)
    audio = {**{k: whisper_raw[k] for k in WHISPER_LARGE_V3 if k in whisper_raw}, **(audio_config or {})}
    cfg = plus_config_from_hf({**raw, "audio_config": audio}, audio_token_id=audio_id)
    with torch.device("meta"):
        model = cls(cfg)
    rename = lambda k: None if k.startswith("lm_head.") and cfg.llm.tie_word_embeddings else plus_to_ours(k)
    load_into(model, qwen_vl_path, rename, dtype, device, only=("llm.", "visual."))
    keys = checkpoint_keys(whisper_path)
    prefix = "model.encoder." if any(k.startswith("model.encoder.") for k in keys) else "encoder."
    load_into(model, whisper_path, lambda k: "audio." + k[len(prefix):] if k.startswith(prefix) else None, dtype, device,
              only=("audio.conv", "audio.embed_positions", "audio.layers.", "audio.layer_norm."))
    a = model.audio  # its Q-Former, q_tokens and audio_proj are still on meta: materialise and initialise them
    a.qformer.to_empty(device=device)
    a.audio_proj.to_empty(device=device)
    a.q_tokens = nn.Parameter(torch.empty(a.q_tokens.shape, device=device))
    a.init_aligner()
    if dtype is not None:
        for m in (a.qformer, a.audio_proj):
            m.to(dtype)
        a.q_tokens.data = a.q_tokens.data.to(dtype)
    return model.freeze_encoders()


def load_plus_lora(cls, lora_path, base_path, dtype=None, device="cpu"):
    """A LoRA-only 2+ release (PEFT's adapter_config.json and adapter_model.safetensors) on its audio-aligned
    base: LoRA A/B on the LLM's projections, merged (W += alpha / r B A, as the authors' merge_and_unload),
    and the modules_to_save (the merger, the Q-Former, audio_proj) replacing the base's."""
    import lora
    adapter = read_json_object(os.path.join(lora_path, "adapter_config.json"))
    if not (of_type(adapter.get("r"), int) and of_type(adapter.get("lora_alpha"), float)):
        raise CheckpointError(f"{lora_path}/adapter_config.json: no integer r and number lora_alpha (a PEFT LoRA release?)")
    model = load_video_salmonn2_plus(cls, base_path, dtype, device)
    lora.apply_lora(model.llm, tuple(adapter.get("target_modules") or lora.TARGETS), adapter["r"], adapter["lora_alpha"], 0.0)
    file = os.path.join(lora_path, "adapter_model.safetensors")
    if not os.path.exists(file):
        raise CheckpointError(f"{lora_path}: no adapter_model.safetensors")
    state, ours = {}, model.state_dict()
    with open_safetensors(file, device) as f:
        for key in f.keys():
            k = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".lora_A").replace(".lora_B.weight", ".lora_B")
            name = plus_to_ours(k)
            if name not in ours:
                raise CheckpointError(f"{file}: {key} fits no parameter of {cls.__name__} (as {name})")
            if (shape := tuple(f.get_slice(key).get_shape())) != tuple(ours[name].shape):
                raise CheckpointError(f"{file}: {key} is {list(shape)}, {name} is {list(ours[name].shape)} "
                                      f"(a LoRA of another rank, or for another base?)")
            t = f.get_tensor(key)
            state[name] = t.to(ours[name].dtype) if t.is_floating_point() else t
    if not any(k.endswith(".lora_A") for k in state):
        raise CheckpointError(f"{file}: no LoRA weights")
    model.load_state_dict(state, strict=False)
    lora.merge_lora(model)
    return model.freeze_encoders()


def plus_to_released(key):
    """Our 2+ parameter name -> the authors' key (transformers 4.51 layout, which transformers 5 still writes)."""
    if key.startswith("llm.lm_head."):
        return key[len("llm."):]
    return "model." + key[len("llm."):] if key.startswith("llm.") else key


def save_video_salmonn2_plus(model, path, state=None, max_shard_bytes=None):
    """config.json (the authors' fields, and our full config under video_salmonn_2_plus) and safetensors in the
    authors' layout; state: our {name: tensor} when it is not model.state_dict() (gathered from FSDP shards)."""
    state = model.state_dict() if state is None else state
    save_safetensors({plus_to_released(k): v for k, v in state.items()}, path, max_shard_bytes)
    c = model.cfg
    config = {**vars(c.llm), "model_type": "qwen2_5_vl", "architectures": ["video_SALMONN2_plus"],
              "rope_scaling": {"type": "mrope", "mrope_section": list(c.llm.mrope_section)},
              "vision_config": {**vars(c.vision), "fullatt_block_indexes": list(c.vision.fullatt_block_indexes)},
              "audio_config": vars(c.whisper), **c.tokens, "video_salmonn_2_plus": c.to_dict()}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)


def save_hf_qwen25vl(state, cfg, path, dtype=torch.bfloat16, tok=None, max_shard_bytes=None):
    """The 2+ LLM and ViT ({"llm.*", "visual.*": tensor}) as a Hugging Face Qwen2_5_VLForConditionalGeneration
    directory, for visual-only serving tools (they never see the audio branch, nor the training positions of
    audio-visual prompts): the official Qwen2.5-VL config.json fields, flat, which transformers 4.5x and 5
    both read, and the tokenizer when given."""
    save_safetensors({plus_to_released(k): v.to(dtype) for k, v in state.items() if k.startswith(("llm.", "visual."))},
                     path, max_shard_bytes)
    hf = {**vars(cfg.llm), "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
          "hidden_act": "silu", "max_position_embeddings": 128000, "use_sliding_window": False, "attention_dropout": 0.0,
          "rope_scaling": {"type": "mrope", "mrope_section": list(cfg.llm.mrope_section)},
          "vision_config": {**vars(cfg.vision), "fullatt_block_indexes": list(cfg.vision.fullatt_block_indexes),
                            "hidden_act": "silu", "tokens_per_second": 2, "model_type": "qwen2_5_vl"},
          **{k: v for k, v in cfg.tokens.items() if k != "audio_token_id"}, "torch_dtype": str(dtype).split(".")[-1]}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=1)
    if tok is not None:
        tok.save(os.path.join(path, "tokenizer.json"))


# -----------------------------------------------------------------------------
# either family, chosen by the checkpoint


def is_plus(raw):
    """Whether a config.json is a 2+ (Qwen2.5-VL) model: ours, the authors', or a Qwen2.5-VL base."""
    return "video_salmonn_2_plus" in raw or raw.get("model_type") == "qwen2_5_vl" or "audio_config" in raw


def model_config(path):
    """(model class, config) of a checkpoint dir of either family, without loading weights; a config.json that does
    not fit its family's config (a key missing, a value of another type: a hand-edited file) is named in one line."""
    from model import VideoSALMONN2
    from model_plus import PlusConfig, VideoSALMONN2Plus
    raw = read_config(path)
    cls = VideoSALMONN2Plus if is_plus(raw) else VideoSALMONN2
    try:
        if cls is VideoSALMONN2:
            cfg = av_config_from_hf(raw)
        else:
            cfg = PlusConfig.from_dict(raw["video_salmonn_2_plus"]) if "video_salmonn_2_plus" in raw else plus_config_from_hf(raw)
        check_types(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{os.path.join(path, 'config.json')}: does not fit {cls.__name__}'s config "
                              f"({type(e).__name__}: {e})") from e
    return cls, cfg


def check_types(cfg, prefix=""):
    """Every field of a config dataclass (and of those nested in it) of its declared type, as JSON writes it (a list
    for a tuple, an int for a float): the dataclasses check nothing, and a string size fails deep in torch."""
    for f in fields(cfg):
        value, name = getattr(cfg, f.name), prefix + f.name
        if is_dataclass(f.type):
            check_types(value, name + ".")
        elif not of_type(value, f.type):
            raise TypeError(f"{name} must be {f.type.__name__}, got {value!r}")


def load_model(path, dtype=None, device="cpu"):
    """A video-SALMONN 2 or 2+ checkpoint dir (ours or released), its family read from config.json."""
    cls, _ = model_config(path)
    return cls.from_pretrained(path, dtype, device)
