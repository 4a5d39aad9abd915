"""
Pretraining of the toy world's frozen encoders, as the real ones were pretrained: a toy-only stage, since the 7B
model's SigLIP and Whisper come pretrained on web-scale data, and random frozen encoders give features not worth
aligning.

- The toy SigLIP tower learns with SigLIP's sigmoid contrastive loss (Zhai et al., 2023) on frames of the toy world
  and their visual descriptions, against a small text tower. The attention-pooling head and the text tower are then
  dropped: LLaVA-OneVision keeps only the tower's patch features.
- The toy Whisper encoder learns as Whisper did, as an encoder-decoder on transcripts: toy speech and labelled
  sounds in 4 s segments (one segment is one encoder input). The decoder is then dropped.

Frames and sounds are drawn fresh from the world's generator (prepare.py), seeded from the world's seed: pretraining
data that the later stages never see as such. The encoders' shapes are those of the toy model (config/toy_vision.py's arch).
The weights go to out/toy/encoders.safetensors under a content hash of the world (its seed, generator and tokenizer),
this code and the shapes: a later run with the same hash keeps them and returns at once.

$ python data/toyav/pretrain_encoders.py              # about 3 minutes on 2 cores, once per world
$ python data/toyav/pretrain_encoders.py --steps_scale 0.05 --out /tmp/enc.safetensors   # a quick look
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
import prepare as world  # noqa: E402  the toy world's generator, next to this file
from config import UserError, run, run_config  # noqa: E402
from data import load_tokenizer, log_mel_spectrogram, merge_results  # noqa: E402
from encoders import SAMPLE_RATE, SiglipVision, SiglipVisionConfig, WhisperConfig, WhisperEncoder  # noqa: E402
from training import lr_at  # noqa: E402

VISION_STEPS, VISION_BATCH, VISION_LR = 1200, 128, 2e-3  # retrieval top-1: 80 % after 600 steps, 100 % after 1500
AUDIO_STEPS, AUDIO_BATCH, AUDIO_LR = 800, 32, 2e-3
AUDIO_SEGMENTS = 3000  # the Whisper corpus: 4 s segments, each a few sounds and utterances
HEAD_WIDTH = 64  # width of the text tower, the pooling head, the Whisper decoder and the shared embedding
HEAD_LAYERS = 2  # layers of the text tower and of the Whisper decoder
PITCHES = 16  # speaker pitches in the bank of synthesised words (the world draws them from a continuous range)
SOUND_LABELS = {"tone": "({} tone)", "chirp": "({} chirp)", "noise": "(noise)"}  # a sound in a transcript
EVAL_ITEMS = 512  # held-out Whisper segments
WARMUP_RATIO, WEIGHT_DECAY, GRAD_CLIP = 0.05, 1e-4, 1.0  # both encoders' optimisation


# -----------------------------------------------------------------------------
# frames of the world and their descriptions


def rgb_as_decoded(img):
    """An RGB frame as the clips' decoder returns it: through prepare.yuv420p (BT.601 limited range, chroma at half
    resolution) and back, nearest-neighbour chroma. Equal to the decoded clips' frames within 3 levels (1 for all but a
    few % of the values)."""
    S = world.SIZE
    p = world.yuv420p(img).astype(np.float64)
    y, u, v = p[:S], p[S:S + S // 4].reshape(S // 2, S // 2), p[S + S // 4:].reshape(S // 2, S // 2)
    up = lambda c: (c.repeat(2, 0).repeat(2, 1) - 128) / 224  # (S/2, S/2) -> (S, S)
    y, u, v = (y - 16) / 219, up(u), up(v)
    rgb = np.stack([y + 1.402 * v, y - 0.344136 * u - 0.714136 * v, y + 1.772 * u], -1)
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


class FrameBank:
    """Every state a sampled frame can show (3 backgrounds x 11 digits or none x 37 shapes or none), drawn once as
    the decoder returns it, with its description; a batch draws states as the world draws a frame's
    (prepare.random_state)."""

    def __init__(self, tok):
        shapes = [None] + [(c, k, p) for c in world.COLOURS for k in world.SHAPES for p in range(len(world.PLACES))]
        states = [(bg, d, s) for bg in world.BACKGROUNDS for d in [None, *map(str, range(10))] for s in shapes]
        self.index = {s: i for i, s in enumerate(states)}
        frames = np.stack([rgb_as_decoded(world.draw_state(*s)) for s in states])
        self.pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, S, S) in [-1, 1], as data.py
        self.ids = token_batch(tok, [world.describe_state(*s) for s in states])  # (N, T)

    def batch(self, rng, n):
        """(pixels, description ids, state indices) of n frames."""
        i = torch.tensor([self.index[world.random_state(rng)] for _ in range(n)])
        return self.pixels[i], self.ids[i], i


def token_batch(tok, texts, bos=None, eos=None):
    """Right-padded ids (n, T) with 0 (<|endoftext|>) as padding, optionally between bos and eos."""
    ids = [([bos] if bos is not None else []) + tok.encode(t, add_special_tokens=False).ids + ([eos] if eos is not None else [])
           for t in texts]
    out = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
    for i, row in enumerate(ids):
        out[i, :len(row)] = torch.tensor(row)
    return out


class TextTower(nn.Module):
    """SigLIP's text side, tiny: token and position embeddings, pre-LN blocks, mean over the real tokens."""

    def __init__(self, vocab, width, layers, max_len=64):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, width), nn.Parameter(torch.zeros(max_len, width))
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids):
        pad = ids == 0
        x = self.blocks(self.embed(ids) + self.pos[:ids.size(1)], src_key_padding_mask=pad)  # (n, T, C)
        x = self.norm(x).masked_fill(pad[..., None], 0.0)
        return x.sum(1) / (~pad).sum(1, keepdim=True)  # (n, C)


