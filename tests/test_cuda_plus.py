"""video-SALMONN 2+ in bf16 on CUDA against transformers' Qwen2.5-VL (the tolerances of tests/test_cuda.py): the
ViT alone, and the whole model's logits on a video prompt, each against transformers in fp32 on the CPU."""
import pytest
import torch
import transformers as hf
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from encoders import Qwen25Vision, Qwen25VisionConfig
from model_plus import VideoSALMONN2Plus
from test_cuda import BF16, DEV, assert_bf16_parity
from test_plus_model import AUDIO, TOKENS, base_dirs, video_prompt  # noqa: F401  base_dirs: the tiny Qwen2.5-VL fixture
from test_qwen25_vision import TINY, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: the bf16 GPU parity tests run only where a GPU is present")


def test_vision_bf16_parity():
    ref = reference()
    ours = Qwen25Vision(Qwen25VisionConfig(**TINY))
    ours.load_state_dict(ref.state_dict())
    ours = ours.to(DEV, BF16).eval()
    theirs = Qwen2_5_VisionTransformerPretrainedModel(hf.Qwen2_5_VLVisionConfig(**TINY))
    theirs.load_state_dict(ref.state_dict())
    theirs = theirs.to(DEV, BF16).eval()
    grid = torch.tensor([[2, 8, 12], [1, 6, 4]])
    px = torch.randn(int(grid.prod(-1).sum()), 1176)
    with torch.no_grad():
        expected = ref.eval()(px, grid_thw=grid).pooler_output
        got = ours(px.to(DEV, BF16), grid.to(DEV))
        other = theirs(px.to(DEV, BF16), grid_thw=grid.to(DEV)).pooler_output
    assert_bf16_parity(got, other, expected, "Qwen2.5-VL ViT")


def test_video_logits_bf16_parity(base_dirs):  # noqa: F811
    ref, root = base_dirs
    ours = VideoSALMONN2Plus.from_base(root / "qwen_vl", root / "whisper", AUDIO, dtype=BF16, device=DEV).eval()
    theirs = hf.Qwen2_5_VLForConditionalGeneration.from_pretrained(root / "qwen_vl", dtype=BF16).to(DEV).eval()
    grid = (2, 4, 6)
    ids = torch.tensor([video_prompt(grid, 1.0)])
    px = torch.randn(48, 1176)
    kw = dict(video_grid_thw=torch.tensor([grid]), second_per_grid_ts=torch.tensor([1.0]))
    mm = (ids == TOKENS["video_token_id"]).int() * 2
    with torch.no_grad():
        expected = ref(input_ids=ids, pixel_values_videos=px, mm_token_type_ids=mm, **kw).logits
        got = ours.logits(input_ids=ids.to(DEV), pixel_values_videos=px.to(DEV, BF16), **{k: v.to(DEV) for k, v in kw.items()})
        other = theirs(input_ids=ids.to(DEV), pixel_values_videos=px.to(DEV, BF16), mm_token_type_ids=mm.to(DEV),
                       **{k: v.to(DEV) for k, v in kw.items()}).logits
    assert_bf16_parity(got, other, expected, "2+ logits on a video prompt")
