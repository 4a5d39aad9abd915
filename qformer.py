"""
The window-level Q-Former audio aligner of video-SALMONN 2, as the released 7B model has it.

Each 30 s segment's Whisper features (1500 frames, 50 per second) are cut into 60 windows of 0.5 s;
one learned query per window cross-attends to its 25 frames through a 2-layer BERT Q-Former (LAVIS,
query path only), and is projected to the LLM width: 60 audio tokens per segment. A fixed
sinusoidal embedding of the segment index is added to every token of the segment (paper Eq. 1-3).
Parameter names equal the released checkpoint's keys (speech_Qformer.bert..., speech_query_tokens,
ln_speech, speech_llama_proj, final_linear), so loading is renaming by prefix.

WhisperQFormer is video-SALMONN 2+'s audio branch: the same Q-Former body built into the Whisper encoder.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from encoders import WhisperEncoder


@dataclass
class QFormerConfig:
    encoder_width: int = 1280  # Whisper large-v3 d_model
    hidden: int = 768  # the BERT sizes are bert-base-uncased's (its weights are not used)
    heads: int = 12
    intermediate: int = 3072
    layers: int = 2
    num_query: int = 1  # queries per window
    window: int = 25  # encoder frames per window (0.5 s); the stride equals it, so windows do not overlap
    frames_per_segment: int = 1500  # Whisper frames per 30 s segment
    llm_dim: int = 3584  # Qwen2-7B hidden size
    dropout: float = 0.1  # BERT's hidden and attention-probability dropout
    final_linear: bool = True  # the released model adds Linear-GELU-Linear after speech_llama_proj
    ln_eps: float = 1e-12  # BERT's LayerNorm eps (ln_speech keeps PyTorch's 1e-5)

    @property
    def tokens_per_segment(self):  # 1500 // 25 * 1 = 60
        return self.frames_per_segment // self.window * self.num_query


def segment_positions(n, dim):
    """The released segment embedding (n, dim): row 0 is zeros, row j >= 1 is the sin/cos of
    position j - 1, interleaved (even channels sin, odd cos). The release tabulates 201 rows
    (max_len 200 plus the zero row); later rows follow the same formula."""
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float) * -(math.log(10000.0) / dim))  # (dim/2,)
    angle = torch.arange(n - 1, dtype=torch.float)[:, None] * div[None, :]  # (n-1, dim/2)
    pe = torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(1)  # (n-1, dim): sin, cos, sin, ...
    return torch.cat([torch.zeros(1, dim), pe])  # (n, dim)


class QFormerAttention(nn.Module):
    """BERT attention with its post-LN output: LayerNorm(x + dense(attend(x, ctx))).
    Self-attention when ctx is x; cross-attention reads ctx of width ctx_dim."""

    def __init__(self, cfg: QFormerConfig, ctx_dim):
        super().__init__()
        self.n_head, self.p = cfg.heads, cfg.dropout
        self.self = nn.ModuleDict(dict(query=nn.Linear(cfg.hidden, cfg.hidden), key=nn.Linear(ctx_dim, cfg.hidden),
                                       value=nn.Linear(ctx_dim, cfg.hidden)))
        self.output = nn.ModuleDict(dict(dense=nn.Linear(cfg.hidden, cfg.hidden),
                                         LayerNorm=nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)))

    def forward(self, x, ctx):
        B, T, C = x.shape
        S, hd = ctx.size(1), C // self.n_head
        q = self.self.query(x).view(B, T, self.n_head, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.self.key(ctx).view(B, S, self.n_head, hd).transpose(1, 2)  # (B, nh, S, hd)
        v = self.self.value(ctx).view(B, S, self.n_head, hd).transpose(1, 2)  # (B, nh, S, hd)
        # bidirectional: the release calls the BERT body without a decoder mask, and every frame is real
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        out = self.output
        return out.LayerNorm(x + F.dropout(out.dense(y), self.p, self.training))


class QFormerLayer(nn.Module):
    """Self-attention over the queries, cross-attention to the window, the query FFN (post-LN).
    The text FFN (intermediate, output) is never run on queries and is not in the release."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.p = cfg.dropout
        self.attention = QFormerAttention(cfg, cfg.hidden)
        self.crossattention = QFormerAttention(cfg, cfg.encoder_width)
        self.intermediate_query = nn.ModuleDict(dict(dense=nn.Linear(cfg.hidden, cfg.intermediate)))
        self.output_query = nn.ModuleDict(dict(dense=nn.Linear(cfg.intermediate, cfg.hidden),
                                               LayerNorm=nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)))

    def forward(self, x, frames):
        x = self.crossattention(self.attention(x, x), frames)
        h = F.gelu(self.intermediate_query.dense(x))  # BERT's "gelu" is the exact erf form
        out = self.output_query
        return out.LayerNorm(x + F.dropout(out.dense(h), self.p, self.training))


