"""
video-SALMONN 2 in plain PyTorch: the LLM and the assembled audio-visual model.

- Qwen2: the LLM (RMSNorm, RoPE with configurable theta, grouped-query attention through
  scaled_dot_product_attention, q/k/v bias, SwiGLU MLP, tied or untied head), with a KV cache
  whose batch-1 prefix can serve N continuations (one video, N captions).
- VideoSALMONN2: frozen SigLIP (encoders.py) -> projector -> 2x2 max-pool -> row newlines per frame;
  frozen Whisper (encoders.py) per 30 s segment -> window-level Q-Former (qformer.py); the two
  interleaved frame by frame (paper Eq. 4-6) inside the Qwen2 chat prompt.
Each module's parameter names equal the Hugging Face ones below a prefix, so loading is renaming
(checkpoint.py).
"""
import hashlib
import json
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange

from engine import Engine, KVCache, Request, draw_noise, sample_next, trim
from encoders import CHUNK_LENGTH, SiglipVision, SiglipVisionConfig, WhisperConfig, WhisperEncoder, init_normal
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
    mrope_section: tuple = ()  # Qwen2.5-VL's M-RoPE (16, 24, 24): rotary frequencies per time, height, width; () plain RoPE

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
    """cos, sin of shape (..., T, head_dim) for the half-split rotation (rotate_half) of positions (..., T), in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (..., T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def mrope_cos_sin(position_ids, head_dim, theta, mrope_section, dtype):
    """M-RoPE (Qwen2-VL): position_ids (3, ..., T) of (time, height, width); the first mrope_section[0]
    rotary frequencies turn with time, the next mrope_section[1] with height, the rest with width
    -> cos, sin (..., T, head_dim) for the half-split rotation, computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=position_ids.device) / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # (3, ..., T, hd/2)
    freqs = torch.cat([part[i % 3] for i, part in enumerate(freqs.split(list(mrope_section), dim=-1))], dim=-1)  # (..., T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def grid_audio_counts(n_audio, n_grids, seconds_per_grid):
    """Audio tokens after each temporal grid's video tokens (2+ input assembly): grid t gets the audio of its
    own seconds, floor((t+1) s 2) - floor(t s 2) tokens at 2 tokens/s, and the last grid every token left,
    the padding of the last 30 s chunk included. The floors are taken as the video's temporal positions are
    (mrope_position_ids), so a grid's first audio token sits at the grid's own time; grids past the end of
    a short audio get none."""
    edges = (torch.arange(n_grids).view(-1, 1) * float(seconds_per_grid) * 2).long().flatten().clamp(max=n_audio).tolist()
    return [b - a for a, b in zip(edges, edges[1:])] + [n_audio - edges[-1]]


