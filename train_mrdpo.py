"""
Multi-round DPO (paper 3.3, 5.2; Appendices C, D). Each round t = 1..R:
  1. the previous round's LoRA is merged into the backbone (Eq. 8) and a fresh LoRA proxy is added;
     the round-start model is the reference (the same network with the proxy disabled);
  2. captions are sampled for each training video (nucleus; two, as released), with their reference log-probs;
  3. each is judged against the video's atomic events (Miss + Hall = total error; repetition rate);
  4. the best and the worst caption are a pair, kept when the better wins by the round's margins (Table 6);
  5. the proxy trains on the gDPO loss (Eq. 9): DPO on the pairs plus lambda x cross-entropy on the
     ground-truth caption; the last round also mixes in QA SFT items.
Every phase writes as it goes (samples with their judgments and reference log-probs, training
checkpoints, each round's proxy and done.json), so running the same command again after a crash, in any
phase of any round, continues where it stopped. Delete out_dir to start over.

$ python train_mrdpo.py config/toy_mrdpo.py
$ torchrun --standalone --nproc_per_node=8 train_mrdpo.py config/vs2_7b_mrdpo.py
"""
import json
import os
import random
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.distributed.fsdp import register_fsdp_forward_method

import lora
from checkpoint import CheckpointError, open_safetensors, read_config
from config import UserError, configure, run
from data import Features, decode_response, merge_results, read_manifest, read_records
from judge import JudgeError, LLMJudge, ToyJudge, rates, repetition_rate
from training import (Stepper, autocast, barrier, build_model, caption_prompt, finish_distributed, full_state, load_state,
                      lr_at, save_final, setup_distributed, shard)

# -----------------------------------------------------------------------------
init_from = "out/toy/sft/final"  # the AV SFT model (its LoRA merged)
tokenizer = ""  # tokenizer.json; default: the one in init_from
train_data = "data/toyav/train.jsonl"  # caption items (videos, ground-truth captions and events) and QA items
val_data = "data/toyav/val.jsonl"  # per-round validation captions
test_data = "data/toyav/test.jsonl"  # per-round test captions (results.json)
rounds = 6  # R
steps_per_round = 1000  # S, as the paper's rounds 1-5
round_lrs = (2e-5, 2e-5, 1e-5, 2e-6, 2e-6, 2e-6)  # paper 4.2; the last value repeats for later rounds
thresholds = ((0.05, 0.01), (0.20, -0.01), (0.23, -0.01), (0.23, -0.01), (0.23, -0.01), (0.23, -0.01))  # Table 6: (delta e, delta r) per round; the last repeats
beta = 0.1  # DPO temperature, as released
ce_weight = 0.1  # lambda of Eq. 9 (0: plain DPO, the Fig. 3a ablation)
proxy = True  # merge and re-initialise the LoRA each round (False: keep training one LoRA, Fig. 3b "Direct")
qa_mix = 0.25  # fraction of QA SFT steps in the last round (4.2)
samples_per_video = 2  # captions sampled per video, as released; of more, the best and the worst make the pair
videos_per_round = 0  # videos sampled each round (0: all); a different seeded subset every round
val_items = 0  # validation captions evaluated after each round (0: all)
temperature = 1.0  # sampling temperature
top_p = 0.9  # nucleus mass, as released
max_new_tokens = 160  # caption length limit while sampling (1024 for the 7B model)
sample_batch = 0  # captions decoding together when sampling and evaluating (engine.py); 0: 8 on a CPU, else as fit
lora_r = 128  # the proxy: as the SFT LoRA
lora_alpha = 256
lora_dropout = 0.0  # dropout would make the round-start policy differ from its own reference
lora_targets = ("q_proj", "k_proj", "v_proj")
trainable = ("lora_",)  # only the proxy trains
batch_size = 1  # pairs per process per step
warmup_ratio = 0.03
weight_decay = 0.0
grad_clip = 1.0  # max global gradient norm (0: off)
max_bad_steps = 10  # consecutive non-finite losses before the run stops
activation_checkpointing = False  # recompute each LLM block in backward (the 7B prefix of ~21,000 tokens needs it)
judge = "toy"  # toy: the exact toy judge; llm: judge.LLMJudge (OPENAI_BASE_URL, OPENAI_API_KEY, JUDGE_MODEL)
judge_timeout = 120.0  # seconds one LLM judge request may take before it is abandoned and retried
fps = 1.0
max_frames = 110
cache_dir = "out/toy/cache"
out_dir = "out/toy/mrdpo"
results = "out/toy/results.json"  # per-round test rates go under "rounds"
log_every = 10
ckpt_every = 100
seed = 2024
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"
# -----------------------------------------------------------------------------
# gDPO (Eq. 9) and the LoRA proxy (Eq. 8): the whole method in one place


def gdpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, gt_nll, beta, ce_weight):
    """Eq. 9 over a batch of pairs: -log sigmoid(beta (log pi(y_w|x)/pi_ref(y_w|x) - log pi(y_l|x)/pi_ref(y_l|x)))
    + lambda * CE(y_gt | x), with summed caption log-probs (B,) as the released DPO and the ground-truth
    cross-entropy as a mean over its tokens (scalar). Returns (loss, dpo, ce, chosen rewards, rejected rewards)."""
    chosen = beta * (policy_chosen - ref_chosen)  # the implicit rewards of DPO (Rafailov et al., Eq. 5)
    rejected = beta * (policy_rejected - ref_rejected)
    dpo = -F.logsigmoid(chosen - rejected).mean()
    return dpo + ce_weight * gt_nll, dpo, gt_nll, chosen.detach(), rejected.detach()


def pair_step(model, pairs, dev, c):
    """The gDPO loss of a batch of pairs: per video one pass over its prefix, with the chosen, rejected
    and ground-truth captions as one batch over the prefix's KV cache (model.continuation_logps)."""
    logps, gt_nll, gt_tokens = [], 0.0, 0
    for feats, prompt_ids, p in pairs:
        lp, n = model.continuation_logps(feats, prompt_ids, [p["chosen_ids"], p["rejected_ids"], p["gt_ids"]])
        logps.append(lp[:2])
        gt_nll, gt_tokens = gt_nll - lp[2], gt_tokens + n[2]
    lp = torch.stack(logps)  # (B, 2)
    ref = torch.tensor([[p["ref_chosen"], p["ref_rejected"]] for _, _, p in pairs], device=dev)
    return gdpo_loss(lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1], gt_nll / gt_tokens, c["beta"], c["ce_weight"])


def start_round(model, c, t):
    """Eq. 8 and a fresh proxy: W_t = W_{t-1} + scale * B_{t-1} A_{t-1}, then A Kaiming, B = 0, so the
    policy equals the round-start model, which is the reference. "Direct" goes on training the one LoRA."""
    if c["proxy"]:
        lora.merge_lora(model)
        lora.reinit_lora(model, torch.Generator().manual_seed(c["seed"] + t))


def select_pair(samples, t, c):
    """Table 6: of a video's samples (two, as released) the one with the lowest total error is chosen and the one
    with the highest rejected; the pair is kept when it wins by at least delta e in total error and delta r in
    repetition rate (negative: may repeat a little more)."""
    ranked = sorted(samples, key=lambda s: s["total"])  # stable: of two equal, the first is chosen
    chosen, rejected = ranked[0], ranked[-1]
    de, dr = c["thresholds"][min(t, len(c["thresholds"])) - 1]
    keep = rejected["total"] - chosen["total"] >= de and rejected["repetition"] - chosen["repetition"] >= dr
    return (chosen, rejected) if keep else None
# -----------------------------------------------------------------------------


def append(path, rec):
    with open(path, "a") as f:  # one line per record, flushed: a crash loses at most the line being written
        f.write(json.dumps(rec) + "\n")


