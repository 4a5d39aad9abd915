"""
Supervised training of video-SALMONN 2 (paper 3.2): audio-visual SFT with LoRA and the audio aligner,
and, in the toy world, the visual base (stage 0). The loop, the FSDP2 setup and the checkpoints here
are shared by train_align.py.

$ python train_sft.py config/toy_sft.py                                          # one process (CPU or GPU)
$ torchrun --standalone --nproc_per_node=8 train_sft.py config/vs2_7b_sft.py     # one 8-GPU node
$ torchrun --nnodes=4 --nproc_per_node=8 --node_rank=$NODE_RANK --master_addr=$MASTER --master_port=29500 \\
      train_sft.py config/vs2_7b_sft.py                                          # 4 nodes, shared out_dir
$ python train_sft.py config/toy_sft.py --resume                                 # continue from out_dir/ckpt
"""
import datetime
import json
import math
import os
import shutil
import sys
import time
from functools import lru_cache

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

import lora
from config import configure
from data import MediaError, encode_prompt, encode_response, load_tokenizer, media_features, read_manifest
from model import AVConfig, VideoSALMONN2

# -----------------------------------------------------------------------------
# model
init_from = ""  # a checkpoint dir (released layout, with tokenizer.json), or "scratch" to build `arch`
llava = ""  # with `whisper` instead of init_from: LLaVA-OneVision + Whisper with a fresh audio aligner
whisper = ""  # Whisper checkpoint dir, with `llava`
arch = {}  # AVConfig as a dict, for init_from="scratch"
tokenizer = ""  # tokenizer.json; default: the one in init_from or llava
lora_r = 128  # LoRA rank (0: no LoRA); released: 128
lora_alpha = 256  # LoRA alpha: scale alpha / r = 2.0 as released
lora_dropout = 0.05  # dropout on the LoRA input
lora_targets = ("q_proj", "k_proj", "v_proj")  # LLM linears that get LoRA, as released
trainable = ("lora_", "audio.")  # substrings of the parameter names that train; all else is frozen
time_aligned = None  # True: each frame gets only its own seconds' audio tokens; False: Eq. 4-6; None: as the checkpoint
# data
train_data = "data/toyav/train.jsonl"  # manifest, or several joined by commas
val_data = "data/toyav/val.jsonl"  # manifest for the validation loss ("" for none)
tasks = ("caption", "qa")  # manifest tasks to train on
use_audio = True  # False: the model sees frames only (the visual base)
fps = 1.0  # frames per second sampled
max_frames = 110  # frames at most; a longer video is sampled uniformly
cache_dir = "out/cache"  # frozen-encoder features, shared by every stage and round
# optimisation
batch_size = 1  # sequences per process per step (global batch = batch_size * world size)
steps = 1000  # optimizer steps
stop_at = 0  # end this run after this step (the schedule stays that of `steps`; continue with --resume)
lr = 2e-5  # peak learning rate
warmup_ratio = 0.03  # linear warmup over this fraction of the steps, then cosine to zero
weight_decay = 0.0  # AdamW weight decay
grad_clip = 1.0  # max global gradient norm (0: off)
max_bad_steps = 10  # consecutive non-finite losses before the run stops
activation_checkpointing = False  # recompute each LLM block in backward to save memory
# system
out_dir = "out/sft"  # checkpoints (ckpt/), the final model (final/), log.jsonl
log_every = 10  # steps between log lines
eval_every = 200  # steps between validation losses (0: only at the end)
eval_items = 50  # validation items per evaluation
ckpt_every = 200  # steps between checkpoints (0: only at the end)
resume = False  # continue from out_dir/ckpt
seed = 2024  # data order, LoRA init, dropout
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # parameter dtype of the frozen backbone
# -----------------------------------------------------------------------------
# dense bf16 FLOP/s by device name, the first key found in torch.cuda.get_device_name() wins (so PCIe before SXM)
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "H800": 989e12,
              "A100": 312e12, "A800": 312e12}


