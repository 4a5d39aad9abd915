"""The PyAV media pipeline on small videos written with PyAV: frame sampling, pixels, audio, and broken files."""
import json
import logging
import wave

import av
import numpy as np
import pytest
import torch

from data import MediaError, fit_audio, load_audio, load_video, log_mel_spectrogram, sample_frame_indices

SR = 16000
STEP = 4  # frame i is drawn with grey level STEP * i: coarse enough to survive h264 and the yuv round trip


def write_video(path, seconds, fps=5, size=(64, 48), tone=440.0, colour=None, noise=False, options=None):
    """An h264 mp4 whose frame i is grey STEP * i (or colour, or noise), with a stereo 44.1 kHz AAC sine tone."""
    w, h = size
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", options=options or {}) as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = w, h, "yuv420p"
        audio = out.add_stream("aac", rate=44100, layout="stereo") if tone is not None else None
        for i in range(round(seconds * fps)):
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if noise else np.zeros((h, w, 3), np.uint8)
            if not noise:
                img[:] = STEP * i if colour is None else colour
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        if audio is not None:
            s = (0.5 * np.sin(2 * np.pi * tone * np.arange(round(seconds * 44100)) / 44100)).astype(np.float32)
            for k in range(0, len(s), 1024):
                frame = av.AudioFrame.from_ndarray(np.stack([s[k:k + 1024]] * 2), format="fltp", layout="stereo")
                frame.rate, frame.pts = 44100, k
                out.mux(audio.encode(frame))
            out.mux(audio.encode(None))
    return path


def write_wav(path, seconds, tone, rate=22050):
    s = 0.5 * np.sin(2 * np.pi * tone * np.arange(round(seconds * rate)) / rate)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((s * 32767).astype("<i2").tobytes())
    return path


def frame_ids(frames):  # the source frame index drawn into each sampled frame's grey level
    grey = ((frames + 1) / 2 * 255).mean(dim=(1, 2, 3))
    return (grey / STEP).round().long().tolist()


def peak_hz(audio):
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return np.argmax(spectrum) * SR / len(audio)


def test_sample_frame_indices():
    assert sample_frame_indices(35, 10).tolist() == [0, 10, 20, 30]  # 3.5 s: t = 0, 1, 2, 3
    assert sample_frame_indices(30, 10).tolist() == [0, 10, 20]
    assert sample_frame_indices(3, 10).tolist() == [0]  # under a second still gives a frame
    assert sample_frame_indices(300, 29.97, fps=2).tolist() == list(range(0, 300, 15))
    assert sample_frame_indices(120, 10, max_frames=5).tolist() == [0, 29, 59, 89, 119]  # first to last
    assert len(sample_frame_indices(3600 * 25, 25)) == 110  # an hour: m frames, not floor(m / T) = 0 fps


@pytest.mark.parametrize("seconds, fps, max_frames, ids", [
    (3.5, 10, 110, [0, 10, 20, 30]),  # short: one frame a second from t = 0
    (3.0, 10, 110, [0, 10, 20]),  # exact: no frame at t = duration
    (0.4, 10, 110, [0]),  # under a second
    (12, 5, 110, list(range(0, 60, 5))),
    (12, 5, 5, [0, 14, 29, 44, 59]),  # over-long: max_frames spread uniformly, first and last included
])
def test_frames_sampled(tmp_path, seconds, fps, max_frames, ids):
    path = write_video(tmp_path / "v.mp4", seconds, fps=fps, tone=None)
    media = load_video(path, max_frames=max_frames, image_size=32)
    assert media.frames.shape == (len(ids), 3, 32, 32)
    assert frame_ids(media.frames) == ids
    assert media.times == pytest.approx([i / fps for i in ids])
    assert media.duration == pytest.approx(seconds)


def test_frames_size_range_and_colour(tmp_path):
    path = write_video(tmp_path / "red.mp4", 2, size=(96, 96), colour=(255, 0, 0), tone=None)
    frames = load_video(path).frames
    assert frames.shape == (2, 3, 384, 384) and frames.dtype == torch.float32  # squashed to the tower's square
    assert frames.min() >= -1 and frames.max() <= 1
    assert frames[:, 0].mean() > 0.95 and frames[:, 1:].mean() < -0.95  # red: +1, green and blue: -1


def test_audio_tone_length_and_segments(tmp_path):
    path = write_video(tmp_path / "tone.mp4", 5, tone=440.0)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - 5 * SR) < 0.05 * SR  # AAC priming and padding: close, not exact
    assert len(fit_audio(audio, 5.0)) == min(len(audio), 5 * SR) and len(fit_audio(audio, 0.3)) == SR  # at least 1 s
    assert abs(peak_hz(audio[SR:4 * SR]) - 440) < 2
    assert abs(np.abs(audio[SR:4 * SR]).max() - 0.5 * 2 ** 0.5) < 0.05  # FFmpeg's downmix: (L + R) / sqrt(2)

    media = load_video(path, segment_seconds=2, n_mels=80, image_size=32)
    assert media.has_audio
    assert media.mel.shape == (3, 80, 200)  # ceil(5 / 2) segments of 2 s, 100 frames a second
    fitted = fit_audio(audio, 5.0)
    for i in range(3):
        assert torch.allclose(media.mel[i], log_mel_spectrogram(fitted[2 * SR * i:2 * SR * (i + 1)], 80, 2 * SR))
    assert load_video(path, n_mels=128, image_size=32).mel.shape == (1, 128, 3000)  # one 30 s Whisper chunk