def judge_sample(text, item, judge, finished):
    """Total error and repetition rate of one sampled caption against the item's atomic events (an unfinished
    caption is de-looped first by the LLM judge, as released)."""
    j = judge.judge(text, item["events"], truncated=not finished, name=item.get("id", item["line"]))
    n = max(1, j["events"])
    return {"total": (j["missed"] + j["incorrect"] + j["hallucinated"]) / n, "repetition": repetition_rate(text)}


@torch.no_grad()
def sample_and_judge(model, tok, data, rdir, c, t, rank, world_size, judge):
    """Phases 2-3 for this rank's videos, decoding together (model.stream); each video's samples, judgments and
    reference log-probs are appended to samples_rank{r}.jsonl as soon as its samples finish, and videos already there
    are skipped. The LLM judge's answers are cached, so a crash while judging asks nothing twice."""
    path = os.path.join(rdir, f"samples_rank{rank}.jsonl")
    done = {r["i"] for r in read_records(path)}  # a cut-off last line is dropped there, and its video sampled again
    stop, dev = (tok.token_to_id("<|im_end|>"),), next(model.parameters()).device
    model.eval()
    videos = [i for i, it in enumerate(data.items) if it.get("task") == "caption"]
    if c["videos_per_round"]:
        videos = sorted(random.Random(c["seed"] + t).sample(videos, min(c["videos_per_round"], len(videos))))
    todo = [i for i in videos[rank::world_size] if i not in done]
    if done:
        print(f"round {t}: sampling resumed, {len(done)} of {len(videos[rank::world_size])} videos already sampled and "
              f"judged ({path})", flush=True)
    # per video, so a video's samples do not depend on which others decode beside it: a resumed round draws the same
    generators = [torch.Generator(dev).manual_seed(c["seed"] * 1_000_003 + t * 10_007 + i) for i in todo]
    live = {}  # the examples decoding, kept for their reference log-probs

    def examples():  # read as the engine has rows free
        for i in todo:
            live[i] = data.example(i, dev)[:2]
            yield live[i]
    # under autocast as in training, so the reference log-probs are the policy's at step 0
    with autocast(dev, c["dtype"]):
        for k, ids in model.stream(examples(), n=c["samples_per_video"], generators=generators, batch=c["sample_batch"],
                                   max_new_tokens=c["max_new_tokens"], temperature=c["temperature"], top_p=c["top_p"],
                                   stop_ids=stop):
            i = todo[k]
            ref, _ = model.continuation_logps(*live.pop(i), ids)  # the reference: the round-start model
            texts = [decode_response(tok, s)[0] for s in ids]
            try:
                judged = [judge_sample(x, data.items[i], judge, s[-1] in stop) for x, s in zip(texts, ids)]
            except JudgeError as e:  # not written: a rerun of the round asks again (the judge's cache keeps the rest)
                print(f"round {t}: left out of the pairs: {e}", flush=True)
                continue
            append(path, {"i": i, "samples": [{"ids": s, "text": x, "ref": r, **j}
                                              for s, x, r, j in zip(ids, texts, ref.tolist(), judged)]})


def round_pairs(rdir, t, c, data):
    """Phase 4 over every rank's samples: the kept pairs, with the ground-truth caption for the CE term."""
    pairs = []
    for name in sorted(f for f in os.listdir(rdir) if f.startswith("samples_rank")):
        for r in read_records(os.path.join(rdir, name)):
            kept = select_pair(r["samples"], t, c)
            if kept:
                pairs.append({"i": r["i"], "chosen_ids": kept[0]["ids"], "rejected_ids": kept[1]["ids"],
                              "ref_chosen": kept[0]["ref"], "ref_rejected": kept[1]["ref"], "gt_ids": data.ids[r["i"]][1]})
    return sorted(pairs, key=lambda p: p["i"])


