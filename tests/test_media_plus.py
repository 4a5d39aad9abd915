"""2+ video preprocessing against transformers' Qwen2VLVideoProcessor on the same decoded frames, the
authors' frame sampling and pixel budget, and the 2+ audio input."""
import importlib.machinery
import math
import sys
import types

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data import (PLUS_MAX_FRAMES, PLUS_MAX_PIXELS, SAMPLE_RATE, load_audio_plus, load_video_plus, plus_frame_indices,
                  plus_pixel_values, smart_resize)


def torchvision_resize(image, size, interpolation="bilinear", antialias=True, **kw):
    """torchvision.transforms.v2.functional.resize_image on a CPU tensor, restated: bicubic and bilinear work
    on uint8 natively (no cast), an unchanged size returns the input."""
    if tuple(size) == tuple(image.shape[-2:]):
        return image
    shape = image.shape
    x = image.reshape(-1, *shape[-3:])
    cast = x.dtype not in (torch.float32, torch.float64) and not (x.dtype == torch.uint8 and str(interpolation) in ("bicubic", "bilinear"))
    y = F.interpolate(x.float() if cast else x, size=list(size), mode=str(interpolation), align_corners=False, antialias=antialias)
    if cast:
        y = y.clamp(0, 255).round().to(image.dtype)
    return y.reshape(*shape[:-2], *y.shape[-2:])


@pytest.fixture(scope="module")
def hf_processor():
    """transformers' Qwen2VLVideoProcessor. It needs Pillow (a test requirement) and torchvision, which has no
    wheel for the CPU build of torch on PyPI: where torchvision cannot be imported, a stand-in provides the two
    functions the processor calls, resize (torchvision's CPU path above) and normalize ((x - mean) / std)."""
    import transformers.utils.import_utils as iu
    saved = {n: getattr(iu, n) for n in ("is_torchvision_available", "is_torchvision_v2_available", "is_torchvision_greater_or_equal")}
    saved_map = dict(iu.BACKENDS_MAPPING)
    added = []
    try:
        import torchvision.transforms.v2.functional  # noqa: F401
    except Exception:
        class InterpolationMode(str):
            pass
        modes = dict(NEAREST="nearest", NEAREST_EXACT="nearest-exact", BILINEAR="bilinear", BICUBIC="bicubic",
                     BOX="box", HAMMING="hamming", LANCZOS="lanczos")
        for k, v in modes.items():
            setattr(InterpolationMode, k, v)
        names = ["torchvision", "torchvision.transforms", "torchvision.transforms.v2", "torchvision.transforms.v2.functional",
                 "torchvision.transforms.functional", "torchvision.io"]
        mods = {n: types.ModuleType(n) for n in names}
        for n, m in mods.items():
            m.__spec__, m.__path__ = importlib.machinery.ModuleSpec(n, None, is_package=True), []
            m.InterpolationMode = InterpolationMode
            sys.modules[n] = m
            added.append(n)
            if "." in n:
                setattr(mods[n.rsplit(".", 1)[0]], n.rsplit(".", 1)[1], m)
        fn = mods["torchvision.transforms.v2.functional"]
        fn.resize = torchvision_resize
        fn.normalize = lambda x, mean, std, inplace=False: (x - torch.as_tensor(mean).view(-1, 1, 1)) / torch.as_tensor(std).view(-1, 1, 1)
        mods["torchvision.transforms.functional"].pil_to_tensor = None
        for n in saved:
            setattr(iu, n, lambda *a, **k: True)
        iu.BACKENDS_MAPPING["torchvision"] = (lambda: True, "")
    from transformers.models.qwen2_vl import video_processing_qwen2_vl as vp
    import transformers.image_processing_backends as ipb
    import transformers.video_processing_utils as vpu
    if added:  # transformers modules imported before the stand-in was there
        from transformers.image_utils import PILImageResampling as R
        for m in (vp, ipb, vpu):
            m.tvF = sys.modules["torchvision.transforms.v2.functional"]
        if ipb.pil_torch_interpolation_mapping is None:
            ipb.pil_torch_interpolation_mapping = {R.NEAREST: "nearest-exact", R.BOX: "box", R.BILINEAR: "bilinear",
                                                   R.HAMMING: "hamming", R.BICUBIC: "bicubic", R.LANCZOS: "lanczos"}
    yield vp.Qwen2VLVideoProcessor
    for n in added:
        del sys.modules[n]
    for n, f in saved.items():
        setattr(iu, n, f)
    iu.BACKENDS_MAPPING.clear()
    iu.BACKENDS_MAPPING.update(saved_map)


