"""The frozen-feature cache: a hit skips decoding and the encoders; any change of its key misses."""
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


def test_no_cache_dir_always_encodes_and_bad_files_fail_clearly(tmp_path):
    video = write_video(tmp_path / "v.mp4", 2)
    enc = CountingEncoder()
    media_features(video, enc, **PREP)
    media_features(video, enc, **PREP)
    assert enc.calls == 2
    with pytest.raises(MediaError, match="missing.mp4"):
        media_features(tmp_path / "missing.mp4", enc, "x", str(tmp_path / "cache"), **PREP)
