"""
video-SALMONN 2 in plain PyTorch: the three frozen backbones and their checkpoint loaders.

- Qwen2: the LLM (RMSNorm, RoPE with configurable theta, grouped-query attention through
  scaled_dot_product_attention, q/k/v bias, SwiGLU MLP, tied or untied head), with a KV cache
  whose batch-1 prefix can serve N continuations (one video, N captions).
- WhisperEncoder: the audio encoder of Whisper (conv stem, sinusoidal positions, pre-LN blocks).
- SiglipVision: the SigLIP tower, returning the last kept layer before post-layernorm.
- VideoSALMONN2: tower -> projector -> 2x2 max-pool -> row newlines per frame; Whisper per 30 s
  segment -> window-level Q-Former (qformer.py); the two interleaved frame by frame (paper Eq. 4-6)
  inside the Qwen2 chat prompt.
Each module's parameter names equal the Hugging Face ones below a prefix, so loading is renaming.
"""
import hashlib
import json
import math
import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import safe_open

from qformer import AudioAligner, QFormerConfig

# -----------------------------------------------------------------------------
# Qwen2


@dataclass
class Qwen2Config:  # field names and defaults are those of transformers' Qwen2Config
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # normalise in fp32 and scale in the input dtype, exactly as the reference does
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(positions, head_dim, theta, dtype):
    """cos, sin of shape (T, head_dim) for the half-split rotation (rotate_half), computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Qwen2Attention(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.hd, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=True)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, cache=None, mask=None):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if isinstance(cache, KVBuffer):  # generation: append in place
            k, v = cache.append(k, v)
        elif cache is not None:
            # a batch-1 prefix (one video) serves B continuations: expand is a view, and its
            # backward sums the B gradients into the one prefix
            pk, pv = (t.expand(B, -1, -1, -1) if t.size(0) == 1 else t for t in cache)
            k, v = torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2)  # (B, nkv, P+T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=cache is None and T > 1,
                                           enable_gqa=self.n_kv != self.n_head)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.o_proj(y), cache if isinstance(cache, KVBuffer) else (k, v)


class KVBuffer:
    """One layer's keys and values during generation, in buffers sized for all of it: a decode step writes its
    position in place, where torch.cat would copy the whole cache (the long video prefix, n times) every step."""

    def __init__(self, k, v, n, extra):  # k, v: (1 or n, nkv, P, hd) from the prefill
        self.k = k.new_empty(n, k.size(1), k.size(2) + extra, k.size(3))  # (n, nkv, P + extra, hd)
        self.v = torch.empty_like(self.k)
        self.k[:, :, :k.size(2)], self.v[:, :, :k.size(2)], self.len = k, v, k.size(2)

    def append(self, k, v):
        """Write (n, nkv, T, hd) after what is there; returns all keys and values so far (views)."""
        T = k.size(2)
        self.k[:, :, self.len:self.len + T], self.v[:, :, self.len:self.len + T] = k, v
        self.len += T
        return self.k[:, :, :self.len], self.v[:, :, :self.len]


class Qwen2MLP(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2Block(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen2Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Qwen2MLP(cfg)

    def forward(self, x, cos, sin, cache=None, mask=None):
        a, kv = self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv


class Qwen2(nn.Module):
    """Qwen2 decoder. forward(idx) -> (logits, cache); a cache is a list of per-layer (k, v),
    each (B or 1, n_kv, T_past, head_dim)."""

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # a tied head reads embed_tokens.weight, so there is nothing to load or tie for it
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.activation_checkpointing = False  # trade a second forward of each block for its activations
        _init_normal(self)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu"):
        """Qwen2ForCausalLM, the released video-SALMONN 2, or either LLaVA-OneVision layout."""
        return load_qwen2(cls, path, dtype, device)

    def head(self, h):
        return F.linear(h, self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight)

    def hidden(self, embeds, cache=None, start_pos=None, use_cache=False):
        """Final-normed hidden states (B, T, C) of input embeddings; positions continue the cache."""
        T, P = embeds.size(1), (cache[0].len if isinstance(cache[0], KVBuffer) else cache[0][0].size(2)) if cache else 0
        start_pos = P if start_pos is None else start_pos
        pos = torch.arange(start_pos, start_pos + T, device=embeds.device)
        cos, sin = rope_cos_sin(pos, self.cfg.head_dim, self.cfg.rope_theta, embeds.dtype)
        # SDPA's is_causal aligns to the top-left; after a prefix of P the diagonal sits P columns right
        mask = torch.ones(T, P + T, dtype=torch.bool, device=embeds.device).tril(P) if P and T > 1 else None
        x, new_cache = embeds, []
        for i, block in enumerate(self.layers):
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():  # recompute in backward
                x, kv = torch.utils.checkpoint.checkpoint(block, x, cos, sin, cache[i] if cache else None, mask, use_reentrant=False)
            else:
                x, kv = block(x, cos, sin, cache[i] if cache else None, mask)
            if use_cache:
                new_cache.append(kv)
        return self.norm(x), (new_cache if use_cache else None)

    def forward(self, idx=None, embeds=None, cache=None, start_pos=None, use_cache=False):
        embeds = self.embed_tokens(idx) if embeds is None else embeds
        h, new_cache = self.hidden(embeds, cache, start_pos, use_cache)
        return self.head(h), new_cache

    @torch.no_grad()
    def generate(self, embeds, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, greedy=False,
                 stop_ids=(), generator=None, return_logprobs=False):
        """Sample n continuations of one prompt (embeds (1, T, C)) sharing one prefill.
        Returns a list of n token lists (each ends at its first stop id, kept) and, when asked,
        each token's log-probability under the untempered model (n lists of floats)."""
        h, cache = self.hidden(embeds, use_cache=True)
        cache = [KVBuffer(k, v, n, max_new_tokens) for k, v in cache]
        logits = self.head(h[:, -1]).expand(n, -1)  # (n, V): all n rows start from the one prefill
        out = torch.zeros(n, 0, dtype=torch.long, device=embeds.device)
        logps = torch.zeros(n, 0, device=embeds.device)
        done = torch.zeros(n, dtype=torch.bool, device=embeds.device)
        stop = torch.tensor(list(stop_ids), dtype=torch.long, device=embeds.device)
        for _ in range(max_new_tokens):
            tok = greedy_or_nucleus(logits.float(), temperature, top_p, greedy, generator)  # (n,)
            lp = torch.log_softmax(logits.float(), dim=-1).gather(1, tok[:, None])[:, 0]
            out, logps = torch.cat((out, tok[:, None]), 1), torch.cat((logps, lp[:, None]), 1)
            done |= torch.isin(tok, stop)
            if done.all() or out.size(1) == max_new_tokens:
                break
            logits, cache = self(tok[:, None], cache=cache, use_cache=True)
            logits = logits[:, -1]  # (n, V)
        seqs, lps = [], []
        for row, lp in zip(out.tolist(), logps.tolist()):
            end = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
            seqs.append(row[:end])
            lps.append(lp[:end])
        return (seqs, lps) if return_logprobs else seqs