class PoolHead(nn.Module):
    """SigLIP's attention-pooling (MAP) head: one learned query attends over the patch features."""

    def __init__(self, dim, out):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.norm, self.proj = nn.LayerNorm(dim), nn.Linear(dim, out)

    def forward(self, x):  # (n, N, C) -> (n, out)
        y, _ = self.attn(self.query.expand(x.size(0), -1, -1), x, x, need_weights=False)
        return self.proj(self.norm(y[:, 0]))


def siglip_loss(img, txt, states, scale, bias):
    """Sigmoid loss over every image-text pair of the batch: +1 for a pair that shows and describes the same state
    (the batch may draw a state twice), -1 otherwise; summed over pairs, averaged over images, as SigLIP."""
    logits = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T * scale.exp() + bias  # (n, n)
    same = (states[:, None] == states[None, :]).to(logits.dtype)
    return -F.logsigmoid((2 * same - 1) * logits).sum() / len(states)


def pretrain_vision(cfg, tok, seed, scale_steps):
    tower = SiglipVision(cfg)
    head, text = PoolHead(cfg.hidden_size, HEAD_WIDTH), TextTower(tok.get_vocab_size(), HEAD_WIDTH, HEAD_LAYERS)
    t_scale, t_bias = nn.Parameter(torch.tensor(math.log(10.0))), nn.Parameter(torch.tensor(-10.0))  # SigLIP's init
    params = [*tower.parameters(), *head.parameters(), *text.parameters(), t_scale, t_bias]
    steps = max(1, round(VISION_STEPS * scale_steps))
    bank, rng = FrameBank(tok), np.random.default_rng([seed, 10])

    def batch_loss():
        x, ids, states = bank.batch(rng, VISION_BATCH)
        return siglip_loss(head(tower(x)), text(ids), states, t_scale, t_bias)

    loss = fit(params, steps, VISION_LR, batch_loss, "vision")
    with torch.no_grad():  # retrieval: is each frame's own description the closest of all the world's descriptions?
        sim = F.normalize(head(tower(bank.pixels)), dim=-1) @ F.normalize(text(bank.ids), dim=-1).T  # (N, N)
        top1 = (sim.argmax(1) == torch.arange(len(sim))).float().mean().item()
    return tower, {"vision_loss": round(loss.item(), 4), "retrieval_top1": round(top1, 4), "vision_steps": steps}


# -----------------------------------------------------------------------------
# sounds of the world and their transcripts


class SoundBank:
    """Synthesised words at PITCHES pitches across the world's range (prepare.speech is slow to run per item) and
    the fixed sounds; noise is drawn afresh. An utterance is built as prepare.speech builds it."""

    def __init__(self):
        self.pitches = np.linspace(*world.PITCH, PITCHES)
        self.words = {(w, i): world.word_sound(w, f0) for w in world.WORDS for i, f0 in enumerate(self.pitches)}

    def utterance(self, words, rng):
        i = int(rng.integers(PITCHES))
        out = np.concatenate([self.words[w, i] for w in words])
        return 0.5 * out / np.abs(out).max()