def train_round(model, data, pairs, qa, rdir, c, t, dev, rank, world_size):
    """Phase 5: S steps of gDPO on the pairs (QA SFT steps mixed into the last round); resumable."""
    peak, steps = c["round_lrs"][min(t, len(c["round_lrs"])) - 1], c["steps_per_round"]
    stepper = Stepper(model, peak, c["weight_decay"], c["grad_clip"], c["max_bad_steps"], world_size, dev)
    step, ckpt = 0, os.path.join(rdir, f"ckpt_rank{rank}.pt")
    if os.path.exists(ckpt):  # resume inside the round: the proxy, the optimizer, the step (tensors only: no code)
        state = load_state(ckpt)
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
        if {n: tuple(v.shape) for n, v in state["proxy"].items()} != shapes:
            raise CheckpointError(f"{ckpt}: its proxy does not fit this run's (another lora_r or lora_targets?)")
        model.load_state_dict(state["proxy"], strict=False)
        stepper.opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step, stepper.bad_in_a_row = state["step"], state.get("bad_in_a_row", 0)
        if rank == 0:
            print(f"round {t}: training resumed at step {step} of {steps}", flush=True)
    last = t == c["rounds"] and qa
    log = open(os.path.join(rdir, "log.jsonl"), "a") if rank == 0 else None
    model.eval()  # no dropout anywhere: the policy starts equal to its reference
    model.llm.train(c["activation_checkpointing"])  # checkpointing acts in training mode; the LLM has no dropout of its own
    while step < steps:
        rng = random.Random(c["seed"] * 7919 + t * 1000 + step * world_size + rank)  # the batch is a function of the step
        qa_step = last and random.Random(c["seed"] * 7919 + t * 1000 + step).random() < c["qa_mix"]  # all ranks alike:
        with autocast(dev, c["dtype"]):  # a QA and a gDPO step run different FSDP collectives
            if qa_step:  # a QA SFT step (the last round)
                nll, n = model([data.example(rng.choice(qa), dev) for _ in range(c["batch_size"])])
                loss, rec = nll / n, {"qa_ce": round((nll / n).item(), 4)}
            else:
                batch = [rng.choice(pairs) for _ in range(c["batch_size"])]
                loss, dpo, ce, cr, rr = pair_step(model, [(*data.example(p["i"], dev)[:2], p) for p in batch], dev, c)
                rec = {"dpo": round(dpo.item(), 4), "ce": round(ce.item(), 4), "chosen_reward": round(cr.mean().item(), 4),
                       "rejected_reward": round(rr.mean().item(), 4), "reward_acc": (cr > rr).float().mean().item(),
                       "margin": round((cr - rr).mean().item(), 4)}
        stepper.step(loss, lr_at(step, steps, peak, c["warmup_ratio"]), f"round {t} step {step}")
        step += 1
        if log and (step % c["log_every"] == 0 or step == steps):
            log.write(json.dumps({"round": t, "step": step, "loss": round(loss.item(), 4),
                                  "lr": stepper.opt.param_groups[0]["lr"], **rec}) + "\n")
            log.flush()
        if step % c["ckpt_every"] == 0 and step < steps:
            proxy_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            torch.save({"proxy": proxy_state, "optimizer": stepper.opt.state_dict(), "rng": torch.get_rng_state(),
                        "step": step, "bad_in_a_row": stepper.bad_in_a_row}, ckpt + ".tmp")
            os.replace(ckpt + ".tmp", ckpt)


def round_model(c, dev, t):
    """The model at the end of round t (0: the SFT model), rebuilt from files: the SFT model with the
    proxies of rounds 1..t loaded in turn, each merged (Eq. 8) before the next; "Direct" saves one LoRA."""
    torch.manual_seed(c["seed"])
    model, tok = build_model(c, dev)
    for s in range(1, t + 1):
        if s > 1 and c["proxy"]:
            lora.merge_lora(model)
        path = os.path.join(c["out_dir"], f"round{s}", "proxy.safetensors")
        try:
            load_proxy(model, path)
        except CheckpointError:  # a file that cannot be read, named as such: no talk of LoRA settings
            raise
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: does not fit this run's LoRA (lora_r={c['lora_r']}, lora_targets="
                                  f"{tuple(c['lora_targets'])}; the round was trained with others?): {e}") from e
    return model, tok


