"""
Evaluation of video-SALMONN 2 checkpoints.

The toy world (make toy runs these after each stage and gathers the numbers in out/toy/results.json):
$ python eval.py --stage=base --ckpt=out/toy/base/final    # visual captions of the visual base: Miss / Hall / Total
$ python eval.py --stage=align --ckpt=out/toy/align/final  # ASR word error rate after audio alignment
$ python eval.py --stage=sft --ckpt=out/toy/sft/final      # AV captions by event type, Miss / Hall / Total, QA accuracy
"""
import importlib.util
import json
import os
import sys
import time

import torch

from config import configure
from data import encode_prompt, load_tokenizer, media_features, read_manifest
from judge import rates, toy_judge
from model import VideoSALMONN2

# -----------------------------------------------------------------------------
ckpt = ""  # checkpoint directory (released layout, with tokenizer.json)
stage = "sft"  # toy stage: base | align | sft; decides the metrics and the key in `results`
data_dir = "data/toyav"  # the toy world's manifests
results = "out/toy/results.json"  # merged into, stage by stage
cache_dir = "out/toy/cache"  # frozen-encoder features (shared with training)
max_new_tokens = 160  # longest caption generated
limit = 0  # items per task (0: all)
fps = 1.0  # frames per second sampled
max_frames = 110  # frames at most
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"
# -----------------------------------------------------------------------------


def toy_world():
    """data/toyav/prepare.py as a module (data.py takes the name `data`): the toy caption grammar."""
    spec = importlib.util.spec_from_file_location("toyav", os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "toyav", "prepare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def generate(model, tok, items, use_audio, c, n=1, **sampling):
    """Greedy (or sampled, with sampling kwargs) answers of the model to the items' prompts."""
    cfg, p = model.cfg, next(model.parameters())
    prep = dict(fps=c["fps"], max_frames=c["max_frames"], image_size=cfg.vision.image_size,
                n_mels=cfg.whisper.num_mel_bins, segment_seconds=cfg.segment_seconds)
    fingerprint, stop = model.encoder_fingerprint(), (tok.token_to_id("<|im_end|>"),)
    outputs = []
    for it in items:
        vis, aud, times, duration = media_features(it.get("video"), model.encode, fingerprint, c["cache_dir"], it.get("audio"), **prep)
        feats = (None if vis is None else vis.to(p.device, p.dtype), aud.to(p.device, p.dtype) if use_audio else None, times, duration)
        ids = model.sample(feats, encode_prompt(tok, it["prompt"]), n=n, max_new_tokens=c["max_new_tokens"],
                           greedy=not sampling, stop_ids=stop, **sampling)
        texts = [tok.decode(s, skip_special_tokens=True).strip() for s in ids]
        outputs.append(texts if n > 1 else texts[0])
    return outputs


def wer(ref, hyp):
    """Word error rate: word-level edit distance over the reference length."""
    r, h = ref.split(), hyp.split()
    row = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        prev, row[0] = row[0], i
        for j, hw in enumerate(h, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (rw != hw))
    return row[-1], len(r)


def caption_scores(world, captions, items):
    """Miss / Hall / Total with the exact toy judge, and the fraction of ground-truth events of each
    type (visual, sound, speech) that the caption states exactly."""
    judgments, found, total = [], {}, {}
    for caption, it in zip(captions, items):
        keys = world.parse_caption(caption)
        judgments.append(toy_judge(keys, [e["key"] for e in it["events"]]))
        stated = [tuple(k) for k in keys]
        for e in it["events"]:
            total[e["type"]] = total.get(e["type"], 0) + 1
            if tuple(e["key"]) in stated:
                stated.remove(tuple(e["key"]))
                found[e["type"]] = found.get(e["type"], 0) + 1
    return {**rates(judgments), "accuracy": {t: found.get(t, 0) / total[t] for t in sorted(total)}}


def toy_metrics(model, tok, c):
    world, pick = toy_world(), lambda items: items[:c["limit"]] if c["limit"] else items
    if c["stage"] == "align":
        asr = pick([it for it in read_manifest(os.path.join(c["data_dir"], "align_test.jsonl")) if it["task"] == "asr"])
        errors = [wer(it["response"], h) for it, h in zip(asr, generate(model, tok, asr, True, c))]
        return {"asr_wer": sum(e for e, _ in errors) / max(1, sum(n for _, n in errors))}
    base = c["stage"] == "base"
    test = read_manifest(os.path.join(c["data_dir"], "base_test.jsonl" if base else "test.jsonl"))
    caps = pick([it for it in test if it["task"] == "caption"])
    out = caption_scores(world, generate(model, tok, caps, not base, c), caps)
    if not base:
        qa = pick([it for it in test if it["task"] == "qa"])
        answers = generate(model, tok, qa, True, c)
        out["qa_acc"] = sum(a.strip()[:1] == it["answer"] for a, it in zip(answers, qa)) / max(1, len(qa))
    return out


def merge_results(path, metrics, seconds):
    """Add {stage: metrics} and {stage: seconds} to the results file (written whole, then renamed)."""
    res = json.load(open(path)) if os.path.exists(path) else {}
    res.update(metrics)
    res.setdefault("seconds", {}).update({k: round(v, 1) for k, v in seconds.items()})
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(path + ".tmp", path)
    return res


def main(argv):
    c = configure(globals(), argv)
    t0 = time.time()
    model = VideoSALMONN2.from_pretrained(c["ckpt"], getattr(torch, c["dtype"]), c["device"]).eval()
    tok = load_tokenizer(c["ckpt"])
    metrics = toy_metrics(model, tok, c)
    with open(os.path.join(c["ckpt"], "train_config.json")) as f:
        train_seconds = json.load(f).get("seconds", 0.0)
    seconds = {c["stage"]: train_seconds + time.time() - t0}
    meta = os.path.join(c["data_dir"], "meta.json")  # the toy generator's own time
    if c["stage"] == "base" and os.path.exists(meta):
        seconds["prepare"] = json.load(open(meta))["seconds"]
    merge_results(c["results"], {c["stage"]: metrics}, seconds)
    print(f"{c['stage']}: {json.dumps(metrics)}")


if __name__ == "__main__":
    main(sys.argv[1:])