def av_placeholder_ids(tokens, grid_thw=None, second_per_grid=None, n_audio=None, merge=2):
    """The token ids that stand for one video and/or audio in the 2+ prompt (qwenvl/data/dataset.py):
    <|vision_start|>, then per temporal grid its h*w/4 video pads followed by its share of audio pads
    (grid_audio_counts), then <|vision_end|>; an audio-only item is start, n_audio audio pads, end.
    tokens: the special token ids from config.json."""
    video, audio = tokens["video_token_id"], tokens["audio_token_id"]
    body = [audio] * (n_audio or 0)
    if grid_thw is not None:
        t, h, w = (int(x) for x in grid_thw)
        counts = grid_audio_counts(n_audio, t, second_per_grid) if n_audio else [0] * t
        body = [x for n in counts for x in [video] * (h * w // merge ** 2) + [audio] * n]
    return [tokens["vision_start_token_id"]] + body + [tokens["vision_end_token_id"]]


def mrope_position_ids(input_ids, tokens, video_grid_thw=None, second_per_grid_ts=None, audio_lengths=None, merge=2):
    """(3, T) position ids of one sequence, by the rule of the authors' 2+ training code (rope2d.py), for
    text, audio-visual blocks (video and audio given), video-only blocks, or audio-only blocks:
      text: one position for all three rows, counting on from the previous block's largest position + 1;
      video grid t: (floor(t * s * 2), row, column) with s seconds per grid (2 units per second, the
        config's tokens_per_second ignored as the authors' code does);
      audio token k: (k, 0, k) inside an audio-visual block, (k, k, 0) in an audio-only block;
      the text after the last block starts at that block's largest *time* position + 1.
    All offset by the block's start. tokens: {"video_token_id", "audio_token_id"} from config.json."""
    ids = torch.as_tensor(input_ids).tolist()
    video, audio = tokens["video_token_id"], tokens["audio_token_id"]
    av = video_grid_thw is not None and audio_lengths is not None
    n_blocks = len(video_grid_thw) if video_grid_thw is not None else len(audio_lengths) if audio_lengths is not None else 0
    pieces, st, nxt = [], 0, 0
    for i in range(n_blocks):
        ed = ids.index(video if video_grid_thw is not None else audio, st)  # the block's first pad token
        pieces.append(torch.arange(ed - st).expand(3, -1) + nxt)  # the text before it (<|vision_start|> included)
        start = nxt + ed - st
        n_vid = n_aud = 0
        if video_grid_thw is not None:
            t, h, w = (int(x) for x in video_grid_thw[i])
            h, w = h // merge, w // merge
            s = 1.0 if second_per_grid_ts is None else float(second_per_grid_ts[i])
            # float32 arithmetic and truncation, exactly as the authors' expression computes it
            tt = (torch.arange(t).view(-1, 1).expand(-1, h * w) * s * 2).long().flatten()
            hh = torch.arange(h).view(1, -1, 1).expand(t, -1, w).flatten()
            ww = torch.arange(w).view(1, 1, -1).expand(t, h, -1).flatten()
            vid_pos, n_vid = torch.stack([tt, hh, ww]) + start, t * h * w
        if audio_lengths is not None:
            k = torch.arange(int(audio_lengths[i]))
            aud_pos = torch.stack([k, torch.zeros_like(k), k] if av else [k, k, torch.zeros_like(k)]) + start
            n_aud = len(k)
        block = torch.tensor(ids[ed:ed + n_vid + n_aud])
        pos = torch.zeros(3, len(block), dtype=torch.long)
        if n_vid:
            pos[:, block == video] = vid_pos
        if n_aud:
            pos[:, block == audio] = aud_pos
        pieces.append(pos)
        st = ed + n_vid + n_aud
        nxt = int(pos[0].max() if i == n_blocks - 1 and audio_lengths is not None else pos.max()) + 1
    pieces.append(torch.arange(len(ids) - st).expand(3, -1) + nxt)
    return torch.cat(pieces, dim=1)


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
        if cache is not None:  # a KV (concatenated) or one layer of an engine.KVCache (written in place)
            k, v = cache.update(k, v)
        if mask is not None and T == 1 and self.n_kv != self.n_head:
            # masked GQA would fall back to SDPA's math kernel, which copies each KV head for its query heads;
            # with one query per row, the heads sharing a KV head become that head's query rows instead
            y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv, -1, self.hd), k, v, attn_mask=mask)
            y = y.reshape(B, self.n_head, 1, self.hd)  # (B, nh, 1, hd)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=cache is None and T > 1,
                                               enable_gqa=self.n_kv != self.n_head)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.o_proj(y), KV(k, v)