def test_audio_is_trimmed_to_the_video_but_never_padded_up_to_it(tmp_path):
    """As released: pad to 1 s, trim to the video's duration; a 31 s video with 29.5 s of audio keeps one 30 s
    segment (60 tokens), not two."""
    assert len(fit_audio(np.ones(round(29.5 * SR), np.float32), 31.0)) == round(29.5 * SR)
    assert len(fit_audio(np.ones(round(33.0 * SR), np.float32), 31.0)) == 31 * SR
    assert len(fit_audio(np.ones(SR // 4, np.float32), 31.0)) == SR
    wav = write_wav(tmp_path / "short.wav", 1.5, tone=880.0)  # the same, scaled down: 2 s segments, a 3 s video
    media = load_video(write_video(tmp_path / "v.mp4", 3, tone=None), audio_path=wav, segment_seconds=2, image_size=32)
    assert media.mel.shape == (1, 80, 200) and media.duration == pytest.approx(3.0)


def test_no_audio_gives_silence_and_one_warning(tmp_path, caplog):
    path = write_video(tmp_path / "mute.mp4", 3, tone=None)
    assert load_audio(path) is None
    with caplog.at_level(logging.WARNING):
        media = load_video(path, segment_seconds=2, image_size=32)
        load_video(path, segment_seconds=2, image_size=32)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "mute.mp4" in warnings[0].getMessage()
    assert not media.has_audio
    silence = log_mel_spectrogram(np.zeros(2 * SR, np.float32), 80, 2 * SR)
    assert media.mel.shape == (2, 80, 200) and all(torch.equal(m, silence) for m in media.mel)


def test_separate_audio_file(tmp_path, caplog):
    wav = write_wav(tmp_path / "a.wav", 2.0, tone=880.0)
    assert abs(peak_hz(load_audio(wav)) - 880) < 2 and len(load_audio(wav)) == 2 * SR
    want = log_mel_spectrogram(fit_audio(load_audio(wav), 3.0), 80, 3 * SR)  # padded with silence to 3 s
    for tone in [None, 440.0]:  # the file replaces the video's own audio, or its absence (then no warning)
        path = write_video(tmp_path / f"v{tone}.mp4", 3, tone=tone)
        with caplog.at_level(logging.WARNING):
            media = load_video(path, audio_path=wav, segment_seconds=3, image_size=32)
        assert media.has_audio and torch.allclose(media.mel[0], want)
    assert not caplog.records


def broken_files(tmp_path):
    good = write_video(tmp_path / "good.mp4", 6, noise=True).read_bytes()
    faststart = write_video(tmp_path / "fs.mp4", 6, noise=True, tone=None, options={"movflags": "faststart"})
    files = {"missing.mp4": None, "empty.mp4": b"", "half.mp4": good[:len(good) // 2],
             "half_faststart.mp4": faststart.read_bytes()[:faststart.stat().st_size // 2]}
    for name, data in [("corrupt.mp4", good), ("corrupt_video_only.mp4", faststart.read_bytes())]:
        corrupt, n = bytearray(data), len(data) // 2  # 2000 bytes of garbage mid-file: the audio, or the video
        corrupt[n:n + 2000] = np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes()
        files[name] = bytes(corrupt)
    files["audio_only.wav"] = write_wav(tmp_path / "audio_only.wav", 1.0, tone=440.0).read_bytes()
    for name, data in files.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
    return [tmp_path / name for name in files]


def test_broken_files_raise_one_clear_error(tmp_path):
    # missing, zero bytes, cut in half (moov lost; or, moov first, decoding stops short), garbage mid-file
    # (this FFmpeg raises on it rather than concealing), and a file without a video stream
    for path in broken_files(tmp_path):
        with pytest.raises(MediaError) as err:
            load_video(path, image_size=32)
        msg = str(err.value)
        assert path.name in msg and "\n" not in msg, msg
    with pytest.raises(MediaError, match="nowhere.wav"):  # a missing separate audio file
        load_video(write_video(tmp_path / "ok.mp4", 1, tone=None), audio_path=tmp_path / "nowhere.wav")


@pytest.mark.parametrize("line", ['{"caption": "z"}', "[1, 2]", '{"video": ["a.mp4"], "caption": "z"}'])
def test_caption_out_with_a_line_not_a_caption_record_is_named(tmp_path, line):
    """--out is read back to skip the videos already captioned: a line that is no {"video": ...} record is named
    (file and line) before any checkpoint or video is read."""
    import caption
    from config import UserError
    out = tmp_path / "caps.jsonl"
    out.write_text(json.dumps({"video": "a.mp4", "caption": "x"}) + "\n" + line + "\n")
    with pytest.raises(UserError, match=r"caps.jsonl:2: not a record with 'video' \(str\)"):
        caption.main([f"--ckpt={tmp_path / 'no_ckpt'}", f"--video={tmp_path / 'a.mp4'}", f"--out={out}"])