def load_proxy(model, path):
    """A round's trained weights: the LoRA proxy, exactly the model's adapter keys, and whatever else trains
    with it (2+: the merger and the Q-Former, as released)."""
    with open_safetensors(path) as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    lora.load_lora(model, path, {k: v for k, v in state.items() if "lora_" in k})
    rest = {k: v for k, v in state.items() if "lora_" not in k}
    unexpected = sorted(rest.keys() - dict(model.named_parameters()).keys())
    if unexpected:
        raise KeyError(f"{path}: unexpected keys {unexpected[:8]}")
    model.load_state_dict(rest, strict=False)


def eval_items(c, split):
    """The caption items each round is evaluated on: the split's (val: its first val_items), read once at start-up."""
    items = [it for it in read_manifest(c[f"{split}_data"]) if it.get("task") == "caption"]
    if not items:
        raise UserError(f"{c[f'{split}_data']}: no caption item to evaluate")
    return items[:c["val_items"]] if split == "val" and c["val_items"] else items


def check_events(items, toy):
    """Every caption item needs the atomic events its captions are judged against, for the toy judge the toy world's
    (dicts with a "key"): checked up front, so a bad item fails the run in seconds, not rounds in."""
    bad = [it["line"] for it in items if it.get("task") == "caption"
           and not (it.get("events") and (not toy or ToyJudge.reads(it["events"])))]
    if bad:
        whose = ', for the toy judge the toy world\'s (dicts with a "key" list)' if toy else ""
        more = f" (and {len(bad) - 1} more caption items)" if len(bad) > 1 else ""
        raise UserError(f"{bad[0]}: a caption item needs events to judge its captions against{whose}{more}")


def evaluate_round(model, tok, c, judge, split, items, rank, world_size):
    """Miss / Hall / Total of greedy captions of a split's items (eval_items), each rank captioning a share, judged
    on rank 0 as the samples are (items the judge fails on are named and left out, as in eval.py; rates says over
    how many it judged). None on the other ranks."""
    dev = next(model.parameters()).device
    data = Features(model, tok, items[rank::world_size], fps=c["fps"], max_frames=c["max_frames"],
                    cache_dir=c["cache_dir"], responses=False)
    with autocast(dev, c["dtype"]):
        ids = model.generate((data.example(i, dev)[:2] for i in range(len(data.items))), batch=c["sample_batch"],
                             max_new_tokens=c["max_new_tokens"], greedy=True, stop_ids=(tok.token_to_id("<|im_end|>"),))
    outs = [(it, *decode_response(tok, x[0])) for it, x in zip(data.items, ids)]
    if world_size > 1:
        shares = [None] * world_size
        dist.all_gather_object(shares, outs)
        outs = [o for share in shares for o in share]
    if rank:
        return None
    judged, errors = judge.judge_all([{"id": it.get("id", it["line"]), "caption": text, "truncated": not ended,
                                       "events": it["events"]} for it, text, ended in outs])
    for e in errors.values():
        print(f"{split}: {e}", flush=True)
    if not judged:  # a judge that failed on every caption must not look like a perfect model; the round's proxy is
        # saved, so a rerun only evaluates it again (the judge's answers are cached)
        raise SystemExit(f"{split}: no rate: the judge failed on all {len(outs)} captions, e.g. "
                         f"{next(iter(errors.values()), 'none could be read')}")
    return {**rates(judged), "items": len(outs)}