def greedy_or_nucleus(logits, temperature, top_p, greedy, generator=None):
    """Next token per row of logits (N, V): argmax, or nucleus sampling (Holtzman et al.)."""
    if greedy or temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    # keep the smallest set of tokens whose mass reaches top_p (the top token always survives)
    drop = sorted_p.cumsum(-1) - sorted_p >= top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    choice = torch.multinomial(sorted_p, 1, generator=generator)  # (N, 1), renormalises itself
    return order.gather(1, choice)[:, 0]


def _init_normal(module, std=0.02):
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


# -----------------------------------------------------------------------------
# Whisper encoder

SAMPLE_RATE = 16000  # Hz
N_FFT = 400  # 25 ms window
HOP_LENGTH = 160  # 10 ms hop: 100 mel frames per second
CHUNK_LENGTH = 30  # seconds of audio per encoder input
# the stride-2 conv makes 50 encoder frames per second (20 ms each)


@dataclass
class WhisperConfig:  # field names and defaults are those of transformers' WhisperConfig
    num_mel_bins: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    encoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    max_source_positions: int = 1500  # encoder frames per input: 1500 = 30 s


def sinusoids(length, channels, max_timescale=10000):
    """Whisper's sinusoidal table (length, channels): sines in the first half, cosines in the second."""
    inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2, dtype=torch.float))
    t = torch.arange(length, dtype=torch.float)[:, None] * inv[None, :]  # (length, channels/2)
    return torch.cat([t.sin(), t.cos()], dim=1)


