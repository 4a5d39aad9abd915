"""
Evaluation of video-SALMONN 2 checkpoints.

The toy world (make toy runs these after each stage and gathers the numbers in out/toy/results.json):
$ python eval.py --stage=base --ckpt=out/toy/base/final    # visual captions of the visual base: Miss / Hall / Total
$ python eval.py --stage=align --ckpt=out/toy/align/final  # ASR word error rate after audio alignment
$ python eval.py --stage=sft --ckpt=out/toy/sft/final      # AV captions by event type, Miss / Hall / Total, QA accuracy

The paper's benchmarks (per-item JSON, and the metrics merged into out_dir/results.json):
$ python eval.py --task=captions --ckpt=DIR --manifest=testset.jsonl  # Miss / Hall / Total by the LLM judge (4.2, App. F)
$ python eval.py --task=qa --ckpt=DIR --manifest=videomme.jsonl       # multiple-choice accuracy, Video-MME prompt
$ python eval.py --task=qa_from_captions --ckpt=DIR --manifest=videomme.jsonl   # a text LLM answers from captions (5.3)
$ python eval.py --task=qa_from_captions --captions=out/eval/predictions.json --manifest=videomme.jsonl
$ python eval.py --task=elo --matches=prefs.jsonl                     # Elo ratings of pairwise preferences (App. G)
$ python eval.py --task=events --manifest=sft.jsonl --events_out=mrdpo_train.jsonl  # atomic events of the captions (3.3.1)
The LLM judge and the QA LLM are any OpenAI-compatible server: OPENAI_BASE_URL, OPENAI_API_KEY (judge.py).
"""
import json
import os
import re
import sys
import time

import torch

from config import configure
from data import Features, decode_response, load_tokenizer, merge_results, read_manifest
from judge import SEED, JudgeError, LLMClient, LLMJudge, ToyJudge, each, median_of_runs, rates
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
# the paper's benchmarks
task = ""  # captions | qa | qa_from_captions | elo; empty: the toy evaluation of `stage`
manifest = ""  # JSONL: the released test-set format (captions), or items with an "answer" letter (qa tasks)
out_dir = "out/eval"  # per-item JSON, the released predictions format, and results.json
captions = ""  # qa_from_captions: a predictions file [{"id": [video], "pred": ...}] to use instead of generating
matches = ""  # elo: JSONL of pairwise preferences {"a": model, "b": model, "winner": "a" | "b" | "tie"}
caption_tokens = 1024  # longest benchmark caption, as the released eval
answer_tokens = 8  # new tokens of a multiple-choice answer: a letter, maybe with a word or two around it
use_audio = True  # False for a visual-only model (the visual base)
caption_prompt = ("Give a detailed account of everything in the video, capturing all the specifics. While doing so, "
                  "also include as much information from the audio as possible, ensuring that the descriptions of "
                  "audio and video are well-synchronized.")  # qa_from_captions' captions: the released demo prompt
judge_model = ""  # the caption judge; empty: env JUDGE_MODEL, else gpt-3.5-turbo-0125 (judge.py)
qa_model = "gpt-4o"  # the text LLM answering from captions, GPT-4o in the paper's Table 3
events_model = "gpt-4o"  # the LLM that splits ground-truth captions into atomic events, GPT-4o in 3.3.1
events_out = ""  # events: the manifest written, its caption items with their "events"
judge_cache = "out/judge_cache.sqlite"  # every LLM answer, so that no request is paid for twice
workers = 8  # concurrent LLM requests
# -----------------------------------------------------------------------------
JUDGE_RUNS = 7  # the released protocol: the whole set judged with 7 seeds, the median-Total run reported
QA_PROMPT = ("Select the best answer to the following multiple-choice question based on the video. Respond with only "
             "the letter (A, B, C, or D) of the correct option.\n{question}\n{options}\nThe best answer is:")  # 2+'s Video-MME prompt
# ours: the paper does not give the prompt of 5.3, so the QA prompt is asked of the description instead of the video
CAPTION_QA_PROMPT = "Here is a detailed description of a video, of what is seen and what is heard:\n\n{caption}\n\n{question}"
LETTER = re.compile(r"\b([A-D])\b")  # a standalone option letter: "B", "B.", "(B)", "The answer is B"
ELO_INITIAL, ELO_BASE, ELO_SCALE, ELO_K = 1000, 10, 400, 8  # Table 9