class QFormer(nn.Module):
    """The BERT body: queries (N, Q, hidden) and their windows (N, T, encoder_width) -> (N, Q, hidden).
    The release deleted the word and position embeddings: the embedding layer is a LayerNorm."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.p = cfg.dropout
        self.embeddings = nn.ModuleDict(dict(LayerNorm=nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)))
        self.encoder = nn.ModuleDict(dict(layer=nn.ModuleList(QFormerLayer(cfg) for _ in range(cfg.layers))))

    def forward(self, query, frames):
        x = F.dropout(self.embeddings.LayerNorm(query), self.p, self.training)
        for layer in self.encoder.layer:
            x = layer(x, frames)
        return x


class AudioAligner(nn.Module):
    """Whisper features of one video's 30 s segments (S, frames_per_segment, encoder_width)
    -> audio tokens (S * tokens_per_segment, llm_dim), segment by segment in order."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.ln_speech = nn.LayerNorm(cfg.encoder_width)
        self.speech_Qformer = nn.ModuleDict(dict(bert=QFormer(cfg)))
        self.speech_query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query, cfg.hidden).normal_(std=0.02))
        D = cfg.llm_dim
        self.speech_llama_proj = nn.Linear(cfg.hidden, D)
        self.final_linear = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, D)) if cfg.final_linear else nn.Identity()
        # LAVIS initialises the BERT body as BERT does; the release leaves the projections at PyTorch's default
        for m in self.speech_Qformer.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def query_states(self, encoder_out):
        """(S, T, encoder_width) -> the Q-Former output (S * T // window, num_query, hidden), before projection."""
        S, T, C = encoder_out.shape
        assert C == self.cfg.encoder_width, f"expected width {self.cfg.encoder_width}, got {C}"
        w = self.cfg.window
        n = T // w  # the release's F.unfold drops a trailing partial window
        x = self.ln_speech(encoder_out[:, :n * w])
        x = rearrange(x, "s (n w) c -> (s n) w c", w=w)  # the windows: with stride == kernel, the release's unfold
        query = self.speech_query_tokens.expand(S * n, -1, -1)  # (S*n, Q, hidden): the same queries in every window
        return self.speech_Qformer.bert(query, x)

    def forward(self, encoder_out):
        S = encoder_out.size(0)
        x = self.final_linear(self.speech_llama_proj(self.query_states(encoder_out)))  # (S*n, Q, D)
        return self.add_segments(rearrange(x, "(s n) q d -> s (n q) d", s=S))  # each segment's windows' queries, in order

    @staticmethod
    def add_segments(x, sign=1):
        """(S, T, D) tokens -> (S*T, D) with the segment embedding added (sign -1: taken off again). Not learned, added
        after the projection: it tells the LLM which 30 s segment a token is in."""
        S = x.size(0)
        pos = segment_positions(S, x.size(-1)).to(x.device, x.dtype)[:, None, :]  # (S, 1, D)
        return rearrange(x + sign * pos, "s t d -> (s t) d")


# -----------------------------------------------------------------------------
# video-SALMONN 2+: the Q-Former inside the Whisper encoder (qwenvl/model/modeling_whisper.py)
#
# Parameter names are the released 2+ checkpoints' below `audio.`: Whisper's own (conv1, conv2, embed_positions,
# layers.N, layer_norm), then qformer.bert.* (the same BERT body as above), q_tokens and audio_proj. Against
# the 2+ model above there is no ln_speech (the windows read Whisper's final layer_norm output), no
# final_linear and no segment position embedding: a token's time is carried by M-RoPE instead.