class EncoderAttention(nn.Module):
    """Bidirectional multi-head attention with the projections named as in Whisper and SigLIP."""

    def __init__(self, dim, n_head, k_bias=True):
        super().__init__()
        self.n_head = n_head
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=k_bias)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class WhisperBlock(nn.Module):
    def __init__(self, cfg: WhisperConfig):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.self_attn = EncoderAttention(cfg.d_model, cfg.encoder_attention_heads, k_bias=False)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, cfg.d_model)

    def forward(self, x):
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperEncoder(nn.Module):
    """Log-mel (B, n_mels, 2 * max_source_positions) -> (B, max_source_positions, d_model)."""

    def __init__(self, cfg: WhisperConfig):
        super().__init__()
        self.cfg = cfg
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, cfg.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(cfg.d_model, cfg.d_model, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg.max_source_positions, cfg.d_model)
        self.layers = nn.ModuleList(WhisperBlock(cfg) for _ in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(cfg.d_model)
        _init_normal(self)
        self.embed_positions.weight.data.copy_(sinusoids(cfg.max_source_positions, cfg.d_model))
        self.embed_positions.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu"):
        """WhisperForConditionalGeneration or WhisperModel; the decoder is not loaded."""
        return load_whisper(cls, path, dtype, device)

    def forward(self, mel):
        assert mel.shape[1:] == (self.cfg.num_mel_bins, 2 * self.cfg.max_source_positions), f"expected mel (B, {self.cfg.num_mel_bins}, {2 * self.cfg.max_source_positions}), got {tuple(mel.shape)}"
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, T, C)
        x = x + self.embed_positions.weight
        for block in self.layers:
            x = block(x)
        return self.layer_norm(x)


# -----------------------------------------------------------------------------
# SigLIP vision tower


@dataclass
class SiglipVisionConfig:  # field names and defaults are those of transformers' SiglipVisionConfig
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    layer_norm_eps: float = 1e-6
    keep_layers: int = 0  # layers run (0: all); LLaVA-OneVision drops the last layer of so400m

    @property
    def grid(self):  # patches per side
        return self.image_size // self.patch_size


# google/siglip-so400m-patch14-384, whose config the original LLaVA-OneVision layout does not carry
SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                     image_size=384, patch_size=14)


class SiglipBlock(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = EncoderAttention(cfg.hidden_size, cfg.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(cfg.hidden_size, cfg.intermediate_size),
                                      fc2=nn.Linear(cfg.intermediate_size, cfg.hidden_size)))

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.layer_norm2(x)), approximate="tanh"))


class SiglipVision(nn.Module):
    """Pixels (B, 3, H, W), normalised to [-1, 1] -> patch features (B, grid * grid, hidden_size)."""

    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = nn.ModuleDict(dict(
            patch_embedding=nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size),
            position_embedding=nn.Embedding(cfg.grid ** 2, cfg.hidden_size)))
        n = cfg.keep_layers or cfg.num_hidden_layers
        self.encoder = nn.ModuleDict(dict(layers=nn.ModuleList(SiglipBlock(cfg) for _ in range(n))))
        _init_normal(self)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu", keep_layers=None):
        """SiglipVisionModel, SiglipModel (vision half), or either LLaVA-OneVision layout."""
        return load_siglip(cls, path, dtype, device, keep_layers)

    def forward(self, pixels):
        x = self.embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, N, C)
        x = x + self.embeddings.position_embedding.weight
        for block in self.encoder.layers:
            x = block(x)
        return x