@torch.no_grad()
def answers(model, tok, items, c, max_new_tokens, use_audio=True):
    """Greedy answers of the model to the items' prompts: (the items whose media could be read, their (text, whether
    it ended with <|im_end|> rather than at the token limit)). Unreadable items are named and counted by Features."""
    dev = next(model.parameters()).device
    data = Features(model, tok, items, fps=c["fps"], max_frames=c["max_frames"], cache_dir=c["cache_dir"],
                    use_audio=use_audio, responses=False)
    ids = model.generate([data.example(i, dev)[:2] for i in range(len(data.items))], max_new_tokens=max_new_tokens,
                         greedy=True, stop_ids=(tok.token_to_id("<|im_end|>"),))
    return data.items, [decode_response(tok, x[0]) for x in ids]


def wer(ref, hyp):
    """Word error rate: word-level edit distance over the reference length."""
    r, h = ref.split(), hyp.split()
    row = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        prev, row[0] = row[0], i
        for j, hw in enumerate(h, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (rw != hw))
    return row[-1], len(r)


def toy_metrics(model, tok, c):
    """The toy stage's metrics, by the exact toy judge: ASR word error rate (align); Miss / Hall / Total and the
    fraction of events of each type stated exactly (base, sft); multiple-choice accuracy (sft)."""
    judge, pick = ToyJudge(), lambda items: items[:c["limit"]] if c["limit"] else items
    if c["stage"] == "align":
        asr = pick([it for it in read_manifest(os.path.join(c["data_dir"], "align_test.jsonl")) if it["task"] == "asr"])
        kept, outs = answers(model, tok, asr, c, c["max_new_tokens"])
        errors = [wer(it["response"], text) for it, (text, _) in zip(kept, outs)]
        return {"asr_wer": sum(e for e, _ in errors) / sum(n for _, n in errors)}
    base = c["stage"] == "base"
    test = read_manifest(os.path.join(c["data_dir"], "base_test.jsonl" if base else "test.jsonl"))
    caps, outs = answers(model, tok, pick([it for it in test if it["task"] == "caption"]), c, c["max_new_tokens"], not base)
    texts = [text for text, _ in outs]
    judged, _ = judge.judge_all([{"caption": text, "events": it["events"]} for text, it in zip(texts, caps)])
    out = {**rates(judged), "accuracy": judge.accuracy(texts, caps)}
    if not base:
        qa, outs = answers(model, tok, pick([it for it in test if it["task"] == "qa"]), c, c["max_new_tokens"])
        out["qa_acc"] = sum(extract_letter(text) == it["answer"] for (text, _), it in zip(outs, qa)) / len(qa)
    return out


# -----------------------------------------------------------------------------
# the paper's benchmarks


def video_id(path, c):
    """A video as the manifest names it (relative to the manifest): the released predictions' "id"."""
    return os.path.relpath(path, os.path.dirname(os.path.abspath(c["manifest"])))


def write_json(c, name, obj):
    os.makedirs(c["out_dir"], exist_ok=True)
    with open(os.path.join(c["out_dir"], name), "w") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)


def write_predictions(c, videos, texts):
    """The released predictions format, which --task=qa_from_captions --captions=... reads back."""
    write_json(c, "predictions.json", [{"id": [video_id(v, c)], "pred": t} for v, t in zip(videos, texts)])


def percent_row(name, r):
    return f"{name:<12}{100 * r['miss']:>7.1f}{100 * r['hall']:>7.1f}{100 * r['total']:>8.1f}"


def caption_benchmark(model, tok, c):
    """The released caption benchmark: a greedy caption per video, judged JUDGE_RUNS times against the atomic events
    with seeds SEED, SEED + 1, ...; the run with the median Total is reported, its rates over the items it judged."""
    items = [it for it in read_manifest(c["manifest"]) if it.get("events")][:c["limit"] or None]
    items, outs = answers(model, tok, items, c, c["caption_tokens"], c["use_audio"])
    ids = [str(it.get("id") or video_id(it["video"], c)) for it in items]
    judge = LLMJudge(c["judge_model"] or None, cache_path=c["judge_cache"])
    try:
        run = median_of_runs(judge, [{"id": i, "caption": text, "truncated": not ended, "events": it["events"]}
                                     for i, it, (text, ended) in zip(ids, items, outs)], JUDGE_RUNS, workers=c["workers"])
    finally:
        judge.close()
    judged = {r["id"]: r for r in run["results"]}
    write_json(c, "captions.json", [{"id": i, "video": video_id(it["video"], c), "prompt": it["prompt"], "prediction": text,
                                     "truncated": not ended, **judged.get(i, {"error": run["errors"].get(i)})}
                                    for i, it, (text, ended) in zip(ids, items, outs)])
    write_predictions(c, [it["video"] for it in items], [text for text, _ in outs])
    print(f"captions: {len(items)} videos, {sum(not e for _, e in outs)} truncated; judge {judge.model}, "
          f"{JUDGE_RUNS} runs; rates over the {len(judged)} of {len(items)} items judged in the median run")
    print(f"{'seed':<12}{'Miss%':>7}{'Hall%':>7}{'Total%':>8}")
    for r in run["runs"]:
        print(percent_row(f"    {r['seed']}", r))
    print(percent_row(f"median {run['seed']}", run))
    if run["errors"]:
        print(f"the judge failed on {len(run['errors'])} item(s) in the median run, left out of its rates:")
        print("\n".join(f"  {e}" for e in run["errors"].values()))
    return {k: run[k] for k in ("miss", "hall", "total", "seed", "runs")} | {"judged": len(judged), "items": len(items)}


