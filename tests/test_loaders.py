"""Checkpoint layouts: sharded files, LLaVA-OneVision (llava-hf and lmms-lab), clear errors."""
import json

import pytest
import torch
import transformers as hf
from safetensors.torch import load_file, save_file

import checkpoint
from checkpoint import CheckpointError
from encoders import SiglipVision, SiglipVisionConfig, WhisperConfig, WhisperEncoder
from model import AVConfig, Qwen2, Qwen2Config
from qformer import QFormerConfig

TEXT = dict(model_type="qwen2", vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6)
VISION = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=3,
              num_attention_heads=2, image_size=28, patch_size=14)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """A tiny LlavaOnevisionForConditionalGeneration saved by transformers (llava-hf layout)."""
    torch.manual_seed(0)
    cfg = hf.LlavaOnevisionConfig(text_config=TEXT, vision_config=VISION, image_token_index=5, video_token_index=6)
    ref = hf.LlavaOnevisionForConditionalGeneration(cfg).eval()
    path = tmp_path_factory.mktemp("llava_hf")
    ref.save_pretrained(path)
    return ref, path


def reference_outputs(ref, idx, px):
    with torch.no_grad():
        h = ref.model.language_model(idx).last_hidden_state
        return ref.lm_head(h), ref.model.vision_tower(px, output_hidden_states=True).hidden_states


def write_layout(path, tensors, config):
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_llava_hf_layout(llava):
    ref, path = llava
    idx, px = torch.randint(0, 97, (2, 13)), torch.randn(2, 3, 28, 28)
    logits, hs = reference_outputs(ref, idx, px)
    with torch.no_grad():
        assert (Qwen2.from_pretrained(path)(idx)[0] - logits).abs().max() <= 1e-4
        assert (SiglipVision.from_pretrained(path)(px) - hs[-1]).abs().max() <= 1e-4


def test_llava_hf_hub_key_names(llava, tmp_path):
    """The files on the hub name the tower vision_tower.vision_model.*"""
    ref, path = llava
    sd = {(k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k): v
          for k, v in load_file(str(path / "model.safetensors")).items()}
    hub = write_layout(tmp_path / "hub", sd, json.loads((path / "config.json").read_text()))
    px = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        assert (SiglipVision.from_pretrained(hub)(px) - reference_outputs(ref, torch.zeros(1, 1, dtype=torch.long), px)[1][-1]).abs().max() <= 1e-4


LMMS_LAB_RENAMES = [("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                    ("vision_tower.", "model.vision_tower.vision_tower.vision_model."),
                    ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
                    ("multi_modal_projector.linear_2.", "model.mm_projector.2."), ("image_newline", "model.image_newline")]


def to_lmms_lab(state):
    """A llava-hf LLaVA-OneVision state dict under the original lmms-lab key names."""
    out = {}
    for k, v in state.items():
        old, new = next((o, n) for o, n in LMMS_LAB_RENAMES if k.startswith(o))
        out[new + k[len(old):]] = v
    return out


def test_lmms_lab_layout(llava, tmp_path, monkeypatch):
    """The original LLaVA-OneVision files: one flat Qwen2 config with mm_* keys, the tower under
    model.vision_tower.vision_tower.vision_model.*, its last layer dropped; plus video-SALMONN 2's audio keys."""
    ref, path = llava
    monkeypatch.setattr(checkpoint, "SIGLIP_SO400M", {k: v for k, v in VISION.items() if k != "model_type"})
    sd = to_lmms_lab(load_file(str(path / "model.safetensors")))
    sd["speech_Qformer.bert.embeddings.LayerNorm.weight"] = torch.ones(8)  # the released model's audio half
    sd["final_linear.0.weight"] = torch.ones(64, 64)
    lmms = write_layout(tmp_path / "lmms", sd, {**TEXT, "model_type": "llava", "mm_vision_tower": "google/siglip-so400m-patch14-384"})
    idx, px = torch.randint(0, 97, (1, 9)), torch.randn(1, 3, 28, 28)
    logits, hs = reference_outputs(ref, idx, px)
    tower = SiglipVision.from_pretrained(lmms)
    assert len(tower.encoder.layers) == VISION["num_hidden_layers"] - 1  # LLaVA drops the last layer
    with torch.no_grad():
        assert (Qwen2.from_pretrained(lmms)(idx)[0] - logits).abs().max() <= 1e-4
        assert (tower(px) - hs[-2]).abs().max() <= 1e-4


def test_sharded_checkpoint(tmp_path):
    torch.manual_seed(0)
    ref = hf.Qwen2ForCausalLM(hf.Qwen2Config(**TEXT)).eval()
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    idx = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        assert (Qwen2.from_pretrained(tmp_path)(idx)[0] - ref(idx).logits).abs().max() <= 1e-4


def test_loads_in_bf16_without_a_float32_copy(tmp_path):
    hf.Qwen2ForCausalLM(hf.Qwen2Config(**TEXT)).save_pretrained(tmp_path)
    m = Qwen2.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in m.parameters())


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere: no such checkpoint directory"):
        Qwen2.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps(TEXT))
    with pytest.raises(CheckpointError, match="noweights: no model.safetensors"):
        Qwen2.from_pretrained(tmp_path / "noweights")
    hf.Qwen2ForCausalLM(hf.Qwen2Config(**TEXT)).save_pretrained(tmp_path / "ok")
    sd = load_file(str(tmp_path / "ok" / "model.safetensors"))
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    missing = dict(sd)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"1 missing keys \['layers.1.mlp.up_proj.weight'\]"):
        Qwen2.from_pretrained(write_layout(tmp_path / "missing", missing, config))
    extra = {**sd, "model.layers.0.self_attn.rotary.inv_freq": torch.ones(8)}
    with pytest.raises(ValueError, match=r"1 unexpected keys \['layers.0.self_attn.rotary.inv_freq'\]"):
        Qwen2.from_pretrained(write_layout(tmp_path / "extra", extra, config))
    with pytest.raises(ValueError, match="missing keys"):  # a Whisper dir is not a Qwen2 dir
        WhisperEncoder.from_pretrained(tmp_path / "ok")


