"""LoRA: equivalences that must hold exactly (fresh adapter, merge, reinit, disabled, save/load),
single-process and under FSDP2 (two gloo processes on CPU, run as `torchrun ... tests/test_lora.py`)."""
import copy
import os
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from lora import (LoRALinear, TARGETS, apply_lora, disabled, load_lora, lora_layers, lora_state_dict,
                  mark_only_lora_trainable, merge_lora, reinit_lora, save_lora)
from model import Qwen2, Qwen2Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2)
IDX = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(0))


def tiny(seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    m = Qwen2(Qwen2Config(**{**CFG, **kw})).eval()
    with torch.no_grad():  # q/k/v biases are zero at init: make them matter
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    return m.to(dtype)


def randomize_B(m, seed=1, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(m):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * std)
    return m


def logits(m):
    with torch.no_grad():
        return m(IDX)[0]


def test_defaults_and_placement():
    m = apply_lora(tiny())
    q = m.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and (q.r, q.scale, q.dropout.p) == (128, 2.0, 0.05)
    assert TARGETS == ("q_proj", "k_proj", "v_proj")
    assert len(lora_layers(m)) == 3 * CFG["num_hidden_layers"]
    assert not isinstance(m.layers[0].self_attn.o_proj, LoRALinear)
    assert q.lora_A.shape == (128, 32) and q.lora_B.shape == (32, 128) and not q.training
    assert (q.lora_B == 0).all() and 0 < q.lora_A.abs().max() <= 1 / 32 ** 0.5  # Kaiming bound, a = sqrt(5)
    with pytest.raises(ValueError, match="qproj"):
        apply_lora(tiny(), targets=("qproj",))


def test_fresh_adapter_is_exactly_the_base():
    base = tiny()
    assert torch.equal(logits(apply_lora(tiny())), logits(base))


def test_merge_equals_unmerged_fp32():
    m = randomize_B(apply_lora(tiny()))
    q = m.layers[1].self_attn.q_proj
    want_W = q.weight + q.scale * q.lora_B @ q.lora_A
    before = logits(m)
    assert not torch.allclose(before, logits(tiny()), atol=1e-3)  # the adapter matters
    merge_lora(m)
    assert_close(q.weight, want_W, rtol=0, atol=1e-6)
    assert (q.lora_B == 0).all() and isinstance(m.layers[1].self_attn.q_proj, LoRALinear)
    assert_close(logits(m), before, rtol=0, atol=1e-5)
    W = q.weight.clone()
    merge_lora(m)  # B is zero now: merging again changes nothing
    assert torch.equal(q.weight, W)


def test_merge_bf16_rounds_once():
    m = randomize_B(apply_lora(tiny(dtype=torch.bfloat16)))
    q = m.layers[0].self_attn.v_proj
    assert q.lora_A.dtype == q.lora_B.dtype == torch.bfloat16
    want_W = (q.weight.float() + q.scale * (q.lora_B.float() @ q.lora_A.float())).to(torch.bfloat16)
    truth = logits(copy.deepcopy(m).float())  # the same bf16 weights, run in fp32
    unmerged_err = (logits(m).float() - truth).abs().max()
    merge_lora(m)
    assert torch.equal(q.weight, want_W)
    # merging rounds each weight once more to bf16: the logits stay as close to fp32 as bf16 allows
    assert (logits(m).float() - truth).abs().max() <= 2 * unmerged_err


def test_reinit_after_merge_keeps_outputs():
    m = merge_lora(randomize_B(apply_lora(tiny())))
    A, merged = m.layers[0].self_attn.k_proj.lora_A.clone(), logits(m)
    reinit_lora(m, torch.Generator().manual_seed(5))
    assert not torch.equal(m.layers[0].self_attn.k_proj.lora_A, A)
    assert torch.equal(logits(m), merged)
    again = reinit_lora(merge_lora(randomize_B(apply_lora(tiny()))), torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(lora_state_dict(m).values(), lora_state_dict(again).values()))


def test_disabled_is_base_and_restores_flags():
    base = logits(tiny())
    m = randomize_B(apply_lora(tiny()))
    adapted = logits(m)
    m.layers[1].self_attn.v_proj.disabled = True  # a layer already off stays off afterwards
    flags = [layer.disabled for layer in lora_layers(m)]
    with disabled(m):
        assert torch.equal(logits(m), base)
    assert [layer.disabled for layer in lora_layers(m)] == flags
    with pytest.raises(RuntimeError, match="boom"):
        with disabled(m):
            raise RuntimeError("boom")
    assert [layer.disabled for layer in lora_layers(m)] == flags
    m.layers[1].self_attn.v_proj.disabled = False
    assert torch.equal(logits(m), adapted)


def test_base_state_dict_keys_unchanged():
    base = tiny()
    m = apply_lora(tiny(seed=1))
    keys, lora_keys = set(base.state_dict()), set(m.state_dict()) - set(base.state_dict())
    assert keys <= set(m.state_dict()) and lora_keys and all("lora_" in k for k in lora_keys)
    assert "layers.0.self_attn.q_proj.weight" in keys and "layers.0.self_attn.q_proj.bias" in keys
    res = m.load_state_dict(base.state_dict(), strict=False)  # a base checkpoint loads under LoRA
    assert set(res.missing_keys) == lora_keys and not res.unexpected_keys
    assert torch.equal(logits(m), logits(base))


def test_save_load_round_trip(tmp_path):
    src, dst = randomize_B(apply_lora(tiny()), seed=2), apply_lora(tiny())
    save_lora(src, tmp_path / "a.safetensors")
    load_lora(dst, tmp_path / "a.safetensors")
    assert torch.equal(logits(dst), logits(src))


def test_load_names_bad_keys(tmp_path):
    from safetensors.torch import save_file
    m = apply_lora(tiny())
    state = {k: v.contiguous() for k, v in lora_state_dict(m).items()}
    state["layers.9.self_attn.q_proj.lora_A"] = state.pop("layers.1.self_attn.k_proj.lora_B")
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(KeyError, match=r"layers\.1\.self_attn\.k_proj\.lora_B.*layers\.9\.self_attn\.q_proj\.lora_A"):
        load_lora(m, tmp_path / "bad.safetensors")
    state = lora_state_dict(apply_lora(tiny(), r=4))
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "r4.safetensors")
    with pytest.raises(ValueError, match="lora_A has shape"):
        load_lora(m, tmp_path / "r4.safetensors")