def random_audio(rng, bank, seconds):
    """A segment of `seconds` of toy audio: speech and sounds apart in time, each whole, and its transcript (the
    words said, a sound as its label in brackets); one in ten is silence, with an empty transcript."""
    audio, said, t = np.zeros(round(seconds * SAMPLE_RATE)), [], rng.uniform(0.0, 0.8)
    while rng.random() > 0.1 or said:
        if rng.random() < 0.5:
            words = [world.WORDS[i] for i in rng.choice(len(world.WORDS), int(rng.integers(1, 4)), replace=False)]
            wave, label = bank.utterance(words, rng), " ".join(words)
        else:
            key = world.pick(rng, world.SOUND_KEYS)
            wave, label = world.sound(key, rng), SOUND_LABELS[key[0]].format(*key[1:])
        start = round(t * SAMPLE_RATE)
        if start + len(wave) > len(audio):
            break
        audio[start:start + len(wave)] += wave
        said.append(label)
        t += len(wave) / SAMPLE_RATE + rng.uniform(0.1, 1.2)
    return audio.astype(np.float32), " ".join(said)


def audio_set(rng, bank, n, cfg, tok):
    """n segments: log-mels (n, n_mels, 2 * positions) and transcript ids (n, T) between <|im_start|> and <|im_end|>."""
    seconds = 2 * cfg.max_source_positions / 100  # 100 mel frames a second, two per encoder frame
    pairs = [random_audio(rng, bank, seconds) for _ in range(n)]
    mel = torch.stack([log_mel_spectrogram(a, cfg.num_mel_bins, len(a)) for a, _ in pairs])  # (n, n_mels, 2 * positions)
    ends = (tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>"))
    return mel, token_batch(tok, [t for _, t in pairs], *ends)


class Decoder(nn.Module):
    """Whisper's decoder, tiny: token and learned position embeddings, pre-LN blocks that attend to the encoder's
    output, the head tied to the token embedding."""

    def __init__(self, vocab, enc_width, width, layers, max_len=64):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, width), nn.Parameter(torch.zeros(max_len, width))
        self.enc_proj = nn.Linear(enc_width, width)
        layer = nn.TransformerDecoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerDecoder(layer, layers)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids, memory):  # (n, T), (n, S, enc_width) -> logits (n, T, vocab)
        T = ids.size(1)
        causal = torch.triu(torch.full((T, T), float("-inf")), 1)
        x = self.blocks(self.embed(ids) + self.pos[:T], self.enc_proj(memory), tgt_mask=causal)
        return self.norm(x) @ self.embed.weight.T


def pretrain_audio(cfg, tok, seed, scale_steps):
    encoder, bank = WhisperEncoder(cfg), SoundBank()
    decoder = Decoder(tok.get_vocab_size(), cfg.d_model, HEAD_WIDTH, HEAD_LAYERS)
    params = [p for p in [*encoder.parameters(), *decoder.parameters()] if p.requires_grad]
    steps = max(1, round(AUDIO_STEPS * scale_steps))
    # a fixed corpus, seen several times: a log-mel costs more than the tiny encoder's step on it
    mels, ids = audio_set(np.random.default_rng([seed, 20]), bank, AUDIO_SEGMENTS, cfg, tok)
    held = audio_set(np.random.default_rng([seed, 21]), bank, EVAL_ITEMS, cfg, tok)
    order = torch.Generator().manual_seed(seed)

    def loss_of(mel, ids):  # teacher forcing: each token from the ones before it and the audio
        logits = decoder(ids[:, :-1], encoder(mel))
        target = ids[:, 1:].masked_fill(ids[:, 1:] == 0, -100)
        return F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100), logits, target

    def batch_loss():
        i = torch.randint(len(mels), (AUDIO_BATCH,), generator=order)
        return loss_of(mels[i], ids[i][:, :int((ids[i] > 0).sum(1).max())])[0]

    loss = fit(params, steps, AUDIO_LR, batch_loss, "audio")
    with torch.no_grad():  # every token right under teacher forcing: then greedy decoding writes the transcript exactly
        _, logits, target = loss_of(*held)
        right = (logits.argmax(-1) == target) | (target == -100)
        exact = right.all(1).float().mean().item()
    return encoder, {"audio_loss": round(loss.item(), 4), "transcripts_exact": round(exact, 4), "audio_steps": steps}