def options_text(options):
    """Video-MME lists its options as "A. ..."; bare options get their letters."""
    return "\n".join(o if re.match(r"[A-D]\. ", o) else f"{l}. {o}" for l, o in zip("ABCD", options))


def read_qa(path):
    """The multiple-choice items (those with an "answer" letter) of a JSONL manifest, media paths made absolute. An item
    keeps its prompt (the toy's hold the Video-MME prompt already); one with "question" and "options" gets QA_PROMPT."""
    root, items = os.path.dirname(os.path.abspath(path)), []
    with open(path) as f:
        for line in f:
            it = json.loads(line) if line.strip() else {}
            if "answer" in it:
                if "prompt" not in it:
                    it["prompt"] = QA_PROMPT.format(question=it["question"], options=options_text(it["options"]))
                it["video"] = os.path.join(root, it["video"])
                items.append(it)
    return items


def extract_letter(text):
    """The first standalone A-D of an answer ("B", "B.", "(B)", "The answer is B"); None if it has none."""
    m = LETTER.search(text)
    return m.group(1) if m else None


def qa_report(c, name, items, answers):
    """Accuracy over all the items, an answer without a letter counting as wrong; per-item JSON in out_dir/{name}.json."""
    letters = [extract_letter(a) for a in answers]
    right = sum(l == it["answer"] for l, it in zip(letters, items))
    write_json(c, f"{name}.json", [{"id": it.get("id", video_id(it["video"], c)), "video": video_id(it["video"], c),
                                    "prompt": it["prompt"], "prediction": a, "letter": l, "answer": it["answer"],
                                    "correct": l == it["answer"]} for it, a, l in zip(items, answers, letters)])
    print(f"{name}: accuracy {100 * right / max(1, len(items)):.1f}% ({right} of {len(items)} items; "
          f"{letters.count(None)} answers without a letter counted wrong)")
    out = {"accuracy": right / max(1, len(items)), "items": len(items), "no_letter": letters.count(None)}
    by_duration = {}  # Video-MME's duration classes, the S / M / L columns of the paper's Table 4
    for d in ("short", "medium", "long"):
        if hits := [l == it["answer"] for l, it in zip(letters, items) if it.get("duration") == d]:
            by_duration[d] = {"accuracy": sum(hits) / len(hits), "items": len(hits)}
            print(f"{name}: {d:<6} accuracy {100 * sum(hits) / len(hits):.1f}% ({sum(hits)} of {len(hits)} items)")
    return out | ({"by_duration": by_duration} if by_duration else {})


def qa_benchmark(model, tok, c):
    items, outs = answers(model, tok, read_qa(c["manifest"])[:c["limit"] or None], c, c["answer_tokens"], c["use_audio"])
    return qa_report(c, "qa", items, [text for text, _ in outs])


def parse_letter(answer):
    if extract_letter(answer) is None:
        raise ValueError("no option letter A-D in the answer")  # the client re-asks with the next seed
    return answer


def qa_from_captions(model, tok, c):
    """Paper 5.3: a text LLM (qa_model) answers each question from the caption of its video alone."""
    items = read_qa(c["manifest"])[:c["limit"] or None]
    videos = list(dict.fromkeys(it["video"] for it in items))
    if c["captions"]:
        preds = {p["id"][0]: p["pred"] for p in json.load(open(c["captions"]))}
        if missing := [video_id(v, c) for v in videos if video_id(v, c) not in preds]:
            raise SystemExit(f"{c['captions']}: no caption of {len(missing)} videos, e.g. {missing[0]}")
        caps = {v: preds[video_id(v, c)] for v in videos}
    else:
        kept, outs = answers(model, tok, [{"video": v, "prompt": c["caption_prompt"]} for v in videos], c,
                             c["caption_tokens"], c["use_audio"])
        write_predictions(c, [it["video"] for it in kept], [text for text, _ in outs])
        caps = {it["video"]: text for it, (text, _) in zip(kept, outs)}
        items = [it for it in items if it["video"] in caps]
    client = LLMClient(c["qa_model"], cache_path=c["judge_cache"])

    def ask(it):  # the video's own prompt, asked of its description
        question = it["prompt"].replace("based on the video", "based on the description of the video")
        messages = [{"role": "user", "content": CAPTION_QA_PROMPT.format(caption=caps[it["video"]], question=question)}]
        return client.ask(messages, parse_letter, SEED, f"item {it.get('id', video_id(it['video'], c))}")
    try:
        outs = each(ask, items, c["workers"])
    finally:
        client.close()
    failed = [str(o) for o in outs if isinstance(o, JudgeError)]
    out = qa_report(c, "qa_from_captions", items, ["" if isinstance(o, JudgeError) else o for o in outs])
    if failed:
        print(f"the LLM ({client.model}) failed on {len(failed)} item(s), counted wrong:")
        print("\n".join(f"  {e}" for e in failed))
    return out | {"failed": len(failed)}