def test_only_lora_trains_and_gradients_flow():
    m = tiny().requires_grad_(False)
    apply_lora(m)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == set(lora_state_dict(m))
    q = m.layers[0].self_attn.q_proj
    m(IDX)[0].square().mean().backward()
    assert q.lora_B.grad.abs().sum() > 0 and q.weight.grad is None and q.bias.grad is None
    assert (q.lora_A.grad == 0).all()  # B = 0 blocks A's gradient until B moves
    randomize_B(m)
    m.zero_grad()
    m(IDX)[0].square().mean().backward()
    assert q.lora_A.grad.abs().sum() > 0
    trainable = tiny()  # apply_lora freezes only the layers it replaces
    apply_lora(trainable)
    assert trainable.layers[0].mlp.up_proj.weight.requires_grad and not trainable.layers[0].self_attn.q_proj.weight.requires_grad
    mark_only_lora_trainable(trainable)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == set(lora_state_dict(trainable))


def test_fsdp2_matches_single_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "LORA_TMP": str(tmp_path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", os.path.abspath(__file__)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    assert out.stdout.count("fsdp2 lora ok") == 2


def fsdp_worker():
    """Every check compares the sharded model with an unsharded twin built from the same seeds."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    # 63 rows of gate_proj and r = 5 rows of A split unevenly over two ranks
    def build():
        m = apply_lora(tiny(intermediate_size=63), TARGETS + ("gate_proj",), r=5, alpha=10)
        return randomize_B(mark_only_lora_trainable(m))
    base_logits, ref, m = logits(tiny(intermediate_size=63)), build(), build()
    for block in m.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(m, mesh=mesh)
    assert isinstance(m.layers[0].mlp.gate_proj.lora_A, DTensor)
    ref_logits = logits(ref)
    assert_close(logits(m), ref_logits, rtol=0, atol=1e-5)
    with disabled(m):
        assert_close(logits(m), base_logits, rtol=0, atol=1e-5)
    assert_close(logits(m), ref_logits, rtol=0, atol=1e-5)
    # a training step's LoRA gradients (averaged over ranks that saw the same batch)
    for model in (m, ref):
        model(IDX)[0].square().mean().backward()
    grads = {n: p.grad.full_tensor() for n, p in m.named_parameters() if p.grad is not None}
    assert grads.keys() == lora_state_dict(ref).keys()
    for n, p in ref.named_parameters():
        if p.grad is not None:
            assert_close(grads[n], p.grad, rtol=0, atol=1e-6)
    # the root alone keeps its parameters gathered after a no-grad forward: merging must still
    # reach the sharded ones
    root_only = build()
    fully_shard(root_only, mesh=mesh)
    logits(root_only)
    merge_lora(m), merge_lora(ref), merge_lora(root_only)
    for model in (m, root_only):
        full = {n: p.full_tensor() for n, p in model.named_parameters()}
        for n, p in ref.named_parameters():
            assert_close(full[n], p, rtol=0, atol=1e-5, msg=n)
    assert_close(logits(m), ref_logits, rtol=0, atol=1e-5)
    reinit_lora(m, torch.Generator().manual_seed(3)), reinit_lora(ref, torch.Generator().manual_seed(3))
    for (n, a), b in zip(lora_state_dict(m).items(), lora_state_dict(ref).values()):
        assert torch.equal(a, b), n
    path = os.path.join(os.environ["LORA_TMP"], "ref.safetensors")
    save_lora(randomize_B(ref, seed=7), path)  # rank 0 writes
    dist.barrier()
    load_lora(m, path)
    assert_close(logits(m), logits(ref), rtol=0, atol=1e-5)
    print(f"rank {dist.get_rank()}: fsdp2 lora ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    fsdp_worker()
