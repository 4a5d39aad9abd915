"""
video-SALMONN 2+ in plain PyTorch (paper Appendix A): Qwen2.5-VL, the Qwen2 LLM with M-RoPE and the ViT of
encoders.py, plus the Whisper encoder with the Q-Former inside (qformer.py), as the authors'
video_SALMONN2_plus. Parameter names are the released checkpoints' (model.* -> llm.*, lm_head, visual.*,
audio.*), so loading is renaming (checkpoint.py).

The video's tokens and the audio's go where the prompt holds <|video_pad|> and <|audio_pad|> (per temporal
grid, its video tokens then its seconds of audio: model.av_placeholder_ids), and every token gets the
three M-RoPE positions of the authors' *training* rule (model.mrope_position_ids), at inference too: the
authors' inference.py drops audio_lengths and second_per_grid_ts and so falls back to vision-only positions
that the checkpoints were never trained with.
"""
import hashlib
import json
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from encoders import Qwen25Vision, Qwen25VisionConfig, WhisperConfig
from model import GROUP_OVERHEAD, Qwen2, Qwen2Config, VideoSALMONN2, av_placeholder_ids, grouped_nll, mrope_position_ids
from qformer import QFormerConfig, WhisperQFormer

TOKEN_FIELDS = ("vision_start_token_id", "vision_end_token_id", "video_token_id", "audio_token_id")
TOKEN_TEXT = dict(vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>",
                  video_token_id="<|video_pad|>", audio_token_id="<|audio_pad|>")


