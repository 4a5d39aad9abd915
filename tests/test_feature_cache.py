"""The frozen-feature cache: a hit skips decoding and the encoders; any change of its key misses."""
import json
import os

import pytest
import torch

from data import MediaError, media_features
from test_media import write_video

PREP = dict(fps=1.0, max_frames=8, image_size=28, n_mels=80, segment_seconds=2)


class CountingEncoder:
    def __init__(self):
        self.calls = 0

    def __call__(self, frames, mel):
        self.calls += 1
        return frames.mean(dim=(2, 3))[:, None] * 2, mel[:, :, :5].transpose(1, 2)  # (F, 1, 3), (S, 5, n_mels)


def test_hit_skips_encoders_and_changed_key_misses(tmp_path):
    video = write_video(tmp_path / "v.mp4", 3)
    enc, cache = CountingEncoder(), str(tmp_path / "cache")
    first = media_features(video, enc, "enc-a", cache, **PREP)
    again = media_features(video, enc, "enc-a", cache, **PREP)
    assert enc.calls == 1
    for a, b in zip(first[:2], again[:2]):
        assert torch.equal(a, b)
    assert first[2:] == again[2:] and first[2] == [0.0, 1.0, 2.0]
    media_features(video, enc, "enc-b", cache, **PREP)  # other encoder weights
    media_features(video, enc, "enc-a", cache, **{**PREP, "max_frames": 2})  # other preprocessing
    assert enc.calls == 3
    os.utime(video, ns=(0, 0))  # the file changed
    media_features(video, enc, "enc-a", cache, **PREP)
    assert enc.calls == 4
    assert not [f for f in os.listdir(cache) if f.endswith(".tmp")]