def main(c):
    t_start = time.time()
    rank, world_size, dev = setup_distributed(c["device"])
    os.makedirs(c["out_dir"], exist_ok=True)
    if c["judge"] not in ("toy", "llm"):
        raise UserError(f"judge={c['judge']!r}: toy (the toy world's exact judge) or llm (an OpenAI-compatible server)")
    read_config(c["init_from"])  # a missing model is named before any manifest, all read long before it loads
    train_items = [it for it in read_manifest(c["train_data"]) if it.get("task") in ("caption", "qa")]
    if not any(it["task"] == "caption" for it in train_items):
        raise UserError(f"{c['train_data']}: no caption item to sample")
    splits = {split: eval_items(c, split) for split in ("val", "test")}
    for items in (train_items, *splits.values()):
        check_events(items, c["judge"] == "toy")
    # the exact toy judge (the toy world's caption grammar) or the LLM judge, for the samples and each round's rates
    judge = ToyJudge() if c["judge"] == "toy" else LLMJudge(cache_path=os.path.join(c["out_dir"], "judge_cache.sqlite"),
                                                            timeout=c["judge_timeout"])
    history = []
    for t in range(1, c["rounds"] + 1):
        rdir = os.path.join(c["out_dir"], f"round{t}")
        os.makedirs(rdir, exist_ok=True)
        if os.path.exists(os.path.join(rdir, "done.json")):
            history.append(json.load(open(os.path.join(rdir, "done.json"))))
            if rank == 0:
                print(f"round {t}: done in an earlier run ({rdir}/done.json)", flush=True)
            continue
        proxy_path = os.path.join(rdir, "proxy.safetensors")
        if os.path.exists(proxy_path) and rank == 0:
            print(f"round {t}: trained in an earlier run ({proxy_path}), resuming at its evaluation", flush=True)
        if not os.path.exists(proxy_path):  # else the round crashed while evaluating: its training is done
            model, tok = round_model(c, dev, t - 1)
            start_round(model, c, t)
            data = Features(model, tok, train_items, rank, world_size, c["fps"], c["max_frames"], c["cache_dir"])
            sample_and_judge(model, tok, data, rdir, c, t, rank, world_size, judge)
            barrier(world_size)
            pairs = round_pairs(rdir, t, c, data)
            qa = [i for i, it in enumerate(data.items) if it.get("task") == "qa"]
            if rank == 0:
                print(f"round {t}: {len(pairs)} pairs kept", flush=True)
            model = shard(model, world_size, dev)
            if world_size > 1:  # FSDP gathers the root's parameters around forward and the methods named here
                register_fsdp_forward_method(model, "continuation_logps")
            if pairs:
                train_round(model, data, pairs, qa, rdir, c, t, dev, rank, world_size)
            proxy_state = full_state(model, lambda n: any(k in n for k in c["trainable"]))
            del model
            if rank == 0:
                save_file(proxy_state, proxy_path + ".tmp", metadata={"pairs": str(len(pairs))})
                os.replace(proxy_path + ".tmp", proxy_path)
            barrier(world_size)
        with open_safetensors(proxy_path) as f:
            n_pairs = (f.metadata() or {}).get("pairs", "")
        if not n_pairs.isdigit():
            raise CheckpointError(f"{proxy_path}: no pair count in its metadata (not a proxy this script wrote)")
        n_pairs = int(n_pairs)
        model, tok = round_model(c, dev, t)  # unsharded on every rank, for generation
        val, test = (evaluate_round(model, tok, c, judge, split, items, rank, world_size)
                     for split, items in splits.items())
        del model
        if rank == 0:
            rec = {"round": t, "pairs": n_pairs, "val": val, **test}
            with open(os.path.join(rdir, "done.json.tmp"), "w") as f:
                json.dump(rec, f)
            os.replace(os.path.join(rdir, "done.json.tmp"), os.path.join(rdir, "done.json"))
            history.append(rec)
            print(f"round {t}: {json.dumps(rec)}", flush=True)
        barrier(world_size)
    if rank == 0:  # out_dir/final: the last round's model, its LoRA merged, in the released layout
        model, tok = round_model(c, dev, c["rounds"])
        save_final(model, tok, os.path.join(c["out_dir"], "final"), c, time.time() - t_start, 0, 1,
                   caption_prompt(train_items, c["init_from"]))
        rounds_out = [{k: h[k] for k in ("round", "miss", "hall", "total", "judged", "pairs") if k in h} for h in history]
        merge_results(c["results"], {"rounds": rounds_out}, {"mrdpo": time.time() - t_start})
    finish_distributed(world_size)


if __name__ == "__main__":
    run(lambda argv: main(configure(globals(), argv)))