class KV(NamedTuple):
    """One layer's keys and values from a forward pass, each (B or 1, n_kv, P, hd): the cache a later pass continues,
    every row at the same length P (training, scoring). engine.KVCache is the other kind: rows of their own lengths."""
    k: torch.Tensor
    v: torch.Tensor

    def positions(self, T):
        return torch.arange(self.k.size(2), self.k.size(2) + T, device=self.k.device)  # (T,)

    def mask(self, T):
        # SDPA's is_causal aligns to the top-left; after a prefix of P the diagonal sits P columns right
        P = self.k.size(2)
        return torch.ones(T, P + T, dtype=torch.bool, device=self.k.device).tril(P) if T > 1 else None

    def update(self, k, v):
        # a batch-1 prefix (one video) serves B continuations: expand is a view, and its
        # backward sums the B gradients into the one prefix
        pk, pv = (t.expand(k.size(0), -1, -1, -1) if t.size(0) == 1 else t for t in self)
        return torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2)  # (B, nkv, P+T, hd)


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
    """Qwen2 decoder. forward(idx) -> (logits, cache); a cache is a list of per-layer KV (k, v),
    each (B or 1, n_kv, T_past, head_dim), or an engine.KVCache."""

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # a tied head reads embed_tokens.weight, so there is nothing to load or tie for it
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.activation_checkpointing = False  # trade a second forward of each block for its activations
        init_normal(self)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu"):
        """Qwen2ForCausalLM, the released video-SALMONN 2, or either LLaVA-OneVision layout."""
        import checkpoint
        return checkpoint.load_qwen2(cls, path, dtype, device)

    def head(self, h):
        return F.linear(h, self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight)

    def hidden(self, embeds, cache=None, use_cache=False, position_ids=None):
        """Final-normed hidden states (B, T, C) of input embeddings; with use_cache also the per-layer KV. Positions
        and the attention mask continue the cache, a KV list (every row from its length) or a KVCache (each row
        from its own, written in place; the caller moves its lengths on); or positions are position_ids (3, B, T)
        of M-RoPE (time, height, width)."""
        T = embeds.size(1)
        mask = cache[0].mask(T) if cache else None
        if position_ids is None:
            pos = cache[0].positions(T) if cache else torch.arange(T, device=embeds.device)  # (T,), or (B, T) per row
            cos, sin = rope_cos_sin(pos, self.cfg.head_dim, self.cfg.rope_theta, embeds.dtype)
        else:
            cos, sin = mrope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.mrope_section, embeds.dtype)
        cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)  # (1, T, hd) or (B, 1, T, hd): one rotation for every head
        x, new_cache = embeds, []
        for i, block in enumerate(self.layers):
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():  # recompute in backward
                x, kv = torch.utils.checkpoint.checkpoint(block, x, cos, sin, cache[i] if cache else None, mask, use_reentrant=False)
            else:
                x, kv = block(x, cos, sin, cache[i] if cache else None, mask)
            if use_cache:
                new_cache.append(kv)
        return self.norm(x), (new_cache if use_cache else None)

    def forward(self, idx=None, embeds=None, cache=None, use_cache=False, position_ids=None):
        embeds = self.embed_tokens(idx) if embeds is None else embeds
        h, new_cache = self.hidden(embeds, cache, use_cache, position_ids)
        return self.head(h), new_cache

    @torch.no_grad()
    def generate(self, embeds, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, greedy=False,
                 stop_ids=(), generator=None, return_logprobs=False, position_ids=None):
        """Sample n continuations of one prompt (embeds (1, T, C)) sharing one prefill. Returns a list of n token
        lists (each ends at its first stop id, kept) and, when asked, each token's log-probability under the
        untempered model (n lists of floats). position_ids: the prompt's M-RoPE positions (3, 1, T); new tokens are
        text, counting on from the last. The one-prompt reference of engine.Engine, which decodes many prompts
        together and returns the same tokens: each step draws its noise (n, V) from the generator while a row lives."""
        h, prefix = self.hidden(embeds, use_cache=True, position_ids=position_ids)
        cache = KVCache(prefix, n, embeds.size(1) + max_new_tokens)
        shift = 0 if position_ids is None else int(position_ids[0, 0, -1]) + 1 - embeds.size(1)  # position - cache slot
        cache.fill(list(range(n)), prefix, shift)
        logits = self.head(h[:, -1]).float().expand(n, -1)  # (n, V): all n rows start from the one prefill
        dev, sampled = embeds.device, not (greedy or temperature == 0)
        temp, top = torch.full((n,), temperature, device=dev), torch.full((n,), top_p, device=dev)
        argmax_rows = torch.zeros(n, dtype=torch.bool, device=dev)  # sample_next's per-row greedy: none when sampled
        out, logps = [], []
        done = torch.zeros(n, dtype=torch.bool, device=dev)
        stop = torch.tensor(list(stop_ids), dtype=torch.long, device=dev)
        for _ in range(max_new_tokens):
            noise = draw_noise(n, logits.size(-1), generator, dev) if sampled else None
            tok = sample_next(logits, temp, top, argmax_rows, noise)  # (n,)
            out.append(tok)
            logps.append(torch.log_softmax(logits, dim=-1).gather(1, tok[:, None])[:, 0])
            done |= torch.isin(tok, stop)
            if done.all() or len(out) == max_new_tokens:
                break
            logits = self(tok[:, None], cache=cache)[0][:, -1].float()  # (n, V)
            cache.lens += 1
        rows, row_lps = (torch.stack(x, 1).tolist() if out else [[] for _ in range(n)] for x in (out, logps))
        seqs, lps = trim(rows, row_lps, stop_ids)
        return (seqs, lps) if return_logprobs else seqs