def smooth_frames(n, h, w, seed=0):
    """Natural-image-like uint8 frames (smooth, with an edge), so resampling overshoot stays small."""
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.rand(n, 3, 6, 8, generator=g) * 255, size=(h, w), mode="bilinear", align_corners=False)
    base[..., : h // 3, : w // 2] += 40
    return base.clamp(0, 255).round().to(torch.uint8)


@pytest.mark.parametrize("n,h,w,max_pixels", [(6, 90, 160, 61250), (5, 360, 480, 61250), (4, 50, 50, 200000),
                                              (3, 28, 56, 61250 * 0.95 * 768 / 3)],
                         ids=["landscape-down", "odd-frames", "square-up", "scaled-budget"])
def test_pixel_values_equal_transformers(hf_processor, n, h, w, max_pixels):
    frames = smooth_frames(n, h, w)
    proc = hf_processor(size={"shortest_edge": 784, "longest_edge": max_pixels}, do_sample_frames=False)
    ref = proc(videos=[frames], return_tensors="pt", cap_pixels_per_frame=False, do_convert_rgb=False)
    pixels, grid = plus_pixel_values(frames, 784, max_pixels)
    assert grid.tolist() == ref["video_grid_thw"][0].tolist()
    assert grid[0] == math.ceil(n / 2) and pixels.shape == ref["pixel_values_videos"].shape
    assert (pixels - ref["pixel_values_videos"]).abs().max().item() <= 1e-5


def test_smart_resize_known_sizes():
    assert smart_resize(720, 1280, 28, 784, 61250) == (168, 308)  # 51,744 pixels <= 61,250
    assert smart_resize(10, 10, 28, 784, 61250) == (28, 28)  # up to the 28 x 28 minimum
    assert smart_resize(1080, 1920, 28, 784, 61250 * 0.95 * 768 / 100) == (476, 868)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 3000)


def test_frame_sampling_rule():
    """round(duration / 0.1) frames within [min, max], spread from the first to the last frame."""
    assert plus_frame_indices(300, 10.0).tolist() == np.linspace(0, 299, 100, dtype=int).tolist()  # 10 s at 30 fps: 100
    assert len(plus_frame_indices(30, 1.0)) == 30  # 10 wanted, min 64, but a 30-frame clip has 30 distinct frames
    assert len(plus_frame_indices(30 * 600, 600.0)) == PLUS_MAX_FRAMES  # 10 minutes: capped at 768


def write_clip(path, seconds, fps=25, size=(96, 64), rate=16000):
    with av.open(str(path), "w") as c:
        v = c.add_stream("mpeg4", rate=fps)
        v.width, v.height, v.pix_fmt = size[0], size[1], "yuv420p"
        a = c.add_stream("aac", rate=rate)
        a.layout = "mono"
        for i in range(int(seconds * fps)):
            img = np.full((size[1], size[0], 3), (i * 7) % 255, np.uint8)
            for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        t = np.arange(int(seconds * rate)) / rate
        for k in range(0, len(t), 1024):
            chunk = (0.3 * np.sin(2 * np.pi * 440 * t[k:k + 1024])).astype(np.float32)[None]
            frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout="mono")
            frame.sample_rate = rate
            for p in a.encode(frame):
                c.mux(p)
        for s in (v, a):
            for p in s.encode():
                c.mux(p)


def test_load_video_plus(tmp_path):
    """4 s at 25 fps: round(4 / 0.1) = 40 frames wanted, raised to the minimum of 64 (of the 100 there) -> 32
    grids of 2 frames at an effective 16 fps, 0.125 s per grid; the pixel budget grows by 0.95 * 768 / 64."""
    clip = tmp_path / "clip.mp4"
    write_clip(clip, 4.0)
    v = load_video_plus(clip)
    assert v.duration == pytest.approx(4.0) and v.video_grid_thw[0] == 32
    assert v.second_per_grid_ts == pytest.approx(0.125)
    h, w = smart_resize(64, 96, 28, 784, 0.95 * PLUS_MAX_FRAMES / 64 * PLUS_MAX_PIXELS)
    assert v.video_grid_thw.tolist() == [32, h // 14, w // 14]
    assert v.pixel_values_videos.shape == (32 * (h // 14) * (w // 14), 1176)
    mel, seconds = load_audio_plus(clip)
    assert mel.shape == (1, 128, 3000) and seconds == pytest.approx(4.0, abs=0.1)  # one 30 s chunk: 60 audio tokens


def test_short_audio_is_padded_to_one_second(tmp_path):
    clip = tmp_path / "short.mp4"
    write_clip(clip, 0.4)
    mel, seconds = load_audio_plus(clip)
    assert mel.shape == (1, 128, 3000) and seconds == 1.0


def test_chat_format_plus(tmp_path):
    """before + block + after + response tokenizes as the authors' whole rendered conversation does, and the
    labels are what their target mask keeps: the assistant turn less <|im_start|>assistant\n (3 tokens with
    Qwen's tokenizer, more with this toy one)."""
    from conftest import make_tokenizer
    from data import encode_prompt_plus, encode_response_plus
    tok = make_tokenizer()
    tok.add_special_tokens(["<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|audio_pad|>"])
    block = "<|vision_start|>" + "<|video_pad|>" * 4 + "<|audio_pad|>" * 2 + "<|vision_end|>"
    before, after = encode_prompt_plus(tok, "Describe the video in detail.")
    response = encode_response_plus(tok, "A red circle appears.")
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    user = f"<|im_start|>user\n{block}\nDescribe the video in detail.<|im_end|>\n"
    assistant = "<|im_start|>assistant\nA red circle appears.<|im_end|>\n"
    ids = lambda s: tok.encode(s, add_special_tokens=False).ids
    assert before + ids(block) + after + response == ids(system) + ids(user) + ids(assistant)
    assert response == ids(assistant)[len(ids("<|im_start|>assistant\n")):]


def test_a_video_too_thin_for_qwen2_vl_is_a_media_error(tmp_path):
    """Qwen2-VL's resize refuses an aspect ratio over 200: a video of one is unusable, named like any other."""
    from data import MediaError, load_media
    clip = tmp_path / "thin.mp4"
    write_clip(clip, 1.0, size=(804, 2))
    with pytest.raises(MediaError, match="thin.mp4: aspect ratio 402 over 200"):
        load_media(clip, None, {"plus": True, "min_frames": 4, "max_frames": 16})
