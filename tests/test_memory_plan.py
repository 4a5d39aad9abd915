"""bench/memory_plan.py against reality: its parameter, gradient and optimizer bytes equal those of a tiny model
set up by training.build_model after a real AdamW step, sharding halves what FSDP2 shards and not the
encoders, its activation formula equals the tensors autograd really saves, and the 7B table prints."""
import importlib.util
import math
import os
import re
import runpy

import pytest
import torch

import lora
from conftest import make_tokenizer, run_cli
from model import AVConfig, VideoSALMONN2
import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("memory_plan", os.path.join(ROOT, "bench", "memory_plan.py"))
mp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mp)

ARCH = dict(  # every part shaped as in the 7B model, tiny; an 8 x 8 patch grid: 4 x 5 = 20 tokens per frame
    llm=dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2),
    vision=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=2),
    whisper=dict(num_mel_bins=80, d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=48,
                 max_source_positions=100),
    qformer=dict(encoder_width=32, hidden=32, heads=2, intermediate=48, window=25, frames_per_segment=100, llm_dim=64),
    pool=2, segment_seconds=2.0, time_aligned=False)
R = 8  # LoRA rank


def sample(cfg, frames=3, segments=1, response=12):
    """(features, prompt ids, response ids): one entry of a VideoSALMONN2 forward batch, bf16 features as cached."""
    vis = torch.randn(frames, cfg.vision.grid ** 2, cfg.vision.hidden_size, dtype=torch.bfloat16)
    aud = None if segments == 0 else torch.randn(segments, cfg.qformer.frames_per_segment, cfg.qformer.encoder_width,
                                                 dtype=torch.bfloat16)
    feats = (vis, aud, [float(i) for i in range(frames)], float(frames))
    return feats, ([1, 2, 3, 4], [5, 6]), list(range(10, 10 + response))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny model as training.build_model sets it up (trainable fp32, frozen bf16), after one real
    backward (CPU autocast, as training uses on GPU) and one AdamW step."""
    tok = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    make_tokenizer(tok)
    c = dict(dtype="bfloat16", tokenizer=str(tok), init_from="scratch", llava="", arch=ARCH, lora_r=R,
             lora_targets=mp.lora_targets, lora_alpha=2 * R, lora_dropout=0.05, trainable=mp.trainable,
             activation_checkpointing=False)
    torch.manual_seed(0)
    model, _ = training.build_model(c, torch.device("cpu"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nll, n = model([sample(model.cfg)])
    nll.backward()
    opt.step()
    return model, opt


def nbytes(t):
    return t.numel() * t.element_size()


def test_constants_are_those_of_the_7b_sft_config():
    cfg = {**vars(training), **runpy.run_path(os.path.join(ROOT, "config", "vs2_7b_sft.py"))}  # its defaults, overridden
    assert (mp.lora_r, mp.lora_targets, mp.lora_dropout, mp.trainable) == (cfg["lora_r"], cfg["lora_targets"], cfg["lora_dropout"], cfg["trainable"])
    assert (mp.frames, mp.batch_size, mp.activation_checkpointing) == (cfg["max_frames"], cfg["batch_size"], cfg["activation_checkpointing"])


def test_one_gpu_state_equals_the_real_tensors(built):
    model, opt = built
    p = mp.plan(model.cfg, 1, 100, lora_r=R)
    assert p["params"] == sum(nbytes(t) for t in model.parameters())
    grads = [t.grad for t in model.parameters() if t.grad is not None]
    assert all(g.dtype == torch.float32 for g in grads) and len(grads) == len(opt.param_groups[0]["params"])
    assert p["grads"] == sum(nbytes(g) for g in grads)
    # exp_avg and exp_avg_sq; AdamW's scalar step count is a CPU tensor on GPU runs too, so not GPU memory
    state = [t for s in opt.state.values() for k, t in s.items() if k != "step"]
    assert len(state) == 2 * len(grads) and p["optimizer"] == sum(nbytes(t) for t in state)
    assert p["encoders"] == sum(nbytes(t) for m in (model.tower, model.speech_encoder) for t in m.parameters())


def test_two_gpus_halve_what_fsdp_shards_and_not_the_encoders(built):
    model, _ = built
    one, two = mp.plan(model.cfg, 1, 100, lora_r=R), mp.plan(model.cfg, 2, 100, lora_r=R)
    encoders = {id(t) for m in (model.tower, model.speech_encoder) for t in m.parameters()}
    sharded = [t for t in model.parameters() if id(t) not in encoders]
    half = lambda ts: sum(math.ceil(t.shape[0] / 2) * math.prod(t.shape[1:]) * t.element_size() for t in ts)  # noqa: E731
    assert two["encoders"] == one["encoders"] > 0
    assert two["params"] - two["encoders"] == half(sharded)
    trained = [t for t in sharded if t.requires_grad]
    assert two["grads"] == half(trained) and two["optimizer"] == 2 * half(trained)
    # the rows FSDP2 pads (a tensor with an odd number of rows) are a sliver of the whole
    for k in ("grads", "optimizer"):
        assert two[k] == pytest.approx(one[k] / 2, rel=0.01)
    assert two["params"] - two["encoders"] == pytest.approx((one["params"] - one["encoders"]) / 2, rel=0.01)


def saved_bytes(fn, params):
    """Bytes of the distinct tensors autograd saves for backward while fn() runs, parameters excluded."""
    skip, seen = {p.untyped_storage().data_ptr() for p in params}, {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


@pytest.mark.parametrize("targets,dropout", [(("q_proj", "k_proj", "v_proj"), 0.05),
                                             (("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"), 0.0)],
                         ids=["released", "no-dropout"])
def test_activation_formula_equals_the_saved_tensors(targets, dropout):
    """A bf16 forward as under FSDP2 (every weight bf16), in training mode, checkpointing off: the bytes
    autograd saves equal the formula, but for dropout's mask, a bf16 noise tensor on the CPU (a bool mask on CUDA)."""
    torch.manual_seed(0)
    cfg = AVConfig.from_dict(ARCH)
    model = VideoSALMONN2(cfg)
    lora.apply_lora(model.llm, targets, R, 2 * R, dropout)
    for name, p in model.named_parameters():
        p.requires_grad_(any(t in name for t in mp.trainable))
    model = model.to(torch.bfloat16).train()
    frames, response = 12, 16
    ex = sample(cfg, frames, 0, response)  # visual only: the audio path's saved tensors depend on autocast
    measured, (nll, _) = saved_bytes(lambda: model([ex]), list(model.parameters()))
    L = frames * cfg.tokens_per_frame + 6 + response  # 6 prompt ids
    formula = (mp.llm_saved(cfg.llm, L, response, R, targets, dropout, False, mask_bytes=2)
               + mp.projector_saved(cfg, frames))
    print(f"saved for backward: measured {measured:,} bytes, formula {formula:,} bytes")
    assert formula == measured
    nll.backward()  # and the graph is whole


