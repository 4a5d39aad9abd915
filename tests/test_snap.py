"""The toy's snapped audio tokens (AVConfig.snap_audio, model.snap): each aligner token read as its nearest word's
embedding with its segment embedding, the gradient passed straight through, the anchor still on the aligner's own."""
import torch

from model import AVConfig, VideoSALMONN2, anchor_loss
from qformer import segment_positions
from test_train import ARCH

torch.manual_seed(0)


def snapping_model(snap=True, vocab=50):
    return VideoSALMONN2(AVConfig.from_dict(dict(ARCH, llm=dict(ARCH["llm"], vocab_size=vocab), snap_audio=snap))).eval()


def test_snapped_tokens_are_the_nearest_words_with_their_segment_embedding():
    m = snapping_model()
    aud = torch.randn(2, 100, 16)  # two segments of Whisper features
    raw = m.audio(aud)  # (20, D): 10 windows a segment
    pos = segment_positions(2, 32).repeat_interleave(10, 0)  # segment 0's row is zeros
    emb = m.llm.embed_tokens.weight
    nearest = [min(range(50), key=lambda v: (raw[i] - pos[i] - emb[v]).square().sum().item()) for i in range(20)]
    with torch.no_grad():
        assert torch.allclose(m.audio_tokens(aud), emb[nearest] + pos, atol=1e-6)
    m.cfg.snap_audio = False
    assert torch.equal(m.audio_tokens(aud), raw)


def test_snap_passes_the_gradient_straight_through_to_the_aligner():
    m = snapping_model()
    aud, w = torch.randn(1, 100, 16), torch.randn(10, 32)
    (m.audio_tokens(aud) * w).sum().backward()  # d/d(tokens) = w, handed to the aligner as if there were no snap
    snapped = {n: p.grad.clone() for n, p in m.audio.named_parameters()}
    m.zero_grad()
    (m.audio(aud) * w).sum().backward()
    assert all(torch.allclose(snapped[n], p.grad) for n, p in m.audio.named_parameters())
    assert m.llm.embed_tokens.weight.grad is None  # the words are read, not moved


def test_the_anchor_pulls_the_aligners_own_tokens_not_the_snapped_ones():
    m = snapping_model()
    aud = torch.randn(2, 100, 16)
    batch = [((None, aud, [0.0], 4.0), ([1, 2], [3]), [5, 6, 7])]
    with torch.no_grad():
        _, (ctc, commit, tokens), k = m(batch, [[8, 9]], blank=4, tau=0.5)
        bare = m.audio(aud) - segment_positions(2, 32).repeat_interleave(10, 0)
        want = anchor_loss([bare], [[8, 9]], m.llm.embed_tokens.weight, 4, 0.5)
    assert commit > 0 and torch.allclose(ctc, want[0]) and torch.allclose(commit, want[1]) and tokens == 20 and k == 1


def test_snap_audio_is_saved_with_the_config_and_absent_means_off():
    cfg = AVConfig.from_dict(dict(ARCH, snap_audio=True))
    assert AVConfig.from_dict(cfg.to_dict()).snap_audio
    assert not AVConfig.from_dict(ARCH).snap_audio  # configs written before the switch
