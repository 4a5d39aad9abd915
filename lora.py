"""
LoRA (Hu et al., 2021) by hand, in the style of litgpt / torchtune, as video-SALMONN 2 uses it.

            x ──────────────► W (frozen) ─────────────┐
            │                                         + ──► y = W x + b + scale * B A dropout(x)
            └─► dropout ─► A (r x in) ─► B (out x r) ─┘ * scale
                           Kaiming       zeros

B starts at zero, so a fresh adapter leaves the model's function unchanged; A is Kaiming-uniform
as in PEFT; scale = alpha / r. The defaults are the released video-SALMONN 2 ones: r = 128,
alpha = 256 (scale 2), dropout 0.05, on the q/k/v projections of the LLM.

The model keeps one active adapter. Multi-round MrDPO (paper Eq. 8) folds it into the weights,
W_t = W_{t-1} + scale * B_{t-1} A_{t-1} (merge_lora), and starts a fresh proxy (reinit_lora);
`with disabled(model)` runs the base weights alone, which is the DPO reference model.

Everything works on plain tensors and on FSDP2 (fully_shard) DTensor parameters: the base weight
and lora_B are both sharded on their output dimension, so each rank merges its own rows exactly.
"""
import math
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

TARGETS = ("q_proj", "k_proj", "v_proj")


class LoRALinear(nn.Module):
    """A drop-in for an nn.Linear: `weight` and `bias` are the very parameters of the replaced layer
    (so its state-dict keys do not change, and base checkpoints still load), frozen; `lora_A` and
    `lora_B` are the trainable adapter."""

    def __init__(self, base: nn.Linear, r=128, alpha=256, dropout=0.05):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)  # None when the base has no bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **like))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **like))
        self.r, self.scale = r, alpha / r
        self.dropout = nn.Dropout(dropout)
        self.disabled = False
        self.train(base.training)  # a model already in eval stays deterministic
        self.reset_lora()

    @torch.no_grad()
    def reset_lora(self, generator=None):
        """A Kaiming-uniform, B zero: the adapter is a no-op until B trains."""
        # draw the whole A on every rank, then keep this rank's rows, so a seed gives the same A
        # sharded or not
        A = torch.empty(self.lora_A.shape, dtype=self.lora_A.dtype, device=self.lora_A.device)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        _copy_full(self.lora_A, A)
        self.lora_B.zero_()

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.disabled:
            return y
        return y + self.scale * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, scale={self.scale}"


def apply_lora(module, targets=TARGETS, r=128, alpha=256, dropout=0.05):
    """Replace, in place, every nn.Linear whose attribute name is in targets (anywhere below
    module) by a LoRALinear, and return module. Only the replaced base weights are frozen: the
    caller decides what else trains (see mark_only_lora_trainable)."""
    found = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
             if name in targets and isinstance(child, nn.Linear)]
    if not found:  # a misspelt target would otherwise train nothing without a word
        raise ValueError(f"no nn.Linear named any of {tuple(targets)} in {type(module).__name__}")
    for parent, name, child in found:
        setattr(parent, name, LoRALinear(child, r, alpha, dropout))
    return module


def lora_layers(module):
    return [m for m in module.modules() if isinstance(m, LoRALinear)]


def mark_only_lora_trainable(module):
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name)
    return module


@torch.no_grad()
def merge_lora(module):
    """Fold each adapter into its weight, W += scale * B A, and zero B, so the function is unchanged
    and the LoRALinear stays in place for the next round (paper Eq. 8). The product is taken in
    float32 and the sum rounded once to W's dtype, so bf16 weights lose nothing but that rounding."""
    _reshard(module)
    for m in lora_layers(module):
        if isinstance(m.weight, DTensor) and m.weight.placements != m.lora_B.placements:
            raise ValueError(f"weight and lora_B sharded differently: {m.weight.placements} vs {m.lora_B.placements}")
        W, B = _local(m.weight), _local(m.lora_B)  # the same output rows of W and of B
        A = m.lora_A.full_tensor() if isinstance(m.lora_A, DTensor) else m.lora_A  # every row needs all of A
        W.copy_((W.float() + m.scale * (B.float() @ A.float())).to(W.dtype))
        B.zero_()
    return module


def reinit_lora(module, generator=None):
    """A fresh adapter on every LoRALinear (A Kaiming-uniform, B zero): outputs are unchanged."""
    _reshard(module)
    for m in lora_layers(module):
        m.reset_lora(generator)
    return module


@contextmanager
def disabled(module):
    """Run the base weights alone inside the block (the DPO reference model); the previous flags
    come back on exit, exception or not. Only a Python flag flips: no parameter changes."""
    layers = lora_layers(module)
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield module
    finally:
        for m, flag in zip(layers, before):
            m.disabled = flag


def lora_state_dict(module):
    """{name: full tensor} of the adapter parameters. Under FSDP2 every rank must call it (it gathers)."""
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach()
            for n, p in module.named_parameters() if "lora_" in n}


def save_lora(module, path):
    """The adapter alone, as safetensors; under torch.distributed every rank gathers, rank 0 writes."""
    state = {n: t.contiguous().cpu() for n, t in lora_state_dict(module).items()}
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_file(state, str(path))


@torch.no_grad()
def load_lora(module, path, state=None):
    """Load an adapter saved by save_lora (or given as state); its keys must be exactly the model's adapter keys."""
    state = load_file(str(path)) if state is None else state
    params = {n: p for n, p in module.named_parameters() if "lora_" in n}
    missing, unexpected = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
    if missing or unexpected:
        raise KeyError(f"LoRA checkpoint {path}: missing keys {missing}, unexpected keys {unexpected}")
    for n, p in params.items():
        if state[n].shape != p.shape:
            raise ValueError(f"LoRA checkpoint {path}: {n} has shape {tuple(state[n].shape)}, model {tuple(p.shape)}")
        _copy_full(p, state[n].to(p.device, p.dtype))
    return module


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def _copy_full(p, full):
    """Write a full (unsharded) tensor into p, which may be a DTensor: each rank keeps its own part."""
    if isinstance(p, DTensor):
        full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
    _local(p).copy_(full)


def _reshard(module):
    # FSDP2 all-gathers parameters for forward and may keep them gathered afterwards (the root
    # does); writes must go to the sharded parameters it keeps, not to a gathered copy it frees
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
