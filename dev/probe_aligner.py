"""
Does the toy's audio aligner tell the toy words apart? A diagnostic for issue 13 (dev/LOG.md), not part of make toy.

Synthesised utterances of 1-4 toy words (prepare.speech, one word a 0.5 s slot, starting on a slot) go through the
checkpoint's frozen Whisper encoder; then, window by window (one audio token each):
  1. the checkpoint's own aligner, frozen, with a linear probe trained on top: how much word identity its tokens carry;
  2. the same Q-Former re-initialised and trained with a linear head instead of the LLM: how much they could carry.
Printed: held-out accuracy on the windows that hold a word (chance 1/12) and on all windows (silence included).

$ python dev/probe_aligner.py out/toy/align/final
"""
import copy
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from checkpoint import load_model  # noqa: E402
from data import log_mel_spectrogram  # noqa: E402
from judge import ToyJudge  # noqa: E402

STEPS, BATCH, LR = 300, 32, 1e-3  # probe training
TRAIN, TEST = 800, 200  # utterances

world = ToyJudge().world  # data/toyav/prepare.py, loaded from its file as the judge loads it
SILENCE = len(world.WORDS)  # the label of a window without a word


def utterances(model, n, seed, segment_seconds):
    """n segments of one utterance each -> Whisper features (n, T, C), window labels (n, windows)."""
    rng, sr = np.random.default_rng(seed), world.SR
    slots = int(segment_seconds / world.WORD_SECONDS)
    mels, labels = [], []
    for _ in range(n):
        lead, words = int(rng.integers(0, 3)), rng.choice(len(world.WORDS), int(rng.integers(1, 5)), replace=False)
        audio = np.zeros(int(segment_seconds * sr), np.float32)
        wave = world.speech([world.WORDS[w] for w in words], rng.uniform(*world.PITCH))
        start = int(lead * world.WORD_SECONDS * sr)
        audio[start:start + len(wave)] = wave
        mels.append(log_mel_spectrogram(audio, model.cfg.whisper.num_mel_bins, len(audio)))
        labels.append([SILENCE] * lead + [int(w) for w in words] + [SILENCE] * (slots - lead - len(words)))
    with torch.no_grad():
        return model.speech_encoder(torch.stack(mels)), torch.tensor(labels)


def probe(aligner, train, test, train_aligner):
    """Held-out (word-window accuracy, all-window accuracy) of a linear head on the aligner's tokens."""
    (x, y), (xt, yt) = train, test
    head = nn.Linear(aligner.cfg.llm_dim, SILENCE + 1)
    opt = torch.optim.AdamW(list(head.parameters()) + (list(aligner.parameters()) if train_aligner else []), lr=LR)
    aligner.train(train_aligner)
    for _ in range(STEPS):
        i = torch.randint(0, len(x), (BATCH,))
        logits = head(aligner(x[i]).reshape(BATCH, y.size(1), -1))  # (B, windows, words + 1)
        loss = F.cross_entropy(logits.flatten(0, 1), y[i].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    aligner.eval()
    with torch.no_grad():
        pred = head(aligner(xt).reshape(len(xt), yt.size(1), -1)).argmax(-1)
    said = yt != SILENCE
    return (pred[said] == yt[said]).float().mean().item(), (pred == yt).float().mean().item()


def main():
    torch.manual_seed(0)
    model = load_model(sys.argv[1]).eval()
    seconds = model.cfg.segment_seconds
    train, test = utterances(model, TRAIN, 1, seconds), utterances(model, TEST, 2, seconds)
    trained = probe(copy.deepcopy(model.audio), train, test, train_aligner=False)
    fresh = copy.deepcopy(model.audio)
    for m in fresh.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    direct = probe(fresh, train, test, train_aligner=True)
    print(f"the checkpoint's aligner, frozen, linear probe: words {trained[0]:.1%}, all windows {trained[1]:.1%}")
    print(f"the Q-Former trained with a linear head:        words {direct[0]:.1%}, all windows {direct[1]:.1%}")


if __name__ == "__main__":
    main()
