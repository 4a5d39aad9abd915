"""Our Qwen2.5-VL ViT against transformers' Qwen2_5_VisionTransformerPretrainedModel on the same weights."""
import pytest
import torch
import transformers as hf
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from encoders import Qwen25Vision, Qwen25VisionConfig

# window_size 56 px = 2 x 2 merged tokens per window: every grid below is cut into several windows,
# most of them with a ragged edge
TINY = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=14, temporal_patch_size=2,
            spatial_merge_size=2, window_size=56, out_hidden_size=24, fullatt_block_indexes=[1, 3])


def reference(seed=0):
    torch.manual_seed(seed)
    ref = Qwen2_5_VisionTransformerPretrainedModel(hf.Qwen2_5_VLVisionConfig(**TINY)).eval()
    with torch.no_grad():  # biases are zero and norms one at init: make every parameter matter
        for name, p in ref.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.normal_(std=0.1).add_(1.0 if ("norm" in name or "ln_q" in name) and name.endswith("weight") else 0.0)
    return ref


def ours_from(ref):
    ours = Qwen25Vision(Qwen25VisionConfig(**TINY)).eval()
    ours.load_state_dict(ref.state_dict())  # strict: the parameter names are HF's below `visual.`
    return ours


@pytest.mark.parametrize("grids", [[(1, 6, 10)], [(2, 8, 4), (3, 4, 6)], [(1, 2, 2), (2, 10, 6)]],
                         ids=["one-frame", "two-videos", "tiny-and-tall"])
def test_matches_transformers(grids):
    ref = reference()
    ours = ours_from(ref)
    grid_thw = torch.tensor(grids)
    n = int(grid_thw.prod(-1).sum())
    px = torch.randn(n, 3 * 2 * 14 * 14)
    with torch.no_grad():
        expected = ref(px, grid_thw=grid_thw).pooler_output
        got = ours(px, grid_thw)
    assert got.shape == (n // 4, 24)
    assert (got - expected).abs().max().item() <= 1e-4


def test_windows_split_frames():
    """The tiny window cuts a 5 x 3 merged grid into 3 x 2 windows (ragged at the right and bottom), and
    the window order visits each window's merged tokens row by row."""
    ours = Qwen25Vision(Qwen25VisionConfig(**TINY))
    order, lengths = ours.windows(torch.tensor([[1, 10, 6]]))  # merged 5 x 3
    assert lengths == [16, 8, 16, 8, 8, 4]  # patches per window: 4, 2, 4, 2, 2, 1 merged tokens
    assert order.tolist() == [0, 1, 3, 4, 2, 5, 6, 7, 9, 10, 8, 11, 12, 13, 14]
    assert sorted(order.tolist()) == list(range(15))


def test_window_attention_is_local():
    """Changing the patches of one window changes the output of another only through the full-attention
    blocks: with none, the far window's tokens stay exactly the same."""
    ours = Qwen25Vision(Qwen25VisionConfig(**{**TINY, "fullatt_block_indexes": []})).eval()
    grid = torch.tensor([[1, 8, 8]])  # merged 4 x 4: windows of 2 x 2 merged tokens
    px = torch.randn(64, 3 * 2 * 14 * 14)
    changed = px.clone()
    changed[:4] += 1.0  # the first merge block, in the top-left window
    with torch.no_grad():
        a, b = ours(px, grid), ours(changed, grid)
    moved = (a - b).abs().amax(-1) > 1e-6  # (16,) merged tokens, row by row
    assert moved.view(4, 4)[:2, :2].all() and not moved.view(4, 4)[:, 2:].any() and not moved.view(4, 4)[2:].any()


def test_default_config_is_qwen25_vl_7b():
    cfg = Qwen25VisionConfig()
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.patch_dim) == (32, 1280, 16, 80, 1176)
    assert list(cfg.fullatt_block_indexes) == [7, 15, 23, 31] and cfg.window_size == 112
