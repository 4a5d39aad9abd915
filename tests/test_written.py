"""The toy LLM's written soundtrack (training.py's written_audio): each item's audio events written as word tokens,
one to an aligner window, embedded where the aligner's tokens go, with the segment embedding theirs carry."""
import torch

from conftest import run_cli
from data import Features, read_manifest, soundtrack_ids
from model import AVConfig, VideoSALMONN2
from qformer import segment_positions
from test_train import ARCH, run, small_toy_vision, world, write_config  # noqa: F401  world is a fixture


class WordTokenizer:
    """Whitespace words -> ids from a fixed table, each with its leading space as byte-level BPE writes it."""
    VOCAB = {"Ġ": 0, "Ġbako": 1, "Ġmizu": 2, "Ġlow": 3, "Ġtone": 4, "Ġnoise": 5, "Ġrising": 6, "Ġchirp": 7}

    def token_to_id(self, token):
        return self.VOCAB.get(token)

    def encode(self, text):
        return type("Encoding", (), {"ids": [self.VOCAB["Ġ" + w] for w in text.split()]})()


def test_soundtrack_writes_each_event_from_the_window_it_starts_in():
    events = [{"type": "visual", "key": ["appear", "red", "circle"], "start": 0},
              {"type": "speech", "key": ["say", "bako mizu"], "start": 1},
              {"type": "sound", "key": ["tone", "low"], "start": 2.3},
              {"type": "sound", "key": ["noise"], "start": 4},
              {"type": "sound", "key": ["chirp", "rising"], "start": 5.5}]  # its second word past the end: dropped
    ids = soundtrack_ids(WordTokenizer(), events, 12, 0.5)
    assert ids == [0, 0, 1, 2, 3, 4, 0, 0, 5, 0, 0, 6]


def test_written_tokens_are_embeddings_plus_the_segment_embedding():
    m = VideoSALMONN2(AVConfig.from_dict(dict(ARCH, llm=dict(ARCH["llm"], vocab_size=50)))).eval()
    T, D = m.cfg.qformer.tokens_per_segment, m.cfg.llm.hidden_size
    ids = torch.randint(0, 50, (2, T))
    emb = m.llm.embed_tokens.weight
    want = torch.cat([emb[ids[0]], emb[ids[1]] + segment_positions(2, D)[1]])  # segment 0's row is zeros
    assert torch.allclose(m.audio_tokens(ids), want)
    vis = torch.randn(3, 16, ARCH["vision"]["hidden_size"])  # 3 frames of tower features
    av = m.av_tokens(vis, ids, [0.0, 1.0, 2.0], 3.0)
    assert av.shape[0] == m.av_length(3, 2 * T, 3.0)


def test_features_hand_items_their_written_soundtrack(tmp_path):
    d, _, _ = small_toy_vision(tmp_path)
    from checkpoint import load_model
    from data import load_tokenizer
    model, tok = load_model(str(tmp_path / "vision" / "final")), load_tokenizer(str(tmp_path / "vision" / "final"))
    clips = [it for it in read_manifest(str(d / "train.jsonl")) if it["task"] == "caption"]
    audio = read_manifest(str(d / "align_train.jsonl"))
    items = clips + audio
    written = Features(model, tok, items, cache_dir=str(tmp_path / "cache"), fps=1.0, max_frames=110, written_audio=True)
    heard = Features(model, tok, items, cache_dir=str(tmp_path / "cache"), fps=1.0, max_frames=110)
    T = model.cfg.qformer.tokens_per_segment
    for i, it in enumerate(written.items):
        ids, feats = written.example(i, "cpu")[0][1], heard.example(i, "cpu")[0][1]
        if feats is None:  # a mute clip: nothing to write
            assert ids is None
            continue
        assert ids.shape == (feats.size(0), T) and not ids.is_floating_point()
        assert ids.flatten().tolist() == soundtrack_ids(tok, it["events"], feats.size(0) * T, model.cfg.segment_seconds / T)
        said = [e for e in it["events"] if e["type"] in ("speech", "sound")]
        assert len(set(ids.flatten().tolist())) > 1 or not said


def test_written_audio_stage_trains_and_refuses_what_it_cannot_do(world, tmp_path):  # noqa: F811
    cfg = write_config(tmp_path / "w.py", world, tmp_path / "w", steps=2, written_audio=True)
    run(["train_sft.py", cfg])
    assert (tmp_path / "w" / "final" / "model.safetensors").exists()
    for bad, message in [(dict(use_audio=False), "written_audio: needs audio"),
                         (dict(anchor=1.0), "anchor and written_audio")]:
        path = write_config(tmp_path / "bad.py", world, tmp_path / "bad", written_audio=True, **bad)
        out = run_cli("train_sft.py", path)
        assert out.returncode == 2 and message in out.stderr + out.stdout, out.stderr[-500:]


def test_anchor_targets_are_the_written_words_without_silence():
    from training import transcript_ids
    tok = WordTokenizer()
    asr = {"task": "asr", "response": "bako  mizu"}
    sounds = {"task": "audio_caption", "response": "A low tone plays. Then a burst of noise is heard.",
              "events": [{"type": "sound", "key": ["tone", "low"], "start": 0.2},
                         {"type": "sound", "key": ["noise"], "start": 2.1}]}
    assert transcript_ids(tok, asr, 0) == [1, 2]
    assert transcript_ids(tok, sounds, 0) is None  # speech alone unless sounds are asked for
    assert transcript_ids(tok, sounds, 0, sounds=True) == [3, 4, 5]
    assert transcript_ids(tok, {"task": "caption", "response": "x", "events": sounds["events"]}, 0, sounds=True) is None


def test_malformed_events_are_named_and_skipped(tmp_path):
    d, _, _ = small_toy_vision(tmp_path)
    from checkpoint import load_model
    from data import load_tokenizer
    model, tok = load_model(str(tmp_path / "vision" / "final")), load_tokenizer(str(tmp_path / "vision" / "final"))
    good = [it for it in read_manifest(str(d / "align_train.jsonl"))][:2]
    bad = [dict(good[0], id="no_start", events=[{"type": "speech", "key": ["say", "bako"]}]),
           dict(good[1], id="text_start", events=[{"type": "sound", "key": ["noise"], "start": "soon"}])]
    f = Features(model, tok, good + bad, cache_dir=str(tmp_path / "cache"), written_audio=True)
    assert f.skipped == 2 and [it["id"] for it in f.items] == [it["id"] for it in good]