def setup_distributed(device):
    """(rank, world, device) under torchrun, (0, 1, device) as one process."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device)
    # the other ranks wait at a barrier while rank 0 exports, or judges a round's captions: longer than the default 10 min
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=datetime.timedelta(hours=3))
    rank, world = dist.get_rank(), dist.get_world_size()
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return rank, world, torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return rank, world, torch.device("cpu")


def build_model(c, dev):
    """The model with LoRA applied and only the `trainable` parameters requiring grad, and its tokenizer."""
    dt = getattr(torch, c["dtype"])
    tok = load_tokenizer(c["tokenizer"] or c["init_from"] or c["llava"])
    if c["init_from"] == "scratch":
        cfg = AVConfig.from_dict(c["arch"])
        cfg.llm.vocab_size = tok.get_vocab_size()
        model = VideoSALMONN2(cfg)
    elif c["llava"]:
        model = VideoSALMONN2.from_base(c["llava"], c["whisper"])
    else:
        model = VideoSALMONN2.from_pretrained(c["init_from"])
    if c.get("time_aligned") is not None:  # an interleaving switch, no weights: saved with the model's config
        model.cfg.time_aligned = c["time_aligned"]
    if c["lora_r"]:
        lora.apply_lora(model.llm, c["lora_targets"], c["lora_r"], c["lora_alpha"], c["lora_dropout"])
    for name, p in model.named_parameters():
        p.requires_grad_(any(t in name for t in c["trainable"]))
        p.data = p.data.to(torch.float32 if p.requires_grad else dt)  # AdamW wants fp32 weights to update
    model.llm.activation_checkpointing = c["activation_checkpointing"]
    return model.to(dev), tok


def shard(model, world, dev):
    """FSDP2: each LLM block a unit, then the root. The frozen encoders stay whole on every rank: each
    rank encodes its own cache misses, which sharded encoders would turn into mismatched collectives."""
    if world == 1:
        return model
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dev.type == "cuda" else MixedPrecisionPolicy()
    for block in model.llm.layers:
        fully_shard(block, mp_policy=mp)
    frozen = set(model.tower.parameters()) | set(model.speech_encoder.parameters())
    fully_shard(model, mp_policy=mp, ignored_params=frozen)
    return model


def lr_at(step, c):
    """Linear warmup, then cosine decay to zero."""
    warm = max(1, round(c["warmup_ratio"] * c["steps"]))
    if step < warm:
        return c["lr"] * (step + 1) / warm
    return c["lr"] * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, c["steps"] - warm)))


class Features:
    """Cached encoder features and token ids of manifest items. Items without a response or whose media cannot
    be read are dropped once, up front (every rank agrees), counted and named, so training never meets them."""

    def __init__(self, model, tok, items, c, rank, world):
        cfg = model.cfg
        self.model, self.c = model, c
        self.prep = dict(fps=c["fps"], max_frames=c["max_frames"], image_size=cfg.vision.image_size,
                         n_mels=cfg.whisper.num_mel_bins, segment_seconds=cfg.segment_seconds)
        self.fingerprint = model.encoder_fingerprint()
        bad = set()
        for i in range(rank, len(items), world):  # check, and warm the cache: each rank its share
            problem = None if isinstance(items[i].get("response"), str) else "no response to train on"
            if problem is None:
                try:
                    self.features(items[i])
                except MediaError as e:
                    problem = e
            if problem:
                print(f"skipped bad sample ({items[i]['line']}): {problem}", flush=True)
                bad.add(i)
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, bad)
            bad = set().union(*gathered)
        self.skipped = len(bad)
        self.items = [it for i, it in enumerate(items) if i not in bad]
        self.ids = [(encode_prompt(tok, it["prompt"]), encode_response(tok, it["response"])) for it in self.items]

    def features(self, item):
        if not (item.get("video") or item.get("audio")):
            return None, None, [], 0.0  # a text-only item
        vis, aud, times, duration = media_features(item.get("video"), self.model.encode, self.fingerprint,
                                                   self.c["cache_dir"], item.get("audio"), **self.prep)
        return vis, aud if self.c["use_audio"] else None, times, duration

    def example(self, i, dev):
        """(features on dev, prompt ids, response ids) of item i: one entry of a VideoSALMONN2 forward batch."""
        vis, aud, times, duration = self.features(self.items[i])
        feats = (None if vis is None else vis.to(dev), None if aud is None else aud.to(dev), times, duration)
        return (feats, *self.ids[i])


@lru_cache(maxsize=4)
def order(n, epoch, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def batch_indices(cursor, n, c, rank):
    """This rank's items for the step that starts at position `cursor` of a stream of per-epoch shuffles."""
    B = c["batch_size"]
    return [order(n, k // n, c["seed"])[k % n] for k in range(cursor + rank * B, cursor + (rank + 1) * B)]


def all_sum(x, world):
    if world > 1:
        dist.all_reduce(x)
    return x


def step_loss(model, batch, world, dev, dtype):
    """Mean token NLL over the global batch: each rank's sum over the global count, times the world size,
    since FSDP averages the gradients over ranks."""
    with autocast(dev, dtype):
        nll, n = model(batch)
    count = all_sum(torch.tensor(float(n), device=nll.device), world)
    return nll * world / count


def autocast(dev, dtype):
    """Autocast to the frozen weights' dtype (the config's `dtype`: bf16 on GPU), where the trained fp32 weights
    meet them; off when everything is fp32 (the CPU default)."""
    return torch.autocast(dev.type, dtype=getattr(torch, dtype), enabled=dtype != "float32")


def full_state(model, keep):
    """{name: full tensor} of the parameters selected by keep(name), gathered from FSDP shards (a collective)."""
    out = {}
    for name, p in model.named_parameters():
        if keep(name):
            out[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().contiguous()
    return out


def save_checkpoint(model, opt, step, cursor, c, rank, world):
    """out_dir/ckpt: trainable weights, optimizer state and RNG per rank, step and data position; written to
    ckpt.tmp, the previous one moved to ckpt.old, then renamed: at every instant one of them is whole."""
    tmp, final = os.path.join(c["out_dir"], "ckpt.tmp"), os.path.join(c["out_dir"], "ckpt")
    weights = full_state(model, lambda n: any(t in n for t in c["trainable"]))
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_file(weights, os.path.join(tmp, "trainable.safetensors"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"step": step, "cursor": cursor, "world": world, "config": c}, f, indent=1)
    if world > 1:
        dist.barrier()
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    torch.save({"optimizer": opt.state_dict(), "rng": rng}, os.path.join(tmp, f"rank{rank}.pt"))
    if world > 1:
        dist.barrier()
    if rank == 0:
        if os.path.exists(final):
            shutil.rmtree(final + ".old", ignore_errors=True)
            os.replace(final, final + ".old")
        os.replace(tmp, final)
        shutil.rmtree(final + ".old", ignore_errors=True)
    if world > 1:
        dist.barrier()


def load_checkpoint(model, c):
    """Trainable weights into the unsharded model; returns (meta, path) for the optimizer and RNG."""
    path = os.path.join(c["out_dir"], "ckpt")
    if not os.path.exists(path) and os.path.exists(path + ".old"):  # a crash between save_checkpoint's two renames
        path += ".old"
    if not os.path.exists(os.path.join(path, "meta.json")):
        raise SystemExit(f"--resume: no checkpoint in {path}")
    missing = set(load_file(os.path.join(path, "trainable.safetensors"))) ^ {n for n, p in model.named_parameters() if p.requires_grad}
    if missing:
        raise SystemExit(f"{path}: checkpoint does not match the trainable parameters: {sorted(missing)[:5]}")
    model.load_state_dict(load_file(os.path.join(path, "trainable.safetensors")), strict=False)
    with open(os.path.join(path, "meta.json")) as f:
        return json.load(f), path


def train(c, stage):
    """The whole run of one stage, configured by the resolved constants c; returns the final model dir."""
    t_start = time.time()
    rank, world, dev = setup_distributed(c["device"])
    master = rank == 0
    os.makedirs(c["out_dir"], exist_ok=True)
    torch.manual_seed(c["seed"])  # the same initial weights on every rank
    model, tok = build_model(c, dev)
    torch.manual_seed(c["seed"] + 1 + rank)  # then each rank its own dropout
    meta = None
    if c["resume"]:
        meta, ckpt = load_checkpoint(model, c)
        if meta["world"] != world:
            raise SystemExit(f"{ckpt} was written by {meta['world']} processes, this run has {world}")
    items = [it for m in c["train_data"].split(",") for it in read_manifest(m) if it.get("task", "caption") in c["tasks"]]
    data = Features(model, tok, items, c, rank, world)
    val = Features(model, tok, [it for it in read_manifest(c["val_data"]) if it.get("task", "caption") in c["tasks"]][:c["eval_items"]],
                   c, rank, world) if c["val_data"] else None
    if master:
        print(f"{stage}: {len(data.items)} items ({data.skipped} skipped), {world} processes, "
              f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters", flush=True)
    model = shard(model, world, dev)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=c["lr"], weight_decay=c["weight_decay"], betas=(0.9, 0.999))
    step, cursor = 0, 0
    if meta:
        state = torch.load(os.path.join(ckpt, f"rank{rank}.pt"), weights_only=False)
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["cpu"])
        if state["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        step, cursor = meta["step"], meta["cursor"]
    peak = next((v for k, v in PEAK_FLOPS.items() if dev.type == "cuda" and k in torch.cuda.get_device_name()), None)
    log = open(os.path.join(c["out_dir"], "log.jsonl"), "a") if master else None
    bad_in_a_row, t0, tokens, flops = 0, time.time(), 0, 0.0
    bar = tqdm(total=c["steps"], initial=step, disable=not master, desc=stage)
    model.train()
    while step < c["steps"]:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, c)
        batch = [data.example(i, dev) for i in batch_indices(cursor, len(data.items), c, rank)]
        cursor += c["batch_size"] * world
        loss = step_loss(model, batch, world, dev, c["dtype"])
        finite = all_sum(torch.tensor(float(torch.isfinite(loss)), device=dev), world).item() == world
        if finite:
            loss.backward()
            if c["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(params, c["grad_clip"])
            opt.step()
            bad_in_a_row = 0
        else:  # every rank skips together, so the shards stay in step
            bad_in_a_row += 1
            if master:
                print(f"step {step}: non-finite loss, step skipped", flush=True)
            if bad_in_a_row >= c["max_bad_steps"]:
                raise SystemExit(f"{bad_in_a_row} non-finite losses in a row at step {step}: stopping (lower lr?)")
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update()
        lengths = [model.sequence_length(ex) for ex in batch]
        tokens, flops = tokens + sum(L for L, _ in lengths) * world, flops + model.estimate_flops(lengths) * world
        if master and (step % c["log_every"] == 0 or step == c["steps"]):
            dt = time.time() - t0
            rec = {"step": step, "loss": round(loss.item(), 4), "lr": opt.param_groups[0]["lr"], "tok/s": round(tokens / dt),
                   "skipped": data.skipped, "finite": finite}
            if peak:
                rec["mfu"] = round(flops / dt / (peak * world), 4)
            bar.set_postfix(loss=rec["loss"])
            log.write(json.dumps(rec) + "\n")
            log.flush()
            t0, tokens, flops = time.time(), 0, 0.0
        if val and (step == c["steps"] or (c["eval_every"] and step % c["eval_every"] == 0)):
            val_loss = evaluate(model, val, dev, rank, world, c["dtype"])
            if master:
                log.write(json.dumps({"step": step, "val_loss": round(val_loss, 4)}) + "\n")
                log.flush()
        if step == c["steps"] or (c["ckpt_every"] and step % c["ckpt_every"] == 0):
            save_checkpoint(model, opt, step, cursor, c, rank, world)
        if step == c["stop_at"]:
            bar.close()
            return None
    bar.close()
    return export(model, tok, c, rank, world, time.time() - t_start)


@torch.no_grad()
def evaluate(model, val, dev, rank, world, dtype):
    """Mean token NLL on the validation items (each rank a share, summed over ranks)."""
    model.eval()
    nll, n = torch.zeros((), device=dev), torch.zeros((), device=dev)
    for i in range(rank, len(val.items) - len(val.items) % world, world):  # equal counts: FSDP forwards are collective
        ex = val.example(i, dev)
        with autocast(dev, dtype):
            s, k = model([ex])
        nll, n = nll + s, n + k
    model.train()
    return (all_sum(nll, world) / all_sum(n, world).clamp(min=1)).item()


def export(model, tok, c, rank, world, seconds):
    """out_dir/final: the whole model with the LoRA merged into the backbone (paper Eq. 8), in the
    released layout, with its tokenizer and the run's config."""
    if c["lora_r"]:
        lora.merge_lora(model)
    state = full_state(model, lambda n: "lora_" not in n)
    path = os.path.join(c["out_dir"], "final")
    if rank == 0:
        model.save_pretrained(path, state)
        tok.save(os.path.join(path, "tokenizer.json"))
        with open(os.path.join(path, "train_config.json"), "w") as f:
            json.dump({**c, "seconds": round(seconds, 1)}, f, indent=1)
    if world > 1:
        dist.barrier()
    return path


if __name__ == "__main__":
    config = configure(globals(), sys.argv[1:])
    train(config, "sft")
