"""Our SigLIP tower against transformers' SiglipVisionModel / SiglipModel on the same weights."""
import pytest
import torch
import transformers as hf

from encoders import SiglipVision

VISION = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, image_size=56,
              patch_size=14)


def randomise_biases(module):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)


def test_vision_model_matches_last_hidden_state(tmp_path):
    torch.manual_seed(0)
    ref = hf.SiglipVisionModel(hf.SiglipVisionConfig(**VISION)).eval()
    randomise_biases(ref)
    ref.save_pretrained(tmp_path)
    ours = SiglipVision.from_pretrained(tmp_path).eval()
    px = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        out = ours(px)
        hs = ref(px, output_hidden_states=True).hidden_states
    assert out.shape == (2, 16, 64)
    assert (out - hs[-1]).abs().max().item() <= 1e-4
    assert (out - ref(px).last_hidden_state).abs().max().item() > 1e-3  # that one has post-layernorm


def test_siglip_model_vision_half_with_kept_layers(tmp_path):
    """A SiglipModel dir (text half ignored); keeping 2 of 3 layers gives hidden_states[-2]."""
    torch.manual_seed(0)
    cfg = hf.SiglipConfig(vision_config=VISION, text_config=dict(hidden_size=32, intermediate_size=48,
                          num_hidden_layers=1, num_attention_heads=2, vocab_size=50))
    ref = hf.SiglipModel(cfg).eval()
    randomise_biases(ref)
    ref.save_pretrained(tmp_path)
    ours = SiglipVision.from_pretrained(tmp_path, keep_layers=2).eval()
    assert len(ours.encoder.layers) == 2
    px = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        hs = ref.vision_model(px, output_hidden_states=True).hidden_states
        assert (ours(px) - hs[-2]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_load_casts_to_dtype(tmp_path, dtype):
    hf.SiglipVisionModel(hf.SiglipVisionConfig(**VISION)).save_pretrained(tmp_path)
    ours = SiglipVision.from_pretrained(tmp_path, dtype=dtype)
    assert all(p.dtype == dtype for p in ours.parameters())
    assert ours(torch.randn(1, 3, 56, 56, dtype=dtype)).dtype == dtype
