"""
What the training stages share: train_align.py and train_sft.py run `train` (the supervised loop) with the
settings below, which they override; train_mrdpo.py uses the pieces.

- the model builder: a checkpoint, LLaVA-OneVision + Whisper, or a scratch architecture; LoRA; what trains
- distributed setup (torchrun), FSDP2 wrapping, autocast
- the optimizer step: gradient clipping and the non-finite guard (every rank skips together)
- the LR schedule: linear warmup, then cosine to zero
- checkpoints written whole then renamed, and exact resume; the final model in the released layout
"""
import datetime
import json
import math
import os
import pickle
import shutil
import time
from collections import Counter
from functools import lru_cache

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

import lora
from checkpoint import CheckpointError, load_model, read_config, read_json_object, train_config
from config import UserError, configure, of_type
from data import SILENCE, Features, load_tokenizer, read_manifest, soundtrack_words
from model import GROUP_OVERHEAD, AVConfig, VideoSALMONN2
from model_plus import PlusConfig, VideoSALMONN2Plus, plus_tokens

# -----------------------------------------------------------------------------
# settings of the supervised stages (train_sft.py's defaults; train_align.py and config files override them)
# model
init_from = ""  # a checkpoint dir (released layout, with tokenizer.json), or "scratch" to build `arch`
llava = ""  # with `whisper` instead of init_from: LLaVA-OneVision + Whisper with a fresh audio aligner
whisper = ""  # Whisper checkpoint dir, with `llava` or `qwen_vl`
qwen_vl = ""  # with `whisper` instead of init_from: 2+ from Qwen2.5-VL-Instruct + Whisper, a fresh Q-Former (gen_audio_model.py)
lora_base = ""  # with init_from a LoRA-only 2+ release (adapter_config.json): its audio-aligned base
arch = {}  # AVConfig (or, with "tokens", a 2+ PlusConfig) as a dict, for init_from="scratch"
encoders = ""  # with init_from="scratch": safetensors of pretrained tower.* and speech_encoder.* (the toy's own)
tokenizer = ""  # tokenizer.json; default: the one in init_from or llava
lora_r = 128  # LoRA rank (0: no LoRA); released: 128
lora_alpha = 256  # LoRA alpha: scale alpha / r = 2.0 as released
lora_dropout = 0.05  # dropout on the LoRA input
lora_targets = ("q_proj", "k_proj", "v_proj")  # LLM linears that get LoRA, as released
trainable = ("lora_", "audio.")  # substrings of the parameter names that train; all else is frozen
time_aligned = None  # True: each frame gets only its own seconds' audio tokens; False: Eq. 4-6; None: as the checkpoint
snap_audio = None  # toy: True reads each aligner token as its nearest word (model.snap); None: as the checkpoint
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
group_overhead = GROUP_OVERHEAD  # padded positions worth one more forward in a step (model.length_groups; 0: a forward per length); one process only
anchor = 0.0  # weight of the aligner's anchor to the LLM's embeddings on ASR items (model.anchor_loss); not in the paper
anchor_commit = 0.1  # weight of the anchor's commitment term
anchor_tau = 0.01  # temperature of the anchor's squared distances
anchor_sounds = False  # anchor audio captions too, to their written soundtrack (data.soundtrack_words: "low tone")
written_audio = False  # toy: items with events hear their soundtrack written in words (data.soundtrack_ids); not in the paper
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