# -----------------------------------------------------------------------------
# the toy's alignment anchor (not in the paper)


def anchor_loss(tokens, targets, emb, blank, tau):
    """The aligner's tokens anchored to the frozen LLM's token embeddings: CTC (Graves et al., 2006) of each
    transcript's token ids, every audio token scored against every embedding by its squared distance over tau
    (silent windows take the blank token), plus VQ-VAE's commitment term, the squared distance to the nearest
    embedding, which goes on pulling a token onto its word after CTC has picked it.
    A large LLM reads whatever vectors its aligner learns through it; a tiny one trained in minutes reads only
    its own embeddings, and an aligner trained through it alone collapses onto one direction (dev/LOG.md).
    (B, N, V) distances in fp32: a toy's vocabulary, not a 7B model's.
    tokens: list of B (N_i, D) audio tokens; targets: list of B token-id lists (without the blank); emb: (V, D).
    Returns sums, to be averaged over the global batch: (CTC loss per target token summed over transcripts,
    squared distance to the nearest embedding summed over tokens, token count)."""
    n = [t.size(0) for t in tokens]
    x = torch.stack([F.pad(t.float(), (0, 0, 0, max(n) - t.size(0))) for t in tokens])  # (B, N, D)
    e = emb.detach().float()  # (V, D): the LLM stays as it is
    d2 = (x.square().sum(-1, keepdim=True) - 2 * x @ e.T + e.square().sum(-1)).clamp(min=0)  # (B, N, V)
    log_probs = (-d2 / tau).log_softmax(-1).transpose(0, 1)  # (N, B, V), CTC's layout
    flat = torch.tensor([i for t in targets for i in t], device=x.device)
    lengths = [len(t) for t in targets]
    ctc = F.ctc_loss(log_probs, flat, n, lengths, blank=blank, reduction="none", zero_infinity=True)  # (B,)
    real = torch.arange(max(n), device=x.device)[None] < torch.tensor(n, device=x.device)[:, None]  # (B, N)
    return (ctc / torch.tensor(lengths, device=x.device)).sum(), d2.min(-1).values[real].sum(), sum(n)


GROUP_OVERHEAD = 160  # padded positions one more forward costs, measured on 2 CPU cores (dev/LOG.md, session 8)