# -----------------------------------------------------------------------------
# Loading Hugging Face checkpoints: build on the meta device, then assign the tensors read from
# safetensors, so a 7B model is never held twice.


def read_config(path):
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


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
        with open(index) as f:
            return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    with safe_open(single, framework="pt") as f:
        return {k: single for k in f.keys()}


def load_into(model, path, rename, dtype=None, device="cpu", only=None):
    """Load every checkpoint tensor whose rename(key) is not None into model (built on meta).
    rename maps a checkpoint key to a parameter name, or None for tensors deliberately left out;
    only (a tuple of name prefixes) restricts the load to part of the model."""
    files = checkpoint_keys(path)
    wanted = {}
    for key, file in files.items():
        name = rename(key)
        if name is not None and (only is None or name.startswith(only)):
            wanted.setdefault(file, []).append((key, name))
    expected = {k for k in model.state_dict() if only is None or k.startswith(only)}
    got = {name for pairs in wanted.values() for _, name in pairs}
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        raise ValueError(f"{path}: cannot load {type(model).__name__}: "
                         f"{len(missing)} missing keys {missing[:8]}, {len(unexpected)} unexpected keys {unexpected[:8]}")
    state = {}
    for file, pairs in wanted.items():
        with safe_open(file, framework="pt", device=str(device)) as f:
            for key, name in pairs:
                t = f.get_tensor(key)
                state[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    model.load_state_dict(state, strict=only is None, assign=True)
    return model


def strip(prefix):
    return lambda k: k[len(prefix):] if k.startswith(prefix) else None


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


# original LLaVA-OneVision; llava-hf as on the hub and as transformers 5 saves it; SiglipModel and hub
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
# video-SALMONN 2: the audio-visual model

# openai/whisper-large-v3's encoder, whose config the released checkpoint does not carry
WHISPER_LARGE_V3 = dict(num_mel_bins=128, d_model=1280, encoder_layers=32, encoder_attention_heads=20,
                        encoder_ffn_dim=5120, max_source_positions=1500)
AUDIO_SPLIT_RATE = 50  # the released code keeps round(50 * duration) audio tokens "in front": in practice all


@dataclass
class AVConfig:
    llm: Qwen2Config
    vision: SiglipVisionConfig
    whisper: WhisperConfig
    qformer: QFormerConfig
    pool: int = 2  # max-pool stride over the patch grid, after the projector (27 x 27 -> 13 x 13)
    segment_seconds: float = CHUNK_LENGTH  # audio per Whisper input
    time_aligned: bool = False  # give each frame only its own seconds of audio (see interleave)

    @property
    def tokens_per_frame(self):  # 13 * 13 + 13 newlines = 182 for so400m at 384 px
        h = self.vision.grid // self.pool
        return h * (h + 1)

    @property
    def audio_tokens_per_second(self):  # 60 tokens / 30 s = 2
        return self.qformer.tokens_per_segment / self.segment_seconds

    def to_dict(self):
        return {"llm": vars(self.llm), "vision": vars(self.vision), "whisper": vars(self.whisper),
                "qformer": vars(self.qformer), "pool": self.pool, "segment_seconds": self.segment_seconds,
                "time_aligned": self.time_aligned}

    @staticmethod
    def from_dict(d):
        return AVConfig(Qwen2Config(**d["llm"]), SiglipVisionConfig(**d["vision"]), WhisperConfig(**d["whisper"]),
                        QFormerConfig(**d["qformer"]), d["pool"], d["segment_seconds"], d["time_aligned"])


class VideoSALMONN2(nn.Module):
    """The audio-visual LLM (paper Fig. 1). Frames -> frozen SigLIP -> projector -> pooled tokens with
    row newlines; audio -> frozen Whisper per segment -> window-level Q-Former; the two interleaved
    frame by frame and put in place of the <image> placeholder of the Qwen2 chat prompt. The frozen
    encoders' outputs are what the feature cache stores (encode); everything after them trains."""

    def __init__(self, cfg: AVConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.llm.hidden_size
        self.llm = Qwen2(cfg.llm)
        self.tower = SiglipVision(cfg.vision)
        self.projector = nn.Sequential(nn.Linear(cfg.vision.hidden_size, D), nn.GELU(), nn.Linear(D, D))
        self.image_newline = nn.Parameter(torch.randn(D) / math.sqrt(D))
        self.speech_encoder = WhisperEncoder(cfg.whisper)
        self.audio = AudioAligner(cfg.qformer)
        self.freeze_encoders()

    @torch.no_grad()
    def encoder_fingerprint(self):
        """A digest of the frozen encoders' configs and weights, for the feature-cache key."""
        h = hashlib.sha256(json.dumps([vars(self.cfg.vision), vars(self.cfg.whisper)], sort_keys=True).encode())
        params = list(self.tower.parameters()) + list(self.speech_encoder.parameters())
        h.update(torch.stack([s for p in params for s in (p.float().sum(), p.float().square().sum())]).cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    @torch.no_grad()
    def encode(self, frames, mel):
        """The frozen, cacheable part: tower features (F, N, Cv) (None without frames) and Whisper features (S, T, Ca)."""
        p = next(self.tower.parameters())
        vis = None if frames is None else self.tower(frames.to(p.device, p.dtype))
        return vis, self.speech_encoder(mel.to(p.device, p.dtype))

    def visual_tokens(self, feats):
        """Tower features (F, g*g, Cv) -> (F, h*(h+1), D): projector, max-pool, a newline after each row."""
        x = self.projector(feats)  # (F, g*g, D)
        Fn, N, D = x.shape
        g = math.isqrt(N)
        x = x.view(Fn, g, g, D).permute(0, 3, 1, 2)  # (F, D, g, g)
        x = F.max_pool2d(x, self.cfg.pool).permute(0, 2, 3, 1)  # (F, h, h, D)
        h = x.size(1)
        x = torch.cat([x, self.image_newline.to(x.dtype).expand(Fn, h, 1, D)], dim=2)  # (F, h, h+1, D)
        return x.reshape(Fn, h * (h + 1), D)

    def interleave(self, vis, aud, frame_times, duration):
        """Frame i's visual tokens, then its slice of audio tokens (paper Eq. 4-6) -> (L, D).

        Default, as the paper and the released model: all audio tokens, the padding of the last
        segment included, are spread evenly over the n frames (stretched by nearest-neighbour
        interpolation to a multiple of n), so timing drifts unless the duration is a multiple of 30 s.
        time_aligned: frame i gets only the tokens whose time falls in [t_i, t_{i+1}), and the tokens
        past the end of the audio (segment padding) are dropped."""
        n, D = vis.size(0), vis.size(-1)
        if self.cfg.time_aligned:
            rate = self.cfg.audio_tokens_per_second
            n_keep = min(aud.size(0), math.ceil(duration * rate))
            edges = [0] + [min(round(t * rate), n_keep) for t in frame_times[1:]] + [n_keep]
            return torch.cat([torch.cat([vis[i], aud[edges[i]:edges[i + 1]]]) for i in range(n)])
        split = round(duration * AUDIO_SPLIT_RATE)
        front, back = aud[:split], aud[split:]
        if front.size(0) % n:
            size = front.size(0) + n - front.size(0) % n
            front = F.interpolate(front.T[None], size=size, mode="nearest")[0].T  # (size, D)
        front = front.reshape(n, -1, D)  # (n, k, D)
        return torch.cat([torch.cat([vis, front], dim=1).reshape(-1, D), back])

    def av_length(self, n_frames, n_audio, duration):
        """The length of interleave's output (without running it): n_audio audio tokens, n_frames frames."""
        if n_frames == 0 or n_audio == 0:
            return n_frames * self.cfg.tokens_per_frame + n_audio
        if self.cfg.time_aligned:
            return n_frames * self.cfg.tokens_per_frame + min(n_audio, math.ceil(duration * self.cfg.audio_tokens_per_second))
        front = min(n_audio, round(duration * AUDIO_SPLIT_RATE))
        return n_frames * self.cfg.tokens_per_frame + -(-front // n_frames) * n_frames + n_audio - front

    def sequence_length(self, example):
        """Tokens in the LLM sequence of one example (prompt, audio-visual block, response), and in its response."""
        (vis, aud, times, duration), (before, after), response = example
        n_frames = 0 if vis is None else vis.size(0)
        n_audio = 0 if aud is None else aud.size(0) * self.cfg.qformer.tokens_per_segment
        return len(before) + self.av_length(n_frames, n_audio, duration) + len(after) + len(response), len(response)

    def estimate_flops(self, seqs):
        """Training FLOPs of (length, response length) sequences, counting the work done (model FLOPs: recomputation
        under activation checkpointing is not counted): per token and matmul weight 2 forward and 2 for the input
        gradient, plus 2 for the weight gradient only where weights train (LoRA: few; the toy base: all); the head
        only on response tokens; causal attention 2 L^2 C per layer forward and twice that backward."""
        cfg, body, n_train = self.cfg.llm, 0, 0
        for name, p in self.llm.named_parameters():
            if p.dim() == 2 and "embed_tokens" not in name and "lm_head" not in name:
                body, n_train = body + p.numel(), n_train + p.numel() * p.requires_grad
        head = self.llm.embed_tokens.weight if self.llm.lm_head is None else self.llm.lm_head.weight
        per_response_token = (4 + 2 * head.requires_grad) * head.numel()
        return sum((4 * body + 2 * n_train) * L + per_response_token * R + 6 * cfg.num_hidden_layers * cfg.hidden_size * L * L
                   for L, R in seqs)

    def av_tokens(self, vis_feats, aud_feats, frame_times, duration):
        """Cached encoder features of one item -> its audio-visual block (L, D). Audio-only items
        (alignment) have no frames, visual-only ones (the visual base) no audio, text-only ones neither."""
        if vis_feats is None:  # audio only, or nothing (a text-only item)
            return self.image_newline.new_zeros(0, self.cfg.llm.hidden_size) if aud_feats is None else self.audio(aud_feats)
        vis = self.visual_tokens(vis_feats)
        if aud_feats is None:
            return vis.reshape(-1, vis.size(-1))
        return self.interleave(vis, self.audio(aud_feats).to(vis.dtype), frame_times, duration)

    def embed_sequence(self, feats, prompt_ids, response_ids):
        """One training sequence: (embeds (1, P + R, D), P) for the prompt around the AV block, then the response."""
        prefix = self.prompt_embeds(prompt_ids[0], self.av_tokens(*feats), prompt_ids[1])
        response = self.llm.embed_tokens(torch.tensor(response_ids, device=prefix.device))[None]
        return torch.cat([prefix, response.to(prefix.dtype)], dim=1), prefix.size(1)

    def forward(self, batch):
        """Training: batch = [(features, (before, after) prompt ids, response ids)] -> (summed response NLL,
        token count). Going through forward lets FSDP gather the root's parameters (projector, aligner,
        embeddings) once for the whole step."""
        return self.response_nll([(*self.embed_sequence(f, p, r), r) for f, p, r in batch])

    def response_nll(self, seqs):
        """Summed negative log-likelihood of the responses, and their token count, for a list of
        (embeds (1, L, D), prefix length P, response ids) right-padded into one forward. The LM head
        runs on the response positions only, never over the thousands of video tokens."""
        L = max(e.size(1) for e, _, _ in seqs)
        x = torch.cat([F.pad(e, (0, 0, 0, L - e.size(1))) for e, _, _ in seqs])  # (B, L, D): causal, so right padding is inert
        h, _ = self.llm.hidden(x)
        rows = torch.cat([h[i, P - 1:P - 1 + len(r)] for i, (_, P, r) in enumerate(seqs)])  # (sum R, D)
        targets = torch.tensor([t for _, _, r in seqs for t in r], device=x.device)
        return F.cross_entropy(self.llm.head(rows).float(), targets, reduction="sum"), targets.numel()

    def continuation_logps(self, feats, prompt_ids, continuations):
        """Summed log-probability of each continuation (a list of N token lists) after one video's prompt,
        and their token counts: the prefix runs once (batch 1) and the N continuations run as one
        right-padded batch over its KV cache, gradients reaching the prefix through the cache."""
        prefix = self.prompt_embeds(prompt_ids[0], self.av_tokens(*feats), prompt_ids[1])  # (1, P, D)
        h, cache = self.llm.hidden(prefix, use_cache=True)
        N, L = len(continuations), max(len(c) for c in continuations)
        ids = torch.tensor([c + [0] * (L - len(c)) for c in continuations], device=prefix.device)  # (N, L)
        hc, _ = self.llm.hidden(self.llm.embed_tokens(ids).to(prefix.dtype), cache=cache)  # (N, L, D)
        hs = torch.cat([h[:, -1:].expand(N, 1, -1), hc[:, :-1]], dim=1)  # (N, L, D): the state before each token
        lengths = torch.tensor([len(c) for c in continuations], device=ids.device)
        real = torch.arange(L, device=ids.device)[None] < lengths[:, None]  # (N, L)
        nll = F.cross_entropy(self.llm.head(hs[real]).float(), ids[real], reduction="none")  # head on real tokens only
        return -torch.zeros(N, device=ids.device).index_add(0, real.nonzero()[:, 0], nll), lengths

    def prompt_embeds(self, before_ids, av, after_ids):
        """Token ids before and after the <image> placeholder around the AV block -> (1, P, D)."""
        emb = self.llm.embed_tokens
        dev = emb.weight.device
        pieces = [emb(torch.tensor(before_ids, device=dev)), av.to(emb.weight.dtype), emb(torch.tensor(after_ids, device=dev))]
        return torch.cat(pieces)[None]

    @torch.no_grad()
    def sample(self, feats, prompt_ids, n=1, **generate_kw):
        """n captions of one video from its cached features (vision, audio, frame times, duration) and
        the prompt's (before, after) token ids; generate_kw as Qwen2.generate."""
        embeds = self.prompt_embeds(prompt_ids[0], self.av_tokens(*feats), prompt_ids[1])
        return self.llm.generate(embeds, n=n, **generate_kw)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu"):
        """A checkpoint in the released video-SALMONN 2 layout (ours carry their full config)."""
        raw = read_config(path)
        cfg = av_config_from_hf(raw)
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

    @classmethod
    def from_base(cls, llava_path, whisper_path, qformer_cfg=None, dtype=None, device="cpu"):
        """The starting point of audio alignment: LLaVA-OneVision (either layout) and a Whisper
        checkpoint, with a fresh audio aligner."""
        llm = Qwen2.from_pretrained(llava_path, dtype, device)
        tower = SiglipVision.from_pretrained(llava_path, dtype, device)
        whisper = WhisperEncoder.from_pretrained(whisper_path, dtype, device)
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

    def freeze_encoders(self):
        for frozen in (self.tower, self.speech_encoder):  # paper 3.2: the encoders never train
            frozen.requires_grad_(False)
        return self

    def save_pretrained(self, path, state=None, max_shard_bytes=None):
        """config.json and safetensors in the released video-SALMONN 2 layout; state: our {name: tensor}
        when it is not self.state_dict() (gathered from FSDP shards, say)."""
        state = self.state_dict() if state is None else state
        save_safetensors({ours_to_released(k): v for k, v in state.items()}, path, max_shard_bytes)
        config = {**vars(self.cfg.llm), "model_type": "video_salmonn_2", "mm_vision_tower": "siglip",
                  "video_salmonn_2": self.cfg.to_dict()}
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f, indent=1)


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
