"""export.py: a training checkpoint exported, then reloaded, gives the trained model's logits, in our
released layout and, for the LLM, in Hugging Face's Qwen2 layout as transformers reads it."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from test_train import run, world, write_config  # noqa: F401 (world is a fixture)

import checkpoint
import export
import model as M
import training
from checkpoint import CheckpointError
from config import configure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def exported(world, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("export")
    cfg = write_config(d / "sft.py", world, d / "sft", steps=3, ckpt_every=3, lora_r=4, lora_alpha=8,
                       trainable=("lora_", "audio."))
    run(["train_sft.py", cfg])
    # a shard limit of 20 kB splits the tiny model into several files, as 5 GB splits a 7B one
    run(["export.py", f"--ckpt={d / 'sft' / 'ckpt'}", f"--out={d / 'exp'}", "--dtype=", "--max_shard_gb=0.00002"])
    return d


def weights(path):
    files = checkpoint.checkpoint_keys(path)
    return {k: load_file(f)[k] for k, f in files.items()}


def test_export_of_a_checkpoint_equals_the_trained_model(exported):
    out = exported / "exp"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (out / "model.safetensors").exists()
    trained = load_file(exported / "sft" / "final" / "model.safetensors")  # written by train_sft at the end, merged
    got = weights(str(out))
    assert got.keys() == trained.keys()
    for k in trained:
        torch.testing.assert_close(got[k], trained[k], rtol=0, atol=1e-6)
    a = M.VideoSALMONN2.from_pretrained(str(out)).eval()
    b = M.VideoSALMONN2.from_pretrained(str(exported / "sft" / "final")).eval()
    ids = torch.randint(0, a.cfg.llm.vocab_size, (2, 12))
    torch.testing.assert_close(a.llm(ids)[0], b.llm(ids)[0], rtol=0, atol=1e-5)


def test_qwen2_layout_loads_in_ours_and_in_transformers(exported):
    transformers = pytest.importorskip("transformers")
    out = exported / "exp"
    av = M.VideoSALMONN2.from_pretrained(str(out)).eval()
    ours = M.Qwen2.from_pretrained(str(out / "qwen2")).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out / "qwen2"), torch_dtype=torch.float32).eval()
    ids = torch.randint(0, av.cfg.llm.vocab_size, (2, 12))
    with torch.no_grad():
        want = av.llm(ids)[0]
        torch.testing.assert_close(ours(ids)[0], want, rtol=0, atol=1e-5)
        torch.testing.assert_close(hf(ids).logits, want, rtol=1e-4, atol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(str(out / "qwen2"))
    text = tok.apply_chat_template([{"role": "user", "content": "Describe the video in detail."}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nDescribe the video in detail.<|im_end|>\n<|im_start|>assistant\n")
    assert hf.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_export_of_a_model_dir_and_bad_checkpoint(exported, tmp_path):
    run(["export.py", f"--ckpt={exported / 'sft' / 'final'}", f"--out={tmp_path / 'again'}", "--dtype=bfloat16"])
    again, first = weights(str(tmp_path / "again")), weights(str(exported / "exp"))
    assert all(again[k].dtype == torch.bfloat16 and torch.equal(again[k], first[k].to(torch.bfloat16)) for k in first)
    bad = tmp_path / "bad"
    bad.mkdir()
    meta = json.loads((exported / "sft" / "ckpt" / "meta.json").read_text())
    meta["config"]["lora_r"] = 8  # a config that builds a model the weights do not fit
    (bad / "meta.json").write_text(json.dumps(meta))
    (bad / "trainable.safetensors").write_bytes((exported / "sft" / "ckpt" / "trainable.safetensors").read_bytes())
    out = run_cli("export.py", f"--ckpt={bad}", f"--out={tmp_path / 'x'}")
    assert out.returncode != 0 and str(bad) in out.stderr and not (tmp_path / "x").exists()


def test_a_bad_meta_json_is_named_before_a_model_builds(tmp_path):
    good = json.loads(json.dumps(configure(vars(training), [])))  # as meta.json holds the settings: tuples as lists
    assert training.saved_settings({"config": good}, "meta.json") == good
    cases = [("noseed", {k: v for k, v in good.items() if k != "seed"}, "its config has no 'seed'"),
             ("typed", {**good, "lora_r": "8"}, "its config's lora_r must be int, got '8'"),
             ("flag", {**good, "time_aligned": "yes"}, "its config's time_aligned must be bool or None, got 'yes'"),
             ("nodict", [], "no config object")]
    for name, c, match in cases:
        (tmp_path / name).mkdir()
        (tmp_path / name / "meta.json").write_text(json.dumps({"step": 3, "cursor": 6, "config": c, "world": 1}))
        with pytest.raises(CheckpointError, match=f"{name}/meta.json: {match}"):
            export.load(str(tmp_path / name))
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "meta.json").write_text('{"step": 3, "config"')
    with pytest.raises(CheckpointError, match="cut/meta.json: not a JSON object"):
        export.load(str(tmp_path / "cut"))