def elo(matches, k=ELO_K, base=ELO_BASE, scale=ELO_SCALE, initial=ELO_INITIAL):
    """Sequential Elo ratings {name: rating} of pairwise matches {"a", "b", "winner": "a" | "b" | "tie"}, taken in
    order: each moves the two ratings by k * (score - expected score), expected = 1 / (1 + base ** (diff / scale))."""
    ratings = {}
    for m in matches:
        ra, rb = ratings.setdefault(m["a"], initial), ratings.setdefault(m["b"], initial)
        delta = k * ({"a": 1.0, "b": 0.0, "tie": 0.5}[m["winner"]] - 1 / (1 + base ** ((rb - ra) / scale)))
        ratings[m["a"]], ratings[m["b"]] = ra + delta, rb - delta
    return ratings


def elo_table(c):
    with open(c["matches"]) as f:
        games = [json.loads(line) for line in f if line.strip()]
    ratings = elo(games)
    played = {name: sum(name in (g["a"], g["b"]) for g in games) for name in ratings}
    print(f"elo: {len(games)} matches, Table 9 parameters (initial {ELO_INITIAL}, base {ELO_BASE}, scale {ELO_SCALE}, K {ELO_K})")
    for name, r in sorted(ratings.items(), key=lambda kv: -kv[1]):
        print(f"{name:<32}{r:>8.1f}{played[name]:>6} matches")
    return ratings


def add_events(c):
    """The GPT-4o role of 3.3.1 over a manifest: each caption item with a ground-truth response gets the atomic
    events of that response, and the items are written as a new manifest, which MrDPO and the caption benchmark read.
    An item the LLM fails on is named and left out; every answer is cached, so a rerun asks only for those."""
    if not c["events_out"]:
        raise SystemExit("--task=events needs --events_out=FILE")
    items = [it for it in read_manifest(c["manifest"]) if it["task"] == "caption" and it.get("response")][:c["limit"] or None]
    client = LLMClient(c["events_model"], cache_path=c["judge_cache"])
    try:
        events = each(lambda it: client.decompose(it["response"], name=it["line"]), items, c["workers"])
    finally:
        client.close()
    for e in events:
        if isinstance(e, JudgeError):
            print(e, flush=True)
    root = os.path.dirname(os.path.abspath(c["events_out"]))
    with open(c["events_out"] + ".tmp", "w") as f:
        for it, ev in zip(items, events):
            if not isinstance(ev, JudgeError):  # media paths relative to the new manifest, as read_manifest expects
                rec = {k: os.path.relpath(v, root) if k in ("video", "audio") else v for k, v in it.items() if k != "line"}
                f.write(json.dumps({**rec, "events": ev}, ensure_ascii=False) + "\n")
    os.replace(c["events_out"] + ".tmp", c["events_out"])
    kept = sum(not isinstance(ev, JudgeError) for ev in events)
    print(f"events: {kept} of {len(items)} captions decomposed by {client.model} -> {c['events_out']}")
    return {"items": len(items), "decomposed": kept}


def load_model(c):
    return VideoSALMONN2.from_pretrained(c["ckpt"], getattr(torch, c["dtype"]), c["device"]).eval(), load_tokenizer(c["ckpt"])


def run_task(c):
    if c["task"] in (no_model := {"elo": elo_table, "events": add_events}):
        return no_model[c["task"]](c)
    tasks = {"captions": caption_benchmark, "qa": qa_benchmark, "qa_from_captions": qa_from_captions}
    if c["task"] not in tasks:
        raise SystemExit(f"unknown task {c['task']!r}: captions, qa, qa_from_captions, elo or events")
    from_file = c["task"] == "qa_from_captions" and c["captions"]  # answering from a predictions file needs no model
    return tasks[c["task"]](*((None, None) if from_file else load_model(c)), c)


def main(argv):
    c = configure(globals(), argv)
    t0 = time.time()
    if c["task"]:
        merge_results(os.path.join(c["out_dir"], "results.json"), {c["task"]: run_task(c)}, {c["task"]: time.time() - t0})
        return
    model, tok = load_model(c)
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
