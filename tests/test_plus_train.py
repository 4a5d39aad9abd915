"""The 2+ family through the same three training scripts on the toy world (config/toy_plus_*.py, a few steps
each): visual base -> audio alignment -> audio-visual SFT -> one MrDPO round; each stage trains what the
released 2+ trains, and its model loads as a VideoSALMONN2Plus."""
import json
import os
import runpy
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import lora
from checkpoint import load_model
from config import UserError, configure
from model_plus import VideoSALMONN2Plus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stage(script, cfg, *overrides):
    """Run a training script's stage in this process: its settings (runpy, without __main__), then configure."""
    g = runpy.run_path(os.path.join(ROOT, script), run_name="settings")
    return g["train"](configure(g, [os.path.join(ROOT, cfg), *overrides]), script.split("_")[1].split(".")[0])


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def changed(a, b):
    return {k for k in a if not torch.equal(a[k], b[k])}


def test_toy_plus_stages(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    d, o = tmp_path / "toyav", tmp_path / "out"
    subprocess.run([sys.executable, "data/toyav/prepare.py", "--small", "--out", str(d)], cwd=ROOT, check=True, capture_output=True)
    common = [f"--cache_dir={o / 'cache'}", "--steps=2", "--batch_size=2", "--val_data=", "--device=cpu", "--dtype=float32"]
    base = stage("train_sft.py", "config/toy_plus_base.py", *common, f"--tokenizer={d / 'tokenizer.json'}",
                 f"--train_data={d / 'base_train.jsonl'},{d / 'text_train.jsonl'}", f"--out_dir={o / 'base'}")
    align = stage("train_align.py", "config/toy_plus_align.py", *common, f"--init_from={base}",
                  f"--train_data={d / 'align_train.jsonl'}", f"--out_dir={o / 'align'}")
    with pytest.raises(UserError, match="snap_audio: the video-SALMONN 2\\+ model has no such switch"):
        stage("train_sft.py", "config/toy_plus_sft.py", *common, f"--init_from={align}", "--snap_audio=True",
              f"--train_data={d / 'train.jsonl'}", f"--out_dir={o / 'snap'}")
    sft = stage("train_sft.py", "config/toy_plus_sft.py", *common, f"--init_from={align}",
                f"--train_data={d / 'train.jsonl'}", f"--out_dir={o / 'sft'}")
    for path in (base, align, sft):
        assert isinstance(load_model(path), VideoSALMONN2Plus)
    # alignment trains the Q-Former, q_tokens and audio_proj only; SFT also the LLM (LoRA merged) and the merger
    assert {k.split(".")[1] for k in changed(weights(base), weights(align))} == {"qformer", "q_tokens", "audio_proj"}
    moved = changed(weights(align), weights(sft))
    assert {k for k in moved if k.startswith("visual.")} and all(k.startswith("visual.merger.") for k in moved if k.startswith("visual."))
    assert {k.split(".")[-2] for k in moved if k.startswith("model.layers.")} == {"q_proj", "k_proj", "v_proj"}
    assert not [k for k in moved if k.startswith("audio.") and not k.startswith(("audio.qformer.", "audio.q_tokens", "audio.audio_proj."))]

    import train_mrdpo
    g = dict(vars(train_mrdpo))
    c = configure(g, ["config/toy_plus_mrdpo.py", f"--init_from={sft}", f"--train_data={d / 'train.jsonl'}",
                      f"--val_data={d / 'val.jsonl'}", f"--test_data={d / 'test.jsonl'}", f"--cache_dir={o / 'cache'}",
                      f"--out_dir={o / 'mrdpo'}", f"--results={o / 'results.json'}", "--rounds=1", "--steps_per_round=2",
                      "--batch_size=2", "--videos_per_round=4", "--val_items=1", "--max_new_tokens=8",
                      "--thresholds=((-1.0, -1.0),)", "--device=cpu", "--dtype=float32"])
    train_mrdpo.main(c)
    res = json.loads((o / "results.json").read_text())
    assert [r["round"] for r in res["rounds"]] == [1] and res["rounds"][0]["pairs"] > 0
    proxy = load_file(str(o / "mrdpo" / "round1" / "proxy.safetensors"))  # the round's proxy and what trains with it
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in proxy} == {"llm.layers", "visual.merger", "audio.qformer",
                                                                         "audio.q_tokens", "audio.audio_proj"}
    final = load_model(o / "mrdpo" / "final")  # round 1's model, its proxy merged
    model, _ = train_mrdpo.round_model(c, torch.device("cpu"), 1)
    lora.merge_lora(model)
    for k, v in final.state_dict().items():
        assert torch.allclose(v, model.state_dict()[k], atol=1e-6), k