def length_groups(lengths, overhead=GROUP_OVERHEAD):
    """Indices of a batch's sequences, grouped so that right-padding each group to its longest wastes little:
    sorted by length and cut where the padded positions saved outweigh `overhead`. A mixed batch (1 s sounds
    beside 20 s clips) pads a third of its positions in one forward; the groups' summed losses are the same."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best, cut = [0] + [math.inf] * n, [0] * (n + 1)  # best[j]: cheapest cost of the j shortest; cut[j]: its last group's start
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + lengths[order[j - 1]] * (j - i) + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def grouped_nll(padded_nll, seqs, overhead):
    """padded_nll (one right-padded forward of some sequences -> (summed NLL, token count)) over each length group
    of seqs (each an embeds (1, L, D) first), summed."""
    nll, count = 0.0, 0
    for group in length_groups([s[0].size(1) for s in seqs], overhead):
        part_nll, part_count = padded_nll([seqs[i] for i in group])
        nll, count = nll + part_nll, count + part_count
    return nll, count


# -----------------------------------------------------------------------------
# video-SALMONN 2: the audio-visual model

# openai/whisper-large-v3's encoder, whose config the released checkpoint does not carry
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
    snap_audio: bool = False  # toy: each aligner token read as its nearest word (see snap); not in the paper

    @property
    def tokens_per_frame(self):  # 13 * 13 + 13 newlines = 182 for so400m at 384 px
        h = self.vision.grid // self.pool
        return h * (h + 1)

    @property
    def audio_tokens_per_second(self):  # 60 tokens / 30 s = 2
        return self.qformer.tokens_per_segment / self.segment_seconds

    def media_prep(self, fps, max_frames):
        """The settings of data.load_media for this model (they key the feature cache too)."""
        return dict(fps=fps, max_frames=max_frames, image_size=self.vision.image_size, n_mels=self.whisper.num_mel_bins,
                    segment_seconds=self.segment_seconds)

    def to_dict(self):
        return {"llm": vars(self.llm), "vision": vars(self.vision), "whisper": vars(self.whisper),
                "qformer": vars(self.qformer), "pool": self.pool, "segment_seconds": self.segment_seconds,
                "time_aligned": self.time_aligned, "snap_audio": self.snap_audio}

    @staticmethod
    def from_dict(d):
        return AVConfig(Qwen2Config(**d["llm"]), SiglipVisionConfig(**d["vision"]), WhisperConfig(**d["whisper"]),
                        QFormerConfig(**d["qformer"]), d["pool"], d["segment_seconds"], d["time_aligned"],
                        d.get("snap_audio", False))


class VideoSALMONN2(nn.Module):
    """The audio-visual LLM (paper Fig. 1). Frames -> frozen SigLIP -> projector -> pooled tokens with
    row newlines; audio -> frozen Whisper per segment -> window-level Q-Former; the two interleaved
    frame by frame and put in place of the <image> placeholder of the Qwen2 chat prompt. The frozen
    encoders' outputs are what the feature cache stores (encode); everything after them trains."""
    group_overhead = GROUP_OVERHEAD  # response_nll's length groups; training.py sets it per run

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
        x = rearrange(x, "f (h w) d -> f d h w", h=math.isqrt(x.size(1)))
        x = rearrange(F.max_pool2d(x, self.cfg.pool), "f d h w -> f h w d")  # h = w = g // pool, a partial window dropped
        Fn, h, _, D = x.shape
        x = torch.cat([x, self.image_newline.to(x.dtype).expand(Fn, h, 1, D)], dim=2)  # (F, h, h+1, D)
        return rearrange(x, "f h w d -> f (h w) d")  # row by row, each row ending with its newline

    def interleave(self, vis, aud, frame_times, duration):
        """Frame i's visual tokens, then its slice of audio tokens (paper Eq. 4-6) -> (L, D).

        Default, as the paper and the released model: all audio tokens, the padding of the last
        segment included, are spread evenly over the n frames (stretched by nearest-neighbour
        interpolation to a multiple of n), so timing drifts unless the duration is a multiple of 30 s.
        time_aligned: frame i gets only the tokens whose time falls in [t_i, t_{i+1}), and the tokens
        past the end of the audio (segment padding) are dropped."""
        n = vis.size(0)
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
        front = rearrange(front, "(n k) d -> n k d", n=n)  # k audio tokens for each frame
        return torch.cat([rearrange(torch.cat([vis, front], dim=1), "n t d -> (n t) d"), back])

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
        if aud_feats is not None:
            aud_feats = self.audio_tokens(aud_feats)
        if vis_feats is None:  # audio only, or nothing (a text-only item)
            return self.image_newline.new_zeros(0, self.cfg.llm.hidden_size) if aud_feats is None else aud_feats
        vis = self.visual_tokens(vis_feats)
        if aud_feats is None:
            return vis.reshape(-1, vis.size(-1))
        return self.interleave(vis, aud_feats.to(vis.dtype), frame_times, duration)

    def audio_tokens(self, aud):
        """Whisper features (S, frames, C) -> the aligner's tokens (S * T, D); or a written soundtrack, token ids (S, T)
        (data.soundtrack_ids: the toy LLM's stand-in for reading text, training.py's written_audio) -> their
        embeddings, with the segment embedding the aligner's tokens carry."""
        if not aud.is_floating_point():
            return self.audio.add_segments(self.llm.embed_tokens(aud))
        return self.snap(self.audio(aud))

    def unsegmented(self, x):
        """Aligner tokens (S * T, D) with their segment embedding taken off: what the toy's anchor, snap and start
        compare to the LLM's word embeddings, so that a token of any segment can reach its word."""
        return self.audio.add_segments(rearrange(x, "(s t) d -> s t d", t=self.cfg.qformer.tokens_per_segment), -1)

    @torch.no_grad()
    def start_aligner_on(self, token_id, whisper_feats):
        """Toy (anchor): shift the aligner's last bias so that its mean token over whisper_feats (a list of (S, T, Ca)
        Whisper features), the segment embedding left out, is the embedding of token_id, the anchor's blank: CTC's
        usual start, every window silent, the words then rising out of it one by one. A fresh Q-Former's tokens are
        one vector whatever it hears; left where that lands, between every word and far from the blank, 600 steps
        did not leave it on one toy world (dev/LOG.md, session 9)."""
        was_training = self.audio.training
        self.audio.eval()  # no dropout: the mean of the network as it will be read
        bare = torch.cat([self.unsegmented(self.audio(f)) for f in whisper_feats])  # (N, D)
        self.audio.train(was_training)
        last = self.audio.final_linear[-1] if self.cfg.qformer.final_linear else self.audio.speech_llama_proj
        last.bias += (self.llm.embed_tokens.weight[token_id].float() - bare.float().mean(0)).to(last.bias.dtype)

    def snap(self, x):
        """Toy (snap_audio): aligner tokens (S * T, D) -> the embedding of each one's nearest token, the segment
        embedding kept; the gradient passes straight through to the aligner, as VQ-VAE's (van den Oord et al., 2017).
        With snap_audio off (every real model), x as it is.
        The toy LLM reads its own embeddings and little between them: the anchored aligner's tokens name the right
        word (WER 0.3) yet a caption states 5 % of the speech, 41 % once snapped (dev/LOG.md, session 7).
        A real LLM reads its aligner's vectors as they are."""
        if not self.cfg.snap_audio:
            return x
        T = self.cfg.qformer.tokens_per_segment
        bare = self.unsegmented(x)  # (S * T, D)
        emb = self.llm.embed_tokens.weight.detach()
        words = emb[torch.cdist(bare.float(), emb.float()).argmin(-1)].to(x.dtype)  # (S * T, D)
        q = self.audio.add_segments(rearrange(words, "(s t) d -> s t d", t=T))
        return x + (q - x).detach()

    def embed_sequence(self, feats, prompt_ids, response_ids, av=None):
        """One training sequence: (embeds (1, P + R, D), P) for the prompt around the AV block (av, or made from
        feats), then the response."""
        av = self.av_tokens(*feats) if av is None else av
        prefix = self.prompt_embeds(prompt_ids[0], av, prompt_ids[1])
        response = self.llm.embed_tokens(torch.tensor(response_ids, device=prefix.device))[None]
        return torch.cat([prefix, response.to(prefix.dtype)], dim=1), prefix.size(1)

    def forward(self, batch, transcripts=None, blank=0, tau=0.01):
        """Training: batch = [(features, (before, after) prompt ids, response ids)] -> (summed response NLL,
        token count). Going through forward lets FSDP gather the root's parameters (projector, aligner,
        embeddings) once for the whole step. With transcripts (an example's transcript ids, or None) it also returns
        anchor_loss's sums over the audio-only examples that have one, and their count."""
        # audio-only items' aligner tokens as they come, before any snap: what the anchor pulls
        heard = [self.audio(f[1]) if f[0] is None and f[1] is not None and f[1].is_floating_point() else None
                 for f, _, _ in batch]
        avs = [self.av_tokens(*f) if x is None else self.snap(x) for x, (f, _, _) in zip(heard, batch)]
        nll = self.response_nll([(*self.embed_sequence(None, p, r, av), r) for av, (_, p, r) in zip(avs, batch)])
        if transcripts is None:
            return nll
        pairs = [(x, t) for x, t in zip(heard, transcripts) if t and x is not None]
        if not pairs:
            return nll, (nll[0] * 0, nll[0] * 0, 0), 0
        # anchored without the segment embedding, so a token of any segment can reach its word
        bare = [self.unsegmented(x) for x, _ in pairs]
        return nll, anchor_loss(bare, [t for _, t in pairs], self.llm.embed_tokens.weight, blank, tau), len(pairs)

    def response_nll(self, seqs):
        """Summed negative log-likelihood of the responses, and their token count, for a list of
        (embeds (1, L, D), prefix length P, response ids): a forward per group of similar lengths (length_groups)."""
        return grouped_nll(self.padded_nll, seqs, self.group_overhead)

    def padded_nll(self, seqs):
        """response_nll of sequences right-padded into one forward. The LM head runs on the response positions
        only, never over the thousands of video tokens."""
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

    def prefix(self, feats, prompt_ids):
        """The LLM input of one video's cached features (vision, audio, frame times, duration) inside the prompt's
        (before, after) token ids: (embeds (1, P, D), None: plain positions)."""
        dt = self.llm.embed_tokens.weight.dtype  # cached features may be fp32 where the model runs in bf16
        vis, aud, times, duration = feats
        if aud is not None and aud.is_floating_point():  # not a written soundtrack's token ids
            aud = aud.to(dt)
        feats = (None if vis is None else vis.to(dt), aud, times, duration)
        return self.prompt_embeds(prompt_ids[0], self.av_tokens(*feats), prompt_ids[1]), None

    @torch.no_grad()
    def sample(self, feats, prompt_ids, n=1, **generate_kw):
        """n captions of one video alone (the reference of generate); generate_kw as Qwen2.generate."""
        embeds, pos = self.prefix(feats, prompt_ids)
        return self.llm.generate(embeds, n=n, position_ids=pos, **generate_kw)

    def stream(self, examples, n=1, generators=None, batch=0, **generate_kw):
        """n samples for each of many videos, decoding together (engine.py, `batch` rows; 0: its default): yields
        (index, samples) as each video's samples finish. examples: (features, prompt ids) as sample takes them, any
        iterable, read only as rows free up; generators: one torch.Generator per example (its sampling draws) or
        None. Each video's samples are what sample returns for it alone with its generator. Both families use it:
        all it needs of the model is prefix and llm."""
        def requests():
            for k, (feats, prompt_ids) in enumerate(examples):
                embeds, pos = self.prefix(feats, prompt_ids)
                yield Request(embeds, n, generator=generators[k] if generators else None, position_ids=pos, **generate_kw)
        return Engine(self.llm, batch).run(requests())

    def generate(self, examples, n=1, generators=None, batch=0, **generate_kw):
        """stream's samples, a list per example in order."""
        out = dict(self.stream(examples, n, generators, batch, **generate_kw))
        return [out[k] for k in range(len(out))]

    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu"):
        """A checkpoint in the released video-SALMONN 2 layout (ours carry their full config)."""
        import checkpoint  # checkpoint.py builds the classes of this file: imported when called, not at the top
        return checkpoint.load_video_salmonn2(cls, path, dtype, device)

    @classmethod
    def from_base(cls, llava_path, whisper_path, qformer_cfg=None, dtype=None, device="cpu"):
        """The starting point of audio alignment: LLaVA-OneVision (either layout) and a Whisper
        checkpoint, with a fresh audio aligner."""
        import checkpoint
        return checkpoint.load_base(cls, llava_path, whisper_path, qformer_cfg, dtype, device)

    def encoder_parameters(self):
        """The frozen encoders (paper 3.2: they never train); FSDP leaves them whole on every rank."""
        return list(self.tower.parameters()) + list(self.speech_encoder.parameters())

    def freeze_encoders(self):
        for p in self.encoder_parameters():
            p.requires_grad_(False)
        return self

    def save_pretrained(self, path, state=None, max_shard_bytes=None):
        """config.json and safetensors in the released layout; state: our {name: tensor} when it is not
        self.state_dict() (gathered from FSDP shards, say)."""
        import checkpoint
        checkpoint.save_video_salmonn2(self, path, state, max_shard_bytes)