def test_weights_that_do_not_fit_the_config_are_named(tmp_path):
    sd = {("" if k.startswith("lm_head.") else "model.") + k: v
          for k, v in Qwen2(checkpoint.make_config(Qwen2Config, TEXT)).state_dict().items()}
    assert Qwen2.from_pretrained(write_layout(tmp_path / "ok", sd, TEXT))
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(97, 64)  # a row too many: 96 in the config
    bad = write_layout(tmp_path / "bad", sd, TEXT)
    with pytest.raises(CheckpointError, match=r"bad/model.safetensors: model.layers.1.mlp.up_proj.weight is \[97, 64\], "
                                              r"Qwen2's layers.1.mlp.up_proj.weight is \[96, 64\]"):
        Qwen2.from_pretrained(bad)


def written(path, name, text):
    path.mkdir(exist_ok=True)
    (path / name).write_text(text)
    return path


def test_malformed_config_and_train_config_are_named(tmp_path):
    av = AVConfig(Qwen2Config(), checkpoint.make_config(SiglipVisionConfig, VISION), WhisperConfig(), QFormerConfig()).to_dict()
    assert checkpoint.model_config(written(tmp_path / "ok", "config.json", json.dumps({"video_salmonn_2": av})))[1].pool == 2
    with pytest.raises(CheckpointError, match=r"list/config.json: not a JSON object \(a list\)"):
        checkpoint.model_config(written(tmp_path / "list", "config.json", "[1, 2]"))
    typed = {**av, "llm": {**av["llm"], "hidden_size": "128"}}
    with pytest.raises(CheckpointError, match=r"typed/config.json: .*llm.hidden_size must be int, got '128'"):
        checkpoint.model_config(written(tmp_path / "typed", "config.json", json.dumps({"video_salmonn_2": typed})))
    with pytest.raises(CheckpointError, match=r"plus/config.json: .*vision.depth must be int, got 3.5"):
        checkpoint.model_config(written(tmp_path / "plus", "config.json", json.dumps({"model_type": "qwen2_5_vl",
                                                                                      "vision_config": {"depth": 3.5}})))
    with pytest.raises(CheckpointError, match=r"nokey/config.json: .*KeyError: 'qformer'"):
        checkpoint.model_config(written(tmp_path / "nokey", "config.json",
                                        json.dumps({"video_salmonn_2": {k: v for k, v in av.items() if k != "qformer"}})))
    assert checkpoint.train_config(tmp_path / "ok") == {}  # a released checkpoint has none
    for name, text in (("cut", '{"caption_prompt'), ("tclist", "[]")):
        with pytest.raises(CheckpointError, match=f"{name}/train_config.json: not a JSON object"):
            checkpoint.train_config(written(tmp_path / name, "train_config.json", text))
