"""
The frozen encoders of video-SALMONN 2, in plain PyTorch, their parameter names equal to Hugging Face's:

- WhisperEncoder: the audio encoder of Whisper (conv stem, sinusoidal positions, pre-LN blocks); 30 s of
  log-mel in, 1500 frames of 20 ms out.
- SiglipVision: the SigLIP tower, returning the last kept layer before post-layernorm (LLaVA-OneVision
  runs 26 of so400m's 27 layers).
- Qwen25Vision: the Qwen2.5-VL ViT of video-SALMONN 2+ (3D patches, 2D RoPE, window attention, the 2 x 2
  merger to the LLM width); its merger trains in 2+, its blocks do not.
Whisper and SigLIP are frozen in every stage (paper 3.2); their outputs are what the feature cache stores.
Loading is in checkpoint.py (the classmethods here call it).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


def init_normal(module, std=0.02):
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
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
        init_normal(self)
        self.embed_positions.weight.data.copy_(sinusoids(cfg.max_source_positions, cfg.d_model))
        self.embed_positions.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu"):
        """WhisperForConditionalGeneration or WhisperModel; the decoder is not loaded."""
        import checkpoint  # checkpoint.py builds these classes: imported here, not at the top
        return checkpoint.load_whisper(cls, path, dtype, device)

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
        init_normal(self)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu", keep_layers=None):
        """SiglipVisionModel, SiglipModel (vision half), or either LLaVA-OneVision layout."""
        import checkpoint
        return checkpoint.load_siglip(cls, path, dtype, device, keep_layers)

    def forward(self, pixels):
        x = self.embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, N, C)
        x = x + self.embeddings.position_embedding.weight
        for block in self.encoder.layers:
            x = block(x)
        return x



# -----------------------------------------------------------------------------
# Qwen2.5-VL vision transformer (video-SALMONN 2+)


@dataclass
class Qwen25VisionConfig:  # field names are transformers' Qwen2_5_VLVisionConfig's; defaults Qwen2.5-VL-7B-Instruct's
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112  # pixels per attention window side: 4 x 4 merged tokens
    fullatt_block_indexes: tuple = (7, 15, 23, 31)  # the blocks that attend over the whole frame
    out_hidden_size: int = 3584  # the LLM width (2048 for 3B, 8192 for 72B)
    rope_theta: float = 10000.0

    @property
    def head_dim(self):
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self):  # one flattened patch of pixel_values: C x temporal x patch x patch
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()  # normalise in fp32, scale in the input dtype, as the reference does
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotate_half_apply(x, cos, sin):
    """RoPE with the half-split rotation, in fp32, back in x's dtype; x (N, nh, hd), cos/sin (N, hd)."""
    xf, c, s = x.float(), cos[:, None].float(), sin[:, None].float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * c + torch.cat((-x2, x1), dim=-1) * s).to(x.dtype)


def segment_attention(q, k, v, lengths):
    """Bidirectional attention within consecutive segments of a packed sequence: q, k, v (N, nh, hd),
    lengths summing to N. Segments are padded to the longest into one batch (windows are at most
    window^2 patches, frames all the same size), the padding masked out as keys."""
    N, nh, hd = q.shape
    S, L = len(lengths), max(lengths)
    lens = torch.tensor(lengths, device=q.device)
    starts = torch.cumsum(lens, 0) - lens
    seg = torch.repeat_interleave(torch.arange(S, device=q.device), lens)  # (N,) segment of each token
    slot = seg * L + torch.arange(N, device=q.device) - starts[seg]  # (N,) its place in the padded (S, L) layout
    pad = lambda t: t.new_zeros(S * L, nh, hd).index_copy(0, slot, t).view(S, L, nh, hd).transpose(1, 2)  # (S, nh, L, hd)
    mask = (torch.arange(L, device=q.device)[None] < lens[:, None])[:, None, None, :]  # (S, 1, 1, L) real keys
    y = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask)  # (S, nh, L, hd)
    return y.transpose(1, 2).reshape(S * L, nh, hd)[slot]  # (N, nh, hd)