@pytest.mark.parametrize("damage", ["cut", "empty", "no_metadata"])
def test_an_unreadable_cache_entry_is_computed_again(tmp_path, caplog, damage):
    """An entry cut short (a copy of the cache interrupted, a full disk) or not written by media_features is a miss:
    computed again and rewritten, not the end of a training run."""
    from safetensors.torch import save_file
    video = write_video(tmp_path / "v.mp4", 2)
    enc, cache = CountingEncoder(), str(tmp_path / "cache")
    first = media_features(video, enc, "e", cache, **PREP)
    (entry,) = [os.path.join(cache, f) for f in os.listdir(cache)]
    if damage == "no_metadata":
        save_file({"vision": torch.zeros(1)}, entry)
    else:
        data = open(entry, "rb").read()
        open(entry, "wb").write(data[:len(data) // 2] if damage == "cut" else b"")
    again = media_features(video, enc, "e", cache, **PREP)
    assert enc.calls == 2 and torch.equal(first[0], again[0]) and first[2:] == again[2:]
    assert "unreadable cache entry" in caplog.text and entry in caplog.text
    media_features(video, enc, "e", cache, **PREP)
    assert enc.calls == 2  # rewritten whole: a hit again


def test_no_cache_dir_always_encodes_and_bad_files_fail_clearly(tmp_path):
    video = write_video(tmp_path / "v.mp4", 2)
    enc = CountingEncoder()
    media_features(video, enc, **PREP)
    media_features(video, enc, **PREP)
    assert enc.calls == 2
    with pytest.raises(MediaError, match="missing.mp4"):
        media_features(tmp_path / "missing.mp4", enc, "x", str(tmp_path / "cache"), **PREP)


def test_audio_only_items_are_cached_too(tmp_path):
    from test_media import write_wav
    wav = write_wav(tmp_path / "a.wav", 2.5, 440.0)
    enc, cache = CountingEncoder(), str(tmp_path / "cache")
    enc_audio = lambda frames, mel: (None, enc(torch.zeros(1, 3, 2, 2), mel)[1])
    vis, aud, times, duration = media_features(None, enc_audio, "e", cache, audio_path=wav, **PREP)
    again = media_features(None, enc_audio, "e", cache, audio_path=wav, **PREP)
    assert vis is None and again[0] is None and torch.equal(aud, again[1]) and enc.calls == 1
    assert aud.shape[0] == 2 and duration == pytest.approx(2.5) and times == []  # 2 s segments


def test_one_file_as_audio_and_as_video_are_two_entries(tmp_path):
    """The key holds each file's role: the video item must not get the audio-only item's entry (no frames)."""
    video = write_video(tmp_path / "v.mp4", 2)
    enc, cache = CountingEncoder(), str(tmp_path / "cache")
    audio_only = media_features(None, lambda frames, mel: (None, enc(torch.zeros(1, 3, 2, 2), mel)[1]), "e", cache,
                                audio_path=video, **PREP)
    vis, aud, times, _ = media_features(video, enc, "e", cache, **PREP)
    assert audio_only[0] is None and enc.calls == 2
    assert vis is not None and vis.shape[0] == len(times) == 2


def test_manifest_lines_resolve_and_malformed_ones_are_skipped_by_name(tmp_path, caplog):
    from data import read_manifest
    (tmp_path / "m.jsonl").write_text("\n".join([
        '{"video": "clips/a.mp4", "prompt": "Describe.", "response": "A red circle."}',
        '{"video": "clips/b.mp4", "prompt": ',  # truncated JSON
        '{"prompt": "no media"}',
        '["not", "an", "object"]',
        '',
        '{"video": "c.mp4", "conversations": [{"from": "human", "value": "<image>\\nDescribe."}, {"from": "gpt", "value": "Hi."}], "events": ["x"]}',
        '{"audio": "audio/d.wav", "prompt": "Please transcribe the speech.", "response": "bako"}']))
    items = read_manifest(tmp_path / "m.jsonl")
    assert [os.path.basename(i.get("video") or i["audio"]) for i in items] == ["a.mp4", "c.mp4", "d.wav"]
    assert items[0]["video"] == str(tmp_path / "clips" / "a.mp4")
    assert items[1]["prompt"] == "Describe." and items[1]["response"] == "Hi." and items[1]["events"] == ["x"]
    skipped = [r.getMessage() for r in caplog.records]
    assert len(skipped) == 3 and all("m.jsonl:" in s for s in skipped)
    assert any("m.jsonl:2:" in s for s in skipped)


def test_manifest_as_one_json_list(tmp_path):
    """The released test set is a JSON list in the conversations format."""
    from data import read_manifest
    (tmp_path / "testset.json").write_text(json.dumps([
        {"video": "0.mp4", "conversations": [{"from": "human", "value": "<image>\nDescribe."}], "events": ["e1", "e2"]},
        {"video": "1.mp4"}]))
    items = read_manifest(tmp_path / "testset.json")
    assert len(items) == 1 and items[0]["prompt"] == "Describe." and items[0]["events"] == ["e1", "e2"]
    assert items[0]["line"].endswith("testset.json:1")


@pytest.mark.parametrize("text", ['{"base": ', "[1, 2]", '{"seconds": [1]}'])
def test_a_results_file_that_is_not_one_is_kept_and_the_metrics_go_aside(tmp_path, text):
    from config import UserError
    from data import merge_results
    path = tmp_path / "results.json"
    path.write_text(text)
    for n in (1, 2):  # a second run against the same file adds to what the first put aside
        with pytest.raises(UserError, match=r"results.json: cannot add to it .*results.json.new.json") as e:
            merge_results(str(path), {f"stage{n}": {"acc": 0.5}}, {f"stage{n}": 12.34})
        assert "\n" not in str(e.value)
    assert path.read_text() == text
    assert json.loads((tmp_path / "results.json.new.json").read_text()) == {
        "stage1": {"acc": 0.5}, "stage2": {"acc": 0.5}, "seconds": {"stage1": 12.3, "stage2": 12.3}}


def test_read_records_names_a_record_without_the_fields_asked_for(tmp_path):
    from config import UserError
    from data import read_records
    path = tmp_path / "captions.jsonl"
    path.write_text('{"id": 3, "caption": "a"}\n\n{"id": "b", "caption": "b"}\n{"id": [1], "caption": "c"}\n')
    fields = {"id": (str, int), "caption": str}
    with pytest.raises(UserError, match=r"captions.jsonl:4: not a record with 'id' \(str or int\), 'caption' \(str\)"):
        read_records(str(path), fields)
    path.write_text('{"id": 3, "caption": "a"}\n\n{"id": "b", "caption": "b"}\n')
    assert [r["id"] for r in read_records(str(path), fields)] == [3, "b"]