def load_encoders(model, path):
    """Pretrained frozen encoders (every tower.* and speech_encoder.* tensor of the model, nothing else) into a
    scratch model."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such encoders file (make toy writes it with data/toyav/pretrain_encoders.py)")
    try:
        state = load_file(path)
    except Exception as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from e
    wanted = {k: v.shape for k, v in model.state_dict().items() if k.startswith(("tower.", "speech_encoder."))}
    got = {k: v.shape for k, v in state.items()}
    if got != wanted:
        diff = sorted(k for k in set(got) | set(wanted) if got.get(k) != wanted.get(k))
        raise UserError(f"{path}: not the encoders of this arch (first differences: {diff[:3]})")
    model.load_state_dict(state, strict=False)


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


def build_model(c, dev, dtype=None, lora_dropout=None):
    """The model of settings c with LoRA applied and only the `trainable` parameters requiring grad (in fp32,
    AdamW's), the rest in `dtype` (default c's), and its tokenizer. The family is the checkpoint's (init_from, a
    LoRA-only 2+ release on lora_base), the base's (llava or qwen_vl, with whisper) or the architecture's."""
    dt = getattr(torch, dtype or c["dtype"])
    adapter = c["init_from"] not in ("", "scratch") and os.path.exists(os.path.join(c["init_from"], "adapter_config.json"))
    for path in (None if adapter else c["init_from"], c.get("lora_base") if adapter else None, c.get("llava"), c.get("qwen_vl"),
                 c.get("whisper")):  # a wrong directory named before anything loads
        if path and path != "scratch":
            read_config(path)
    if not (c["init_from"] or c.get("llava") or c.get("qwen_vl")):
        raise UserError("no model to start from: set init_from (a checkpoint dir or \"scratch\"), or llava (or qwen_vl) and whisper")
    tok = load_tokenizer(c["tokenizer"] or (c.get("lora_base") if adapter else c["init_from"]) or c.get("llava") or c.get("qwen_vl"))
    if c["init_from"] == "scratch":
        if "tokens" in c["arch"]:  # 2+: its special tokens are the tokenizer's
            cfg = PlusConfig.from_dict({**c["arch"], "tokens": plus_tokens(tok)})
            cfg.llm.vocab_size = tok.get_vocab_size()
            model = VideoSALMONN2Plus(cfg)
        else:
            cfg = AVConfig.from_dict(c["arch"])
            cfg.llm.vocab_size = tok.get_vocab_size()
            model = VideoSALMONN2(cfg)
        if c.get("encoders"):  # the toy's pretrained encoders (data/toyav/pretrain_encoders.py): all of them, or stop
            load_encoders(model, c["encoders"])
    elif c.get("llava"):
        model = VideoSALMONN2.from_base(c["llava"], c["whisper"])
    elif c.get("qwen_vl"):
        model = VideoSALMONN2Plus.from_base(c["qwen_vl"], c["whisper"])
        plus_tokens(tok)  # adds <|audio_pad|> after the last id, where from_base put it
        if tok.token_to_id("<|audio_pad|>") != model.cfg.tokens["audio_token_id"]:
            raise UserError(f"{c['qwen_vl']}: <|audio_pad|> is {tok.token_to_id('<|audio_pad|>')} in the tokenizer, "
                            f"{model.cfg.tokens['audio_token_id']} in the model")
    elif adapter:
        model = VideoSALMONN2Plus.from_lora(c["init_from"], c["lora_base"])
    else:
        model = load_model(c["init_from"])
    for switch in ("time_aligned", "snap_audio"):  # v1's switches, saved with its config
        if c.get(switch) is not None:
            if not hasattr(model.cfg, switch):
                raise UserError(f"{switch}: the video-SALMONN 2+ model has no such switch (leave it unset)")
            setattr(model.cfg, switch, c[switch])
    if c["lora_r"]:
        dropout = c["lora_dropout"] if lora_dropout is None else lora_dropout
        lora.apply_lora(model.llm, c["lora_targets"], c["lora_r"], c["lora_alpha"], dropout)
    frozen = {id(p) for p in model.encoder_parameters()}  # the encoders never train (2+: "audio." holds Whisper too)
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) not in frozen and any(t in name for t in c["trainable"]))
        p.data = p.data.to(torch.float32 if p.requires_grad else dt)  # AdamW wants fp32 weights to update
    model.llm.activation_checkpointing = c["activation_checkpointing"]
    return model.to(dev), tok


def shard(model, world, dev):
    """FSDP2: each LLM block a unit, then the root. The frozen encoders stay whole on every rank: each
    rank encodes its own cache misses, which sharded encoders would turn into mismatched collectives."""
    if world == 1:
        return model
    # one LLM forward a step on every rank: ranks cutting their batches into different numbers of length groups
    # would call the blocks' all-gathers different numbers of times and hang
    model.group_overhead = math.inf
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dev.type == "cuda" else MixedPrecisionPolicy()
    for block in model.llm.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp, ignored_params=set(model.encoder_parameters()))
    return model


def autocast(dev, dtype):
    """Autocast to the frozen weights' dtype (the config's `dtype`: bf16 on GPU), where the trained fp32 weights
    meet them; off when everything is fp32 (the CPU default)."""
    return torch.autocast(dev.type, dtype=getattr(torch, dtype), enabled=dtype != "float32")


def lr_at(step, steps, peak, warmup_ratio):
    """Linear warmup, then cosine decay to zero."""
    warm = max(1, round(warmup_ratio * steps))
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def all_sum(x, world):
    if world > 1:
        dist.all_reduce(x)
    return x


class Stepper:
    """AdamW over the trainable parameters, a step at a time: backward, clip the global gradient norm (grad_clip 0:
    off), update. A loss that is not finite on some rank skips the step on every rank, so the shards stay in step;
    max_bad_steps skipped in a row stop the run."""

    def __init__(self, model, lr, weight_decay, grad_clip, max_bad_steps, world, dev):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999))
        self.grad_clip, self.max_bad_steps, self.world, self.dev = grad_clip, max_bad_steps, world, dev
        self.bad_in_a_row = 0

    def step(self, loss, lr, where):
        """One update at learning rate lr; where names the step in messages. Returns whether it stepped."""
        for g in self.opt.param_groups:
            g["lr"] = lr
        finite = all_sum(torch.tensor(float(torch.isfinite(loss)), device=self.dev), self.world).item() == self.world
        if finite:
            loss.backward()
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
            self.opt.step()
            self.bad_in_a_row = 0
        else:
            self.bad_in_a_row += 1
            print(f"{where}: non-finite loss, step skipped", flush=True)
            if self.bad_in_a_row >= self.max_bad_steps:
                raise SystemExit(f"{self.bad_in_a_row} non-finite losses in a row at {where}: stopping (lower lr?)")
        self.opt.zero_grad(set_to_none=True)
        return finite


def full_state(model, keep):
    """{name: full tensor} of the parameters selected by keep(name), gathered from FSDP shards (a collective)."""
    out = {}
    for name, p in model.named_parameters():
        if keep(name):
            out[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().contiguous()
    return out


def trainable_state(model):
    """The trained parameters, gathered (a collective)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return full_state(model, lambda n: n in names)


