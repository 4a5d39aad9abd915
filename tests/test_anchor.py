"""The toy's alignment anchor (model.anchor_loss): CTC equal to its sum over alignments, the commitment term in
closed form, and the option wired through the alignment stage to the aligner alone."""
import itertools
import json
import math

import pytest
import torch

from conftest import run_cli
from model import AVConfig, VideoSALMONN2, anchor_loss
from qformer import segment_positions
from test_train import ARCH, final_weights, run, world, write_config  # noqa: F401  world is a fixture

torch.manual_seed(0)


def ctc_nll_by_enumeration(log_probs, target, blank):
    """-log of the summed probability of every path of T labels that collapses to target (repeats merged, then
    blanks dropped): CTC's definition (Graves et al., 2006, Eq. 2-3), by brute force."""
    T, V = log_probs.shape
    total = []
    for path in itertools.product(range(V), repeat=T):
        merged = [p for i, p in enumerate(path) if i == 0 or p != path[i - 1]]
        if [p for p in merged if p != blank] == target:
            total.append(sum(log_probs[t, p] for t, p in enumerate(path)))
    return -torch.logsumexp(torch.stack(total), 0)


def test_anchor_ctc_equals_the_sum_over_its_alignments():
    emb = torch.randn(4, 6)
    tokens = [torch.randn(4, 6), torch.randn(3, 6)]  # two items, the second shorter: padding must not count
    targets = [[1, 2], [3]]
    tau, blank = 2.0, 0
    ctc, _, n = anchor_loss(tokens, targets, emb, blank, tau)
    want = []
    for x, t in zip(tokens, targets):
        d2 = ((x[:, None, :] - emb[None]) ** 2).sum(-1)  # (N, V)
        want.append(ctc_nll_by_enumeration((-d2 / tau).log_softmax(-1), t, blank) / len(t))  # per target token
    assert torch.allclose(ctc, torch.stack(want).sum(), atol=1e-4), (ctc, want) and n == 7


def test_anchor_commitment_is_the_squared_distance_to_the_nearest_embedding():
    emb = torch.eye(5) * 3  # rows far apart: a small offset keeps each token nearest to its own row
    offsets = [torch.full((2, 5), 0.1), torch.full((1, 5), -0.2)]
    tokens = [emb[[1, 4]] + offsets[0], emb[[2]] + offsets[1]]
    _, commit, n = anchor_loss(tokens, [[1], [2]], emb, 0, 0.01)
    assert math.isclose(commit.item(), 2 * 5 * 0.01 + 5 * 0.04, rel_tol=1e-4) and n == 3
    _, exact, _ = anchor_loss([emb[[1, 2, 3]]], [[1, 2, 3]], emb, 0, 0.01)
    assert exact.item() < 1e-4


def test_anchor_sends_no_gradient_into_the_embeddings():
    emb = torch.randn(6, 4, requires_grad=True)
    tokens = torch.randn(5, 4, requires_grad=True)
    ctc, commit, _ = anchor_loss([tokens], [[2, 3]], emb, 0, 0.5)
    (ctc + commit).backward()
    assert emb.grad is None and tokens.grad.abs().sum() > 0


def test_forward_with_transcripts_anchors_only_the_items_that_have_one():
    m = VideoSALMONN2(AVConfig.from_dict(dict(ARCH, llm=dict(ARCH["llm"], vocab_size=50)))).eval()
    aud = [torch.randn(1, 100, 16), torch.randn(2, 100, 16)]  # Whisper features: one segment, then two
    batch = [((None, a, [0.0], 2.0 * a.size(0)), ([1, 2], [3]), [5, 6, 7]) for a in aud]
    with torch.no_grad():
        nll = m(batch)
        nll_too, (ctc, commit, tokens), k = m(batch, [None, [8, 9]], blank=4, tau=0.5)
        # anchored without the segment embedding: segment 2's tokens carry its row, segment 1's row is zeros
        bare = m.audio(aud[1]) - segment_positions(2, 32).repeat_interleave(10, 0)
        want = anchor_loss([bare], [[8, 9]], m.llm.embed_tokens.weight, 4, 0.5)
    assert torch.equal(nll[0], nll_too[0]) and nll[1] == nll_too[1]
    assert torch.allclose(ctc, want[0]) and torch.allclose(commit, want[1]) and tokens == 20 and k == 1  # 2 segments x 10 windows
    _, (ctc, commit, tokens), k = m(batch, [None, None])  # no transcript: zeros that still backpropagate
    assert ctc.item() == commit.item() == tokens == k == 0 and ctc.requires_grad


@pytest.mark.parametrize("final_linear", [True, False])
def test_the_aligner_starts_on_the_blank_by_a_shift_of_its_tokens(final_linear):
    m = VideoSALMONN2(AVConfig.from_dict(dict(ARCH, llm=dict(ARCH["llm"], vocab_size=50),
                                              qformer=dict(ARCH["qformer"], final_linear=final_linear)))).eval()
    aud = [torch.randn(1, 100, 16), torch.randn(2, 100, 16)]
    seg = [torch.zeros(10, 32), segment_positions(2, 32).repeat_interleave(10, 0)]  # each item's segment rows
    with torch.no_grad():
        before = torch.cat([m.audio(a) - s for a, s in zip(aud, seg)])  # (30, D) without the segment embedding
        m.train()  # dropout on: the shift must still be taken without it
        m.start_aligner_on(4, aud)
        assert m.audio.training  # left as the caller had it
        m.eval()
        after = torch.cat([m.audio(a) - s for a, s in zip(aud, seg)])
    assert torch.allclose(after.mean(0), m.llm.embed_tokens.weight[4], atol=1e-5)
    assert torch.allclose(after - after.mean(0), before - before.mean(0), atol=1e-5)  # a shift: what it hears is kept


def test_align_stage_with_the_anchor_trains_the_aligner_alone(world, tmp_path):  # noqa: F811
    base = write_config(tmp_path / "base.py", world, tmp_path / "base", steps=1, use_audio=False)
    run(["train_sft.py", base])
    align = write_config(tmp_path / "align.py", world, tmp_path / "align", init_from=str(tmp_path / "base" / "final"),
                         tokenizer="", train_data=str(world / "align.jsonl"), tasks=("asr",), trainable=("audio.",),
                         steps=2, anchor=1.0)
    run(["train_align.py", align])
    plain = write_config(tmp_path / "plain.py", world, tmp_path / "plain", init_from=str(tmp_path / "base" / "final"),
                         tokenizer="", train_data=str(world / "align.jsonl"), tasks=("asr",), trainable=("audio.",),
                         steps=2)
    run(["train_align.py", plain])
    before, after = final_weights(tmp_path / "base"), final_weights(tmp_path / "align")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("speech_", "ln_speech.", "final_linear.")) for k in changed)
    first = [json.loads((tmp_path / d / "log.jsonl").read_text().splitlines()[0])["loss"] for d in ("align", "plain")]
    assert math.isfinite(first[0]) and first[0] > first[1] + 0.1  # the anchor's terms on top of an NLL
    if_no_audio = write_config(tmp_path / "bad.py", world, tmp_path / "bad", init_from=str(tmp_path / "base" / "final"),
                               tokenizer="", train_data=str(world / "align.jsonl"), tasks=("asr",), anchor=1.0,
                               use_audio=False)
    out = run_cli("train_align.py", if_no_audio)
    assert out.returncode == 2 and "anchor: needs audio" in out.stderr + out.stdout
