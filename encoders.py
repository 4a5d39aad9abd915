"""
The frozen encoders of video-SALMONN 2, in plain PyTorch, their parameter names equal to Hugging Face's:

- WhisperEncoder: the audio encoder of Whisper (conv stem, sinusoidal positions, pre-LN blocks); 30 s of
  log-mel in, 1500 frames of 20 ms out.
- SiglipVision: the SigLIP tower, returning the last kept layer before post-layernorm (LLaVA-OneVision
  runs 26 of so400m's 27 layers).
Both are frozen in every stage (paper 3.2); their outputs are what the feature cache stores.
Loading is in checkpoint.py (the classmethods here call it).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


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