def fit(params, steps, lr, batch_loss, name):
    """AdamW on params for steps, each on batch_loss() (a fresh batch's loss), at training.lr_at's schedule with the
    global gradient norm clipped; prints the loss every 100 steps and returns the last one."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, WARMUP_RATIO)
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            print(f"{name} step {step + 1}/{steps}: loss {loss.item():.4f}", flush=True)
    return loss


# -----------------------------------------------------------------------------


def content_hash(data_dir, arch, scale_steps):
    """Of what the encoders are a function of: the world (its generator, seed and tokenizer), this code, the code it
    runs (encoders.py, data.py's log-mel) and the shapes."""
    h = hashlib.sha256(json.dumps([arch["vision"], arch["whisper"], scale_steps, torch.__version__]).encode())
    for path in (os.path.join(HERE, "prepare.py"), os.path.abspath(__file__), os.path.join(ROOT, "encoders.py"),
                 os.path.join(ROOT, "data.py"), os.path.join(data_dir, "tokenizer.json")):
        with open(path, "rb") as f:
            h.update(f.read())
    with open(os.path.join(data_dir, "meta.json")) as f:
        meta = json.load(f)
    h.update(json.dumps([meta["seed"], meta["small"]]).encode())
    return h.hexdigest()[:16], meta["seed"]


def main(argv=None):
    parser = argparse.ArgumentParser(description="Pretrain the toy world's SigLIP tower and Whisper encoder.")
    parser.add_argument("--data", default=HERE, help="the toy world's directory (its tokenizer and meta.json)")
    parser.add_argument("--config", default=os.path.join(ROOT, "config", "toy_vision.py"), help="holds the toy arch")
    parser.add_argument("--out", default=os.path.join(ROOT, "out", "toy", "encoders.safetensors"))
    parser.add_argument("--steps_scale", type=float, default=1.0, help="a fraction of the steps, for tests")
    parser.add_argument("--results", default="", help="a results.json to add the metrics and seconds to")
    args = parser.parse_args(argv)
    arch = run_config(args.config).get("arch")
    if not isinstance(arch, dict):
        raise UserError(f"{args.config}: sets no arch dict (the toy model's shapes, as config/toy_vision.py)")
    digest, seed = content_hash(args.data, arch, args.steps_scale)
    meta = {}
    if os.path.exists(args.out):
        try:
            with safe_open(args.out, "pt") as f:
                meta = f.metadata() or {}  # a file saved without metadata (not this script's) is trained over
        except Exception as e:  # SafetensorError: cut short by a killed run or a full disk; it is a cache, made again
            print(f"{args.out}: cannot be read ({e}); trained again")
    if meta.get("hash") == digest:
        print(f"{args.out}: pretrained encoders of this world and code (hash {digest}) are there; kept")
        return record(args.results, json.loads(meta["metrics"]), 0.0)
    t0 = time.time()
    torch.manual_seed(seed)
    tok = load_tokenizer(os.path.join(args.data, "tokenizer.json"))
    tower, vision_metrics = pretrain_vision(SiglipVisionConfig(**arch["vision"]), tok, seed, args.steps_scale)
    whisper, audio_metrics = pretrain_audio(WhisperConfig(**arch["whisper"]), tok, seed, args.steps_scale)
    seconds = time.time() - t0
    metrics = {**vision_metrics, **audio_metrics, "seconds": round(seconds, 1)}
    state = {**{f"tower.{k}": v for k, v in tower.state_dict().items()},
             **{f"speech_encoder.{k}": v for k, v in whisper.state_dict().items()}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, args.out + ".tmp", metadata={"hash": digest, "metrics": json.dumps(metrics)})
    os.replace(args.out + ".tmp", args.out)
    print(f"encoders: {json.dumps(metrics)} -> {args.out}")
    record(args.results, metrics, seconds)


def record(path, metrics, seconds):
    """{"encoders": metrics} and seconds["encoders"] into the results.json at path (none when path is "")."""
    if path:
        merge_results(path, {"encoders": metrics}, {"encoders": seconds})


if __name__ == "__main__":
    run(main)