def save_checkpoint(path, model, stepper, meta, rank, world):
    """path/: the trainable weights (safetensors), meta (JSON) and each rank's optimizer state and RNG; written to
    path.tmp, the previous one moved to path.old, then renamed: at every instant one of them is whole."""
    tmp = path + ".tmp"
    weights = trainable_state(model)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_file(weights, os.path.join(tmp, "trainable.safetensors"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({**meta, "world": world}, f, indent=1)
    barrier(world)
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    torch.save({"optimizer": stepper.opt.state_dict(), "rng": rng, "bad_in_a_row": stepper.bad_in_a_row},
               os.path.join(tmp, f"rank{rank}.pt"))
    barrier(world)
    if rank == 0:
        if os.path.exists(path):
            shutil.rmtree(path + ".old", ignore_errors=True)
            os.replace(path, path + ".old")
        os.replace(tmp, path)
        shutil.rmtree(path + ".old", ignore_errors=True)
    barrier(world)


def barrier(world):
    if world > 1:
        dist.barrier()


def finish_distributed(world):
    """The end of a run under torchrun: every rank waits for the others, then destroys its process group. A gloo rank
    that exits while another still writes, leaving its group to the interpreter's last destructors, aborted in 4 of 14
    runs of a two-process test ("terminate called without an active exception"); with this, in 1 of 54 (dev/LOG.md)."""
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def checkpoint_meta(path):
    """The meta of the checkpoint at path (or at path.old, after a crash between save_checkpoint's two renames),
    and where it is; (None, None) if there is none."""
    for p in (path, path + ".old"):
        file = os.path.join(p, "meta.json")
        if os.path.exists(file):
            meta = read_json_object(file)
            bad = next((k for k in ("step", "cursor", "world") if type(meta.get(k)) is not int), None)
            if bad:
                raise CheckpointError(f"{file}: not the meta.json of a training checkpoint ({bad}: {meta.get(bad)!r}, "
                                      f"not an int)")
            return meta, p
    return None, None


def saved_settings(meta, file):
    """The settings a training checkpoint was written with (meta, its meta.json), to rebuild its model: every setting
    above there, of its default's type as JSON keeps it (a list for a tuple, an int for a float; a None default is a
    switch left to the checkpoint, so a bool)."""
    c = meta.get("config")
    if not isinstance(c, dict):
        raise CheckpointError(f"{file}: no config object (not the meta.json of a training checkpoint)")
    for key, default in configure(globals(), []).items():
        if key not in c:
            raise CheckpointError(f"{file}: its config has no {key!r} (written by another version of this code?)")
        if not of_type(c[key], type(default)):
            want = "bool or None" if default is None else type(default).__name__
            raise CheckpointError(f"{file}: its config's {key} must be {want}, got {c[key]!r}")
    return c


def load_weights(model, path):
    """The trainable weights of a checkpoint into the unsharded model; they must be exactly its trainable set."""
    file = os.path.join(path, "trainable.safetensors")
    try:
        weights = load_file(file)
    except Exception as e:  # SafetensorError, FileNotFoundError
        raise CheckpointError(f"{file}: cannot be read ({e})") from e
    expected = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    got = {n: tuple(t.shape) for n, t in weights.items()}
    if got != expected:
        wrong = sorted(set(got.items()) ^ set(expected.items()))
        raise CheckpointError(f"{path}: the checkpoint's weights do not match the model's trainable parameters "
                              f"(another LoRA rank or trainable set than the run that wrote it?): {wrong[:3]}")
    model.load_state_dict(weights, strict=False)


def load_state(file):
    """torch.load of a resume state, tensors and plain containers only: a checkpoint is shared between people, and a
    crafted one would otherwise run code when loaded. A file that holds anything else, or is cut short, is named."""
    try:
        state = torch.load(file, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{file}: refused: it holds objects other than tensors, which loading would run as code "
                              f"(not a checkpoint this code wrote)") from e
    except Exception as e:  # torch.load fails on a corrupt file with whatever its parser meets: IndexError, KeyError, ...
        reason = type(e).__name__ + (f": {str(e).splitlines()[0]}" if str(e) else "")  # a KeyError's text is a bare 101
        raise CheckpointError(f"{file}: cannot be read ({reason})") from e
    if not isinstance(state, dict) or not {"optimizer", "rng"} <= state.keys():
        raise CheckpointError(f"{file}: not a resume state (no optimizer and RNG state in it)")
    return state


def load_optimizer(state, stepper):
    """The optimizer state and RNG a rank saved (read by load_state: nothing in a checkpoint runs as code)."""
    stepper.opt.load_state_dict(state["optimizer"])
    stepper.bad_in_a_row = state.get("bad_in_a_row", 0)
    torch.set_rng_state(state["rng"]["cpu"])
    if state["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"])


def caption_prompt(items, init_from):
    """The caption prompt a model is trained with, saved with it for caption.py: the most common prompt of the caption
    items, else (a stage without captions, the audio alignment) the one its starting checkpoint was trained with."""
    prompts = Counter(it["prompt"] for it in items if it.get("task") == "caption")
    if prompts:
        return prompts.most_common(1)[0][0]
    return train_config(init_from).get("caption_prompt")


def save_final(model, tok, path, c, seconds, rank, world, prompt=None):
    """path/: the whole model with the LoRA merged into the backbone (paper Eq. 8), in the released layout, with its
    tokenizer and the run's settings (train_config.json, with the caption prompt it was trained with)."""
    if c["lora_r"]:
        lora.merge_lora(model)
    state = full_state(model, lambda n: "lora_" not in n)
    if rank == 0:
        model.save_pretrained(path, state)
        tok.save(os.path.join(path, "tokenizer.json"))
        with open(os.path.join(path, "train_config.json"), "w") as f:
            json.dump({**c, "seconds": round(seconds, 1), "caption_prompt": prompt}, f, indent=1)
    barrier(world)
    return path


START_ITEMS = 64  # anchored items whose mean aligner token is put on the blank before alignment


# -----------------------------------------------------------------------------
# the supervised loop (alignment and SFT)


@lru_cache(maxsize=4)
def order(n, epoch, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def batch_indices(cursor, n, batch_size, seed, rank):
    """This rank's items for the step that starts at position `cursor` of a stream of per-epoch shuffles."""
    return [order(n, k // n, seed)[k % n] for k in range(cursor + rank * batch_size, cursor + (rank + 1) * batch_size)]


def step_loss(model, batch, world, dev, dtype, anchor=None):
    """Mean token NLL over the global batch: each rank's sum over the global count, times the world size,
    since FSDP averages the gradients over ranks. anchor = (transcripts, blank id, c) adds the aligner's anchor
    (model.anchor_loss), its terms averaged over the global batch's transcripts and audio tokens the same way."""
    with autocast(dev, dtype):
        if anchor is None:
            nll, n = model(batch)
        else:
            transcripts, blank, c = anchor
            (nll, n), (ctc, commit, tokens), k = model(batch, transcripts, blank, c["anchor_tau"])
    count = all_sum(torch.tensor(float(n), device=nll.device), world)
    loss = nll * world / count
    if anchor is not None:
        k, tokens = (all_sum(torch.tensor(float(v), device=nll.device), world).clamp(min=1) for v in (k, tokens))
        loss = loss + world * (c["anchor"] * ctc / k + c["anchor_commit"] * commit / tokens)
    return loss


def transcript_ids(tok, item, blank, sounds=False):
    """The token ids an ASR item's audio tokens anchor to: its words in their in-sentence form (a leading space
    each), the blank left out; with sounds, those of an audio caption's written soundtrack too (data.soundtrack_words:
    "low tone"); None for any other item (model.forward anchors audio-only items alone)."""
    if item["task"] == "asr":
        words = item["response"].split()
    elif sounds and item["task"] == "audio_caption" and "events" in item:
        words = [w for e in item["events"] for w in soundtrack_words(e["key"])]
    else:
        return None
    return [i for i in tok.encode(" " + " ".join(words)).ids if i != blank]


def train(c, stage):
    """The whole run of a supervised stage, configured by the resolved settings c; returns the final model dir."""
    t_start = time.time()
    rank, world, dev = setup_distributed(c["device"])
    master = rank == 0
    # the manifests first: a mistake in them costs a second, not a 7B model load
    items = [it for m in c["train_data"].split(",") for it in read_manifest(m) if it["task"] in c["tasks"]]
    val_items = [it for it in read_manifest(c["val_data"]) if it["task"] in c["tasks"]] if c["val_data"] else []
    if not items:
        raise UserError(f"{c['train_data']}: no item of the tasks {tuple(c['tasks'])} to train on")
    os.makedirs(c["out_dir"], exist_ok=True)
    torch.manual_seed(c["seed"])  # the same initial weights on every rank
    model, tok = build_model(c, dev)
    model.group_overhead = c["group_overhead"]  # shard keeps one forward a step under FSDP2
    blank = tok.token_to_id(SILENCE)
    for name in ("anchor", "written_audio"):
        if c[name] and not isinstance(model, VideoSALMONN2):
            raise UserError(f"{name}: only video-SALMONN 2's window-level aligner has one token per 0.5 s")
        if c[name] and (blank is None or not c["use_audio"]):
            raise UserError(f"{name}: needs audio (use_audio) and a tokenizer with the token {SILENCE!r}")
    if c["anchor"] and c["written_audio"]:
        raise UserError("anchor and written_audio: a written soundtrack has no aligner to anchor")
    torch.manual_seed(c["seed"] + 1 + rank)  # then each rank its own dropout
    ckpt = os.path.join(c["out_dir"], "ckpt")
    meta, found = checkpoint_meta(ckpt) if c["resume"] else (None, None)
    if c["resume"]:
        if meta is None:
            raise UserError(f"--resume: no checkpoint in {ckpt}")
        if meta["world"] != world:
            raise UserError(f"{found} was written by {meta['world']} processes, this run has {world}")
        load_weights(model, found)
        state = load_state(os.path.join(found, f"rank{rank}.pt"))  # before the feature cache is warmed: fails fast
    prep = dict(fps=c["fps"], max_frames=c["max_frames"], cache_dir=c["cache_dir"], use_audio=c["use_audio"],
                written_audio=c["written_audio"])
    data = Features(model, tok, items, rank, world, **prep)
    val = Features(model, tok, val_items[:c["eval_items"]], rank, world, **prep) if val_items else None
    if master:
        print(f"{stage}: {len(data.items)} items ({data.skipped} skipped), {world} processes, "
              f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters", flush=True)
    if not data.items:
        raise UserError(f"{c['train_data']}: no item to train on ({data.skipped} skipped, named above)")
    transcripts = [transcript_ids(tok, it, blank, c["anchor_sounds"]) for it in data.items] if c["anchor"] else None
    if c["anchor"] and not meta:  # the aligner starts on the blank (model.start_aligner_on), from a fixed sample of the items
        anchored = [i for i, t in enumerate(transcripts) if t][:START_ITEMS]
        model.start_aligner_on(blank, [data.example(i, dev)[0][1] for i in anchored])
    model = shard(model, world, dev)
    stepper = Stepper(model, c["lr"], c["weight_decay"], c["grad_clip"], c["max_bad_steps"], world, dev)
    step, cursor = 0, 0
    if meta:
        load_optimizer(state, stepper)
        step, cursor = meta["step"], meta["cursor"]
        if master:
            print(f"{stage}: resumed from {found} at step {step} of {c['steps']}", flush=True)
    peak = next((v for k, v in PEAK_FLOPS.items() if dev.type == "cuda" and k in torch.cuda.get_device_name()), None)
    log = open(os.path.join(c["out_dir"], "log.jsonl"), "a") if master else None
    t0, tokens, flops = time.time(), 0, 0.0
    bar = tqdm(total=c["steps"], initial=step, disable=not master, desc=stage)
    model.train()
    stopped = False  # at stop_at: no final model, the run continues with --resume
    while step < c["steps"] and not stopped:
        picked = batch_indices(cursor, len(data.items), c["batch_size"], c["seed"], rank)
        batch = [data.example(i, dev) for i in picked]
        cursor += c["batch_size"] * world
        anchor = ([transcripts[i] for i in picked], blank, c) if c["anchor"] else None
        loss = step_loss(model, batch, world, dev, c["dtype"], anchor)
        finite = stepper.step(loss, lr_at(step, c["steps"], c["lr"], c["warmup_ratio"]), f"step {step}")
        step += 1
        bar.update()
        lengths = [model.sequence_length(ex) for ex in batch]
        tokens, flops = tokens + sum(L for L, _ in lengths) * world, flops + model.estimate_flops(lengths) * world
        if master and (step % c["log_every"] == 0 or step == c["steps"]):
            dt = time.time() - t0
            rec = {"step": step, "loss": round(loss.item(), 4), "lr": stepper.opt.param_groups[0]["lr"],
                   "tok/s": round(tokens / dt), "skipped": data.skipped, "finite": finite}
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
            save_checkpoint(ckpt, model, stepper, {"step": step, "cursor": cursor, "config": c}, rank, world)
        stopped = step == c["stop_at"]
    bar.close()
    final = None if stopped else save_final(model, tok, os.path.join(c["out_dir"], "final"), c, time.time() - t_start,
                                            rank, world, caption_prompt(data.items, c["init_from"]))
    finish_distributed(world)
    return final


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