def qformer_plus_config(audio_config, llm_dim=None):
    """A QFormerConfig from a 2+ config.json's audio_config (its qformer_config holds the BERT sizes; the
    released checkpoints are a "larger" Q-Former than v1's, so every size is read, never assumed)."""
    q = audio_config.get("qformer_config") or {}
    width = audio_config.get("d_model", 1280)
    frames = audio_config.get("max_source_positions", 1500)
    # the authors' kernel and stride, round(1500 * seconds / 30): 1500 is every Whisper's frames per 30 s
    window = round(frames * audio_config.get("second_per_window", 0.5) / 30.0)
    stride = round(frames * audio_config.get("second_stride", 0.5) / 30.0)
    if stride != window or q.get("cross_attention_freq", 1) != 1 or q.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"unsupported 2+ audio config: window {window}, stride {stride}, "
                         f"cross_attention_freq {q.get('cross_attention_freq')}, hidden_act {q.get('hidden_act')}")
    return QFormerConfig(encoder_width=q.get("encoder_width", width), hidden=q.get("hidden_size", 3072),
                         heads=q.get("num_attention_heads", 12), intermediate=q.get("intermediate_size", 12288),
                         layers=q.get("num_hidden_layers", 2), num_query=q.get("query_length", 1), window=window,
                         frames_per_segment=frames, llm_dim=llm_dim or q.get("out_hidden_size", 3584),
                         dropout=q.get("hidden_dropout_prob", 0.1), final_linear=False,
                         ln_eps=q.get("layer_norm_eps", 1e-12))


class WhisperQFormer(WhisperEncoder):
    """audio.* of video-SALMONN 2+: log-mel of S 30 s chunks (S, n_mels, 3000) -> Whisper (frozen) ->
    windows of 0.5 s -> one learned query each through the BERT Q-Former -> audio_proj
    -> (S, tokens_per_segment, llm_dim), 60 tokens per chunk with the released config."""

    def __init__(self, whisper_cfg, cfg: QFormerConfig):
        super().__init__(whisper_cfg)
        assert cfg.encoder_width == whisper_cfg.d_model, f"Q-Former reads width {cfg.encoder_width}, Whisper gives {whisper_cfg.d_model}"
        self.qcfg = cfg
        self.qformer = nn.ModuleDict(dict(bert=QFormer(cfg)))
        self.q_tokens = nn.Parameter(torch.zeros(1, cfg.num_query, cfg.hidden))
        self.audio_proj = nn.Linear(cfg.hidden, cfg.llm_dim)
        self.init_aligner()

    @torch.no_grad()
    def init_aligner(self):
        """A fresh Q-Former, q_tokens and audio_proj, as the authors' _init_weights and gen_audio_model.py make
        them: every Linear N(0, 0.02) with zero bias, LayerNorms one and zero, q_tokens N(0, 0.02)."""
        for m in list(self.qformer.modules()) + [self.audio_proj]:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.q_tokens.normal_(std=0.02)

    def features(self, mel):
        """The frozen, cacheable part: Whisper's output (S, 1500, d_model) after its final layer_norm."""
        return super().forward(mel)

    def tokens(self, feats):
        """Whisper features (S, T, d_model) -> audio tokens (S, T // window * num_query, llm_dim)."""
        S, T, _ = feats.shape
        w = self.qcfg.window
        n = T // w  # the authors' F.unfold drops a trailing partial window
        x = rearrange(feats[:, :n * w], "s (n w) c -> (s n) w c", w=w)  # the windows: with stride == kernel, their unfold
        q = self.qformer.bert(self.q_tokens.expand(S * n, -1, -1), x)  # (S*n, Q, hidden)
        return rearrange(self.audio_proj(q), "(s n) q d -> s (n q) d", s=S)

    def forward(self, mel):
        return self.tokens(self.features(mel))