class VisionAttention(nn.Module):
    def __init__(self, cfg: Qwen25VisionConfig):
        super().__init__()
        self.n_head = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, cos, sin, lengths):
        N, C = x.shape
        q, k, v = self.qkv(x).view(N, 3, self.n_head, C // self.n_head).unbind(1)  # each (N, nh, hd)
        q, k = rotate_half_apply(q, cos, sin), rotate_half_apply(k, cos, sin)
        return self.proj(segment_attention(q, k, v, lengths).reshape(N, C))


class VisionBlock(nn.Module):
    def __init__(self, cfg: Qwen25VisionConfig):
        super().__init__()
        C, H = cfg.hidden_size, cfg.intermediate_size
        self.norm1 = RMSNorm(C)
        self.attn = VisionAttention(cfg)
        self.norm2 = RMSNorm(C)
        self.mlp = nn.ModuleDict(dict(gate_proj=nn.Linear(C, H), up_proj=nn.Linear(C, H), down_proj=nn.Linear(H, C)))

    def forward(self, x, cos, sin, lengths):
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        h = self.norm2(x)
        return x + self.mlp.down_proj(F.silu(self.mlp.gate_proj(h)) * self.mlp.up_proj(h))


class PatchMerger(nn.Module):
    """Each 2 x 2 block of neighbouring patches (adjacent in the patch order) -> one LLM token."""

    def __init__(self, cfg: Qwen25VisionConfig):
        super().__init__()
        self.dim = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.ln_q = RMSNorm(cfg.hidden_size)
        self.mlp = nn.Sequential(nn.Linear(self.dim, self.dim), nn.GELU(), nn.Linear(self.dim, cfg.out_hidden_size))

    def forward(self, x):
        return self.mlp(self.ln_q(x).view(-1, self.dim))  # (N / 4, out_hidden_size)


class Qwen25Vision(nn.Module):
    """The Qwen2.5-VL ViT and its merger: pixel_values (N, patch_dim) of videos whose patch grids are
    grid_thw (n, 3), patches in the processor's order (per temporal grid, 2 x 2 merge blocks row by row)
    -> LLM tokens (N / 4, out_hidden_size) in the same order. Parameter names are those below `visual.`."""

    def __init__(self, cfg: Qwen25VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.ModuleDict(dict(proj=nn.Conv3d(
            cfg.in_channels, cfg.hidden_size, (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size),
            stride=(cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size), bias=False)))
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        self.activation_checkpointing = False
        init_normal(self)

    def rope(self, grid_thw):
        """cos, sin (N, head_dim) of each patch: half the rotary dims for its row, half for its column."""
        m, d = self.cfg.spatial_merge_size, self.cfg.head_dim // 2
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))  # (d/2,)
        pos = []
        for t, h, w in grid_thw.tolist():
            hw = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"))  # (2, h, w)
            hw = hw.view(2, h // m, m, w // m, m).permute(0, 1, 3, 2, 4).reshape(2, -1)  # (2, h*w) in merge-block order
            pos.append(hw.repeat(1, t))
        freqs = torch.cat(pos, 1).T[..., None].float() * inv_freq  # (N, 2, d/2)
        emb = freqs.flatten(1).repeat(1, 2)  # (N, head_dim): [h freqs, w freqs] twice
        return emb.cos(), emb.sin()

    def windows(self, grid_thw):
        """The window order of the merged tokens and the window lengths (in patches). Each frame's merged
        grid is cut into windows of window_size pixels from the top-left (edge windows are smaller);
        attention runs within a window except in the full-attention blocks."""
        m = self.cfg.spatial_merge_size
        ws = self.cfg.window_size // m // self.cfg.patch_size  # merged tokens per window side
        order, lengths, offset = [], [], 0
        for t, h, w in grid_thw.tolist():
            gh, gw = h // m, w // m
            nh, nw = -(-gh // ws), -(-gw // ws)
            idx = F.pad(torch.arange(t * gh * gw).view(t, gh, gw), (0, nw * ws - gw, 0, nh * ws - gh), value=-1)
            idx = idx.view(t, nh, ws, nw, ws).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, ws * ws)  # (windows, ws*ws)
            real = idx >= 0
            order.append(idx[real] + offset)
            lengths += [n * m * m for n in real.sum(1).tolist() if n]
            offset += t * gh * gw
        return torch.cat(order), lengths

    def forward(self, pixel_values, grid_thw):
        return self.merger(self.features(pixel_values, grid_thw))

    def features(self, pixel_values, grid_thw):
        """The frozen part (patch embedding and blocks) -> (N, hidden_size) in the processor's patch order: what
        the merger, which trains, reads, and so what a feature cache keeps."""
        cfg, unit = self.cfg, self.cfg.spatial_merge_size ** 2
        x = F.linear(pixel_values.to(self.merger.ln_q.weight.dtype), self.patch_embed.proj.weight.flatten(1))  # (N, C): the Conv3d, kernel = stride = patch
        N, C = x.shape
        cos, sin = self.rope(grid_thw)
        order, window_lengths = self.windows(grid_thw)
        # windows gather whole 2 x 2 merge blocks, so the permutation moves groups of `unit` patches
        permute = lambda t: t.view(N // unit, unit, -1)[order.to(t.device)].view(N, -1)
        x, cos, sin = permute(x), permute(cos.to(x.device)), permute(sin.to(x.device))
        frame_lengths = [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]  # a frame's windows stay contiguous
        for i, block in enumerate(self.blocks):
            lengths = frame_lengths if i in cfg.fullatt_block_indexes else window_lengths
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, lengths, use_reentrant=False)
            else:
                x = block(x, cos, sin, lengths)
        # back in the processor's order; the merger reads each merge block alone, so it may come before or after
        return x.view(N // unit, unit, C)[torch.argsort(order).to(x.device)].view(N, C)