def test_script_prints_the_7b_table():
    out = run_cli("bench/memory_plan.py")
    assert out.returncode == 0, out.stderr[-2000:]
    print(out.stdout)
    assert "7,615,616,512" in out.stdout  # Qwen2-7B, untied head: the LLM's exact count
    rows = {m.group(1, 2): list(map(float, m.group(3).split())) for m in
            re.finditer(r"^\s*(\d+) GPUs?\s+ckpt (on|off)\s+([\d. ]+)$", out.stdout, re.M)}
    assert set(rows) == {("8", "on"), ("8", "off"), ("1", "on"), ("1", "off")}
    total = rows["8", "on"][-1]
    assert 0 < total < 80 and total == pytest.approx(sum(rows["8", "on"][:-1]), abs=0.03)
    assert rows["8", "off"][-1] > total and rows["1", "on"][-1] > total


PLUS_ARCH = dict(  # a tiny 2+: the 7B's classes and trainable set
    llm=dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, mrope_section=(2, 3, 3)),
    vision=dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, window_size=56,
                fullatt_block_indexes=(0,)),
    whisper=dict(num_mel_bins=80, d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=48,
                 max_source_positions=100),
    qformer=dict(encoder_width=32, hidden=32, heads=2, intermediate=48, window=25, frames_per_segment=100, llm_dim=64,
                 final_linear=False),
    tokens=dict(vision_start_token_id=290, vision_end_token_id=291, video_token_id=292, audio_token_id=293))


@pytest.mark.parametrize("targets,dropout", [(("q_proj", "k_proj", "v_proj"), 0.05)], ids=["released"])
def test_plus_activation_formula_equals_the_saved_tensors(targets, dropout):
    """2+, as the v1 test above: the LLM's saved tensors, the merger's (the 2+ visual path) and the mask that places
    the video tokens equal the formula."""
    from model_plus import PlusConfig, VideoSALMONN2Plus
    torch.manual_seed(0)
    cfg = PlusConfig.from_dict(PLUS_ARCH)
    model = VideoSALMONN2Plus(cfg)
    lora.apply_lora(model.llm, targets, R, 2 * R, dropout)
    for name, p in model.named_parameters():
        p.requires_grad_(any(t in name for t in mp.PLUS["trainable"]))
    model = model.to(torch.bfloat16).train()
    t, h, w, response = 3, 4, 6, 16  # 3 grids of 4 x 6 patches: 18 video tokens
    vis = torch.randn(t, h, w, cfg.vision.hidden_size, dtype=torch.bfloat16)
    ex = ((vis, None, [0.0, 1.0, 2.0], 6.0), ([1, 2, 3, 4], [5, 6]), list(range(10, 10 + response)))
    measured, (nll, _) = saved_bytes(lambda: model([ex]), list(model.parameters()))
    L = 2 + t * h * w // 4 + 6 + response
    formula = (mp.llm_saved(cfg.llm, L, response, R, targets, dropout, False, mask_bytes=2)
               + mp.merger_saved(cfg, t * h * w) + mp.scatter_masks_saved(L, 1))
    print(f"saved for backward: measured {measured:,} bytes, formula {formula:,} bytes")
    assert formula == measured
    nll.backward()


@pytest.mark.parametrize("name,worlds", [("vs2plus_7b", ("8", "1")), ("vs2plus_72b", ("64", "32"))])
def test_script_prints_the_plus_tables(name, worlds):
    out = run_cli("bench/memory_plan.py", f"--model={name}")
    assert out.returncode == 0, out.stderr[-2000:]
    print(out.stdout)
    assert ("LLM 7,615,616,512" if name == "vs2plus_7b" else "LLM 72,706,203,648") in out.stdout  # Qwen2.5-VL's LLM
    rows = {m.group(1, 2): list(map(float, m.group(3).split())) for m in
            re.finditer(r"^\s*(\d+) GPUs?\s+ckpt (on|off)\s+([\d. ]+)$", out.stdout, re.M)}
    assert set(rows) == {(w, c) for w in worlds for c in ("on", "off")}
    for w in worlds:
        assert 0 < rows[w, "on"][-1] < rows[w, "off"][-1]
        assert rows[w, "on"][-1] == pytest.approx(sum(rows[w, "on"][:-1]), abs=0.03)
