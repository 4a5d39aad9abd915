"""
Export a trained video-SALMONN 2 or 2+ for serving:
- out/: the whole model, LoRA merged into the backbone (paper Eq. 8), in the released layout of its family
  (config.json, safetensors shards with their index, tokenizer.json), which checkpoint.load_model,
  caption.py and eval.py load;
- video-SALMONN 2: out/qwen2/, the LLM alone in the Hugging Face Qwen2ForCausalLM layout (config.json,
  generation_config.json, safetensors shards, tokenizer.json and tokenizer_config.json with the chat template),
  so tools that serve Qwen2 (transformers, vLLM, ...) load it; they see text only;
- 2+: out/qwen2_5_vl/, the LLM and the ViT in the Hugging Face Qwen2.5-VL layout, for visual-only serving tools
  (the audio branch and the audio-visual training positions stay here).

$ python export.py --ckpt=out/sft/ckpt --out=out/export     # a stage's training checkpoint: its init_from + trained weights
$ python export.py --ckpt=out/sft/final --out=out/export    # any model dir in the released layout (a stage's final, MrDPO's final)
"""
import os
import shutil

import torch

import lora
from checkpoint import load_model, read_json_object, save_hf_qwen2, save_hf_qwen25vl
from config import UserError, configure, run
from data import load_tokenizer
from training import build_model, load_weights, saved_settings

# -----------------------------------------------------------------------------
ckpt = ""  # out_dir/ckpt of train_sft.py / train_align.py, or a model dir in the released layout
out = ""  # written whole to out.tmp, then renamed
tokenizer = ""  # tokenizer.json for a model dir without one; empty: the checkpoint's
dtype = "bfloat16"  # of the exported weights ("" keeps the checkpoint's)
max_shard_gb = 5.0  # safetensors shard size, as Hugging Face uploads use
# -----------------------------------------------------------------------------


def load(path, tokenizer=""):
    """(merged model, tokenizer) from a training checkpoint or a released-layout model dir (tokenizer: a
    tokenizer.json for a model dir without one)."""
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such checkpoint directory")
    meta = os.path.join(path, "meta.json")
    if not os.path.exists(meta):
        tok = load_tokenizer(tokenizer or path)  # before the model: a missing tokenizer.json fails in a second
        return load_model(path), tok
    c = saved_settings(read_json_object(meta), meta)
    torch.manual_seed(c["seed"])
    model, tok = build_model(c, torch.device("cpu"), dtype="float32", lora_dropout=0.0)
    load_weights(model, path)
    return lora.merge_lora(model), tok


def export(c):
    model, tok = load(c["ckpt"], c["tokenizer"])
    dt = getattr(torch, c["dtype"]) if c["dtype"] else next(model.llm.parameters()).dtype
    state = {n: (p.to(dt) if p.is_floating_point() else p) for n, p in model.state_dict().items() if "lora_" not in n}
    shard_bytes = int(c["max_shard_gb"] * 2**30)
    tmp = c["out"].rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state, shard_bytes)
    tok.save(os.path.join(tmp, "tokenizer.json"))
    if hasattr(model, "visual"):  # 2+
        hf = os.path.join(tmp, "qwen2_5_vl")
        save_hf_qwen25vl(state, model.cfg, hf, dt, tok, shard_bytes)
    else:
        hf = os.path.join(tmp, "qwen2")
        save_hf_qwen2(state, model.cfg.llm, tok, hf, dt, shard_bytes)
    shutil.rmtree(c["out"], ignore_errors=True)
    os.replace(tmp, c["out"])
    print(f"exported {c['ckpt']} -> {c['out']} (released layout) and {hf.replace(tmp, c['out'])} (Hugging Face)")
    return c["out"]


def main(argv):
    c = configure(globals(), argv)
    if not c["ckpt"] or not c["out"]:
        raise UserError("usage: python export.py --ckpt=DIR --out=DIR  (--help: every setting)")
    export(c)


if __name__ == "__main__":
    run(main)