def plus_tokens(tok):
    """The special token ids of a tokenizer (tokenizers.Tokenizer), adding those it lacks after its last id:
    Qwen2.5-VL's tokenizer lacks <|audio_pad|>, which gen_audio_model.py adds so."""
    missing = [t for t in TOKEN_TEXT.values() if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens(missing)
    return {k: tok.token_to_id(t) for k, t in TOKEN_TEXT.items()}


@dataclass
class PlusConfig:
    llm: Qwen2Config
    vision: Qwen25VisionConfig
    whisper: WhisperConfig
    qformer: QFormerConfig
    tokens: dict = field(default_factory=dict)  # the special token ids of config.json (TOKEN_FIELDS)
    # the frame budget the released models were trained with (scripts/train.sh, README): fps and max_frames are
    # the stage settings (10 and 768 for 2+)
    min_frames: int = 64
    max_pixels: int = 61250
    min_pixels: int = 784

    def media_prep(self, fps, max_frames):
        """The settings of data.load_media for this model (they key the feature cache too)."""
        return dict(plus=True, interval=1.0 / fps, min_frames=self.min_frames, max_frames=max_frames,
                    max_pixels=self.max_pixels, min_pixels=self.min_pixels, n_mels=self.whisper.num_mel_bins)

    def to_dict(self):
        return {"llm": vars(self.llm), "vision": {**vars(self.vision), "fullatt_block_indexes": list(self.vision.fullatt_block_indexes)},
                "whisper": vars(self.whisper), "qformer": vars(self.qformer), "tokens": self.tokens,
                "min_frames": self.min_frames, "max_pixels": self.max_pixels, "min_pixels": self.min_pixels}

    @staticmethod
    def from_dict(d):
        llm = Qwen2Config(**{**d["llm"], "mrope_section": tuple(d["llm"]["mrope_section"])})
        return PlusConfig(llm, Qwen25VisionConfig(**d["vision"]), WhisperConfig(**d["whisper"]), QFormerConfig(**d["qformer"]),
                          d["tokens"], **{k: d[k] for k in ("min_frames", "max_pixels", "min_pixels") if k in d})


class VideoSALMONN2Plus(nn.Module):
    """Frames -> Qwen2.5-VL ViT (frozen) -> merger; audio -> Whisper (frozen) -> Q-Former -> audio_proj; both
    scattered into their placeholder tokens of the prompt; the Qwen2 LLM with M-RoPE on top."""
    group_overhead = GROUP_OVERHEAD  # response_nll's length groups; training.py sets it per run

    def __init__(self, cfg: PlusConfig):
        super().__init__()
        missing = [t for t in TOKEN_FIELDS if t not in cfg.tokens]
        assert not missing, f"config without the special token ids {missing}"
        self.cfg = cfg
        self.llm = Qwen2(cfg.llm)
        self.visual = Qwen25Vision(cfg.vision)
        self.audio = WhisperQFormer(cfg.whisper, cfg.qformer)
        self.freeze_encoders()

    def encoder_parameters(self):
        """The frozen encoders: the ViT less its merger, Whisper less the Q-Former (the released 2+ trains the
        merger, the Q-Former, q_tokens, audio_proj and LoRA on the LLM). FSDP leaves them whole on every rank."""
        return [p for m in (self.visual.patch_embed, self.visual.blocks, self.audio.conv1, self.audio.conv2,
                            self.audio.embed_positions, self.audio.layers, self.audio.layer_norm) for p in m.parameters()]

    def freeze_encoders(self):
        for p in self.encoder_parameters():
            p.requires_grad_(False)
        return self

    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu"):
        """A 2+ checkpoint in the authors' full layout (tsinghua-ee's *_full releases, the audio-aligned
        bases, and ours)."""
        import checkpoint  # checkpoint.py builds the classes of this file: imported when called
        return checkpoint.load_video_salmonn2_plus(cls, path, dtype, device)

    @classmethod
    def from_lora(cls, lora_path, base_path, dtype=None, device="cpu"):
        """A LoRA-only 2+ release (PEFT adapter and modules_to_save) merged into its audio-aligned base."""
        import checkpoint
        return checkpoint.load_plus_lora(cls, lora_path, base_path, dtype, device)

    @classmethod
    def from_base(cls, qwen_vl_path, whisper_path, audio_config=None, dtype=None, device="cpu"):
        """The starting point of 2+ audio alignment, as the authors' gen_audio_model.py builds it:
        Qwen2.5-VL-Instruct, Whisper's encoder copied into audio.*, a fresh Q-Former (audio_config: its
        window and qformer_config, the authors' defaults otherwise)."""
        import checkpoint
        return checkpoint.load_plus_base(cls, qwen_vl_path, whisper_path, audio_config, dtype, device)

    def position_ids(self, input_ids, video_grid_thw=None, second_per_grid_ts=None, audio_lengths=None):
        """(3, B, T) M-RoPE positions; each row's videos (one block each) take the next rows of
        video_grid_thw, second_per_grid_ts and audio_lengths in order."""
        rows, used = [], 0
        start = self.cfg.tokens["vision_start_token_id"]
        for ids in input_ids.tolist():
            n = sum(1 for a, b in zip(ids, ids[1:]) if a == start and b in (self.cfg.tokens["video_token_id"], self.cfg.tokens["audio_token_id"]))
            take = lambda x: None if x is None else x[used:used + n]
            rows.append(mrope_position_ids(ids, self.cfg.tokens, take(video_grid_thw), take(second_per_grid_ts),
                                           take(audio_lengths), self.cfg.vision.spatial_merge_size))
            used += n
        return torch.stack(rows, dim=1).to(input_ids.device)

    def embed(self, input_ids, pixel_values_videos=None, video_grid_thw=None, audio_feature=None):
        """Token embeddings (B, T, D) with the video and audio tokens put where their pads are."""
        x = self.llm.embed_tokens(input_ids)
        for feats, token in ((None if pixel_values_videos is None else self.visual(pixel_values_videos, video_grid_thw), "video_token_id"),
                             (None if audio_feature is None else self.audio(audio_feature.to(x.dtype)).flatten(0, 1), "audio_token_id")):
            if feats is None:
                continue
            where = input_ids == self.cfg.tokens[token]
            if int(where.sum()) != feats.size(0):
                raise ValueError(f"{int(where.sum())} {token} placeholders for {feats.size(0)} {token.split('_')[0]} tokens")
            x = x.masked_scatter(where[..., None], feats.to(x.dtype))
        return x

    def hidden(self, embeds, position_ids, cache=None, use_cache=False):
        """Final-normed hidden states (B, T, C) of embeddings at M-RoPE positions (3, B, T), after a cache."""
        return self.llm.hidden(embeds, cache, use_cache=use_cache, position_ids=position_ids)

    def logits(self, input_ids, pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None,
               audio_feature=None, audio_lengths=None):
        """Logits (B, T, V) of a prompt as the authors' video_SALMONN2_plus.forward takes it: input_ids holding
        the placeholders, pixel_values_videos / video_grid_thw / second_per_grid_ts of the processor,
        audio_feature the log-mel chunks of every audio (S, n_mels, 3000), audio_lengths the audio tokens of
        each (60 per chunk)."""
        x = self.embed(input_ids, pixel_values_videos, video_grid_thw, audio_feature)
        h, _ = self.hidden(x, self.position_ids(input_ids, video_grid_thw, second_per_grid_ts, audio_lengths))
        return self.llm.head(h)

    # -- training and sampling on cached encoder features, in the form data.Features keeps for both families:
    # (vis, aud, times, duration): the ViT blocks' output (t, h, w, hidden), its patch grid in its shape (patches
    # in the processor's order), Whisper's output (S, 1500, d_model), each temporal grid's start in seconds,
    # the duration; vis or aud None for an item without.

    @torch.no_grad()
    def encoder_fingerprint(self):
        """A digest of the frozen encoders' configs and weights, for the feature-cache key."""
        h = hashlib.sha256(json.dumps([self.cfg.to_dict()["vision"], vars(self.cfg.whisper)], sort_keys=True).encode())
        frozen = [p for n, p in self.named_parameters() if n.startswith(("visual.", "audio.")) and not p.requires_grad]
        h.update(torch.stack([s for p in frozen for s in (p.float().sum(), p.float().square().sum())]).cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    @torch.no_grad()
    def encode(self, patches, mel):
        """The frozen, cacheable part of data.load_media's output: patches (t, h, w, patch_dim) -> ViT features
        (t, h, w, hidden) (None without a video), log-mel (S, n_mels, 3000) -> Whisper's (S, T, Ca) (None
        without audio)."""
        p = self.visual.merger.ln_q.weight
        vis = None
        if patches is not None:
            grid = torch.tensor([patches.shape[:3]])
            vis = self.visual.features(patches.to(p.device, p.dtype).flatten(0, 2), grid).view(*patches.shape[:3], -1)
        return vis, None if mel is None else self.audio.features(mel.to(p.device, p.dtype))

    def block(self, feats):
        """An item's audio-visual block: its placeholder ids and the (video, audio) tokens that fill them."""
        vis, aud, times, _ = feats
        grid = None if vis is None else vis.shape[:3]
        seconds = times[1] if len(times) > 1 else 1.0  # one grid: its time is 0 whatever its length
        vid = None if vis is None else self.visual.merger(vis.flatten(0, 2))  # (N / 4, D)
        audio = None if aud is None else self.audio.tokens(aud).flatten(0, 1)  # (S * 60, D)
        ids = av_placeholder_ids(self.cfg.tokens, grid, seconds, None if audio is None else audio.size(0),
                                 self.cfg.vision.spatial_merge_size)
        return ids, vid, audio, grid, seconds

    def embed_sequence(self, feats, prompt_ids, response_ids):
        """One sequence, the prompt's (before, after) ids around the block, then the response:
        (embeds (1, L, D), positions (3, 1, L), prefix length P)."""
        ids, vid, audio, grid, seconds = self.block(feats)
        ids = list(prompt_ids[0]) + ids + list(prompt_ids[1]) + list(response_ids)
        t = torch.tensor([ids], device=self.llm.embed_tokens.weight.device)
        x = self.llm.embed_tokens(t)
        for tokens, name in ((vid, "video_token_id"), (audio, "audio_token_id")):
            if tokens is not None:
                x = x.masked_scatter((t == self.cfg.tokens[name])[..., None], tokens.to(x.dtype))
        pos = mrope_position_ids(ids, self.cfg.tokens, None if vid is None else [grid], None if vid is None else [seconds],
                                 None if audio is None else [audio.size(0)], self.cfg.vision.spatial_merge_size)
        return x, pos[:, None].to(t.device), len(ids) - len(response_ids)

    def sequence_length(self, example):
        """Tokens in the LLM sequence of one example (prompt, block, response), and in its response."""
        (vis, aud, _, _), (before, after), response = example
        m = self.cfg.vision.spatial_merge_size
        block = 2 + (0 if vis is None else vis.shape[:3].numel() // m ** 2) + (0 if aud is None else aud.size(0) * self.cfg.qformer.tokens_per_segment)
        return len(before) + block + len(after) + len(response), len(response)

    estimate_flops = VideoSALMONN2.estimate_flops  # the LLM's training FLOPs: the same Qwen2 and LoRA accounting

    def forward(self, batch):
        """Training: batch = [(features, (before, after) prompt ids, response ids)] -> (summed response NLL,
        token count), through forward so that FSDP gathers the root's parameters once per step."""
        return self.response_nll([(*self.embed_sequence(f, p, r), r) for f, p, r in batch])

    def response_nll(self, seqs):
        """Summed NLL of the responses and their token count, for (embeds (1, L, D), positions (3, 1, L), P,
        response ids): a forward per group of similar lengths (model.length_groups)."""
        return grouped_nll(self.padded_nll, seqs, self.group_overhead)

    def padded_nll(self, seqs):
        """response_nll of sequences right-padded into one forward (causal, so the padding is inert)."""
        L = max(e.size(1) for e, _, _, _ in seqs)
        x = torch.cat([F.pad(e, (0, 0, 0, L - e.size(1))) for e, _, _, _ in seqs])  # (B, L, D)
        pos = torch.cat([F.pad(p, (0, L - p.size(-1))) for _, p, _, _ in seqs], dim=1)  # (3, B, L)
        h, _ = self.hidden(x, pos)
        rows = torch.cat([h[i, P - 1:P - 1 + len(r)] for i, (_, _, P, r) in enumerate(seqs)])  # (sum R, D)
        targets = torch.tensor([t for *_, r in seqs for t in r], device=x.device)
        return F.cross_entropy(self.llm.head(rows).float(), targets, reduction="sum"), targets.numel()

    def continuation_logps(self, feats, prompt_ids, continuations):
        """Summed log-probability of each continuation (N token lists) after one item's prompt, and their
        lengths: the prefix runs once and the N continuations as one batch over its KV cache; a continuation's
        text positions count on from the prompt's last, as in training."""
        prefix, pos, _ = self.embed_sequence(feats, prompt_ids, [])
        h, cache = self.hidden(prefix, pos, use_cache=True)
        N, L = len(continuations), max(len(c) for c in continuations)
        ids = torch.tensor([c + [0] * (L - len(c)) for c in continuations], device=prefix.device)  # (N, L)
        cpos = (pos[:, :, -1:] + 1 + torch.arange(L, device=prefix.device)).expand(3, N, L)
        hc, _ = self.hidden(self.llm.embed_tokens(ids).to(prefix.dtype), cpos, cache=cache)  # (N, L, D)
        hs = torch.cat([h[:, -1:].expand(N, 1, -1), hc[:, :-1]], dim=1)  # the state before each token
        lengths = torch.tensor([len(c) for c in continuations], device=ids.device)
        real = torch.arange(L, device=ids.device)[None] < lengths[:, None]
        nll = F.cross_entropy(self.llm.head(hs[real]).float(), ids[real], reduction="none")
        return -torch.zeros(N, device=ids.device).index_add(0, real.nonzero()[:, 0], nll), lengths

    def prefix(self, feats, prompt_ids):
        """The LLM input of one item's cached features inside the prompt's (before, after) ids: (embeds (1, P, D),
        its M-RoPE positions (3, 1, P)) at the training positions; new tokens count on as text."""
        dt = self.llm.embed_tokens.weight.dtype  # cached features may be fp32 where the model runs in bf16
        vis, aud, times, duration = feats
        feats = (None if vis is None else vis.to(dt), None if aud is None else aud.to(dt), times, duration)
        return self.embed_sequence(feats, prompt_ids, [])[:2]

    # one item alone, and many decoding together (engine.py): the same as video-SALMONN 2's, on prefix
    sample, stream, generate = VideoSALMONN2.sample, VideoSALMONN2.stream, VideoSALMONN2.generate

    def save_pretrained(self, path, state=None, max_shard_bytes=None):
        """The authors' full layout, loadable by from_pretrained (and by their code, the config aside)."""
        import checkpoint
        checkpoint.save_video_salmonn2_plus(self, path, state, max_shard_bytes)
