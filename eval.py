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
import time
from functools import lru_cache

import torch

from checkpoint import load_model as load_checkpoint, read_config, train_config, trained_prompt
from config import UserError, configure, run
from data import Features, decode_response, load_tokenizer, merge_results, read_manifest, read_records
from judge import SEED, JudgeError, LLMClient, LLMJudge, ToyJudge, each, median_of_runs, rates

# -----------------------------------------------------------------------------
ckpt = ""  # checkpoint directory (released layout)
tokenizer = ""  # tokenizer.json; empty: the one in ckpt
stage = "sft"  # toy stage: base | align | sft; decides the metrics and the key in `results`
data_dir = "data/toyav"  # the toy world's manifests
results = "out/toy/results.json"  # merged into, stage by stage
cache_dir = "out/toy/cache"  # frozen-encoder features (shared with training)
max_new_tokens = 160  # longest caption generated
limit = 0  # items per task (0: all)
written_audio = False  # toy: every item hears its soundtrack written in words (training.py's written_audio)
fps = 1.0  # frames per second sampled
max_frames = 110  # frames at most
batch = 0  # videos decoding together (engine.py); 0: 8 on a CPU, on a GPU as many as its free memory holds
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
caption_prompt = ""  # qa_from_captions' captions; empty: the checkpoint's trained one, else the released demo prompt
judge_model = ""  # the caption judge; empty: env JUDGE_MODEL, else gpt-3.5-turbo-0125 (judge.py)
qa_model = "gpt-4o"  # the text LLM answering from captions, GPT-4o in the paper's Table 3
events_model = "gpt-4o"  # the LLM that splits ground-truth captions into atomic events, GPT-4o in 3.3.1
events_out = ""  # events: the manifest written, its caption items with their "events"
judge_cache = "out/judge_cache.sqlite"  # every LLM answer, so that no request is paid for twice
judge_timeout = 120.0  # seconds one LLM request may take before it is abandoned and retried
workers = 8  # concurrent LLM requests
# -----------------------------------------------------------------------------
JUDGE_RUNS = 7  # the released protocol: the whole set judged with 7 seeds, the median-Total run reported
QA_PROMPT = ("Select the best answer to the following multiple-choice question based on the video. Respond with only "
             "the letter (A, B, C, or D) of the correct option.\n{question}\n{options}\nThe best answer is:")  # 2+'s Video-MME prompt
# ours: the paper does not give the prompt of 5.3, so the QA prompt is asked of the description instead of the video
CAPTION_QA_PROMPT = "Here is a detailed description of a video, of what is seen and what is heard:\n\n{caption}\n\n{question}"
LETTER = re.compile(r"\b([A-D])\b")  # a standalone option letter: "B", "B.", "(B)", "The answer is B"
ELO_INITIAL, ELO_BASE, ELO_SCALE, ELO_K = 1000, 10, 400, 8  # Table 9
TOY_STAGES = ("base", "align", "sft")


@torch.no_grad()
def answer_stream(model, tok, items, c, max_new_tokens, use_audio=True):
    """Greedy answers of the model to the items' prompts, many decoding together (model.stream): yields (k, item,
    (text, whether it ended with <|im_end|> rather than at the token limit)) as each is done, k counting the items
    whose media could be read. Unreadable items are named and counted by Features."""
    dev = next(model.parameters()).device
    data = Features(model, tok, items, fps=c["fps"], max_frames=c["max_frames"], cache_dir=c["cache_dir"],
                    use_audio=use_audio, responses=False, written_audio=c["written_audio"])
    for k, ids in model.stream((data.example(i, dev)[:2] for i in range(len(data.items))), batch=c["batch"],
                               max_new_tokens=max_new_tokens, greedy=True, stop_ids=(tok.token_to_id("<|im_end|>"),)):
        yield k, data.items[k], decode_response(tok, ids[0])


def answers(model, tok, items, c, max_new_tokens, use_audio=True):
    """answer_stream's answers in order: (the items whose media could be read, their answers)."""
    done = sorted(answer_stream(model, tok, items, c, max_new_tokens, use_audio), key=lambda x: x[0])
    return [it for _, it, _ in done], [a for _, _, a in done]


def wer(ref, hyp):
    """Word error rate: word-level edit distance over the reference length."""
    r, h = ref.split(), hyp.split()
    row = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        prev, row[0] = row[0], i
        for j, hw in enumerate(h, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (rw != hw))
    return row[-1], len(r)


def trained_inputs(ckpt):
    """(use_audio, written_audio): how the checkpoint's training gave it its media (train_config.json); frames alone
    for a checkpoint without one."""
    trained = train_config(ckpt)
    return bool(trained.get("use_audio", False)), bool(trained.get("written_audio", False))


def toy_items(items, task, fields, limit):
    """The first limit (0: all) items of one task of a toy manifest. An item without a field the toy judge reads is a
    UserError naming its line, raised before anything is generated rather than after."""
    items = [it for it in items if it["task"] == task][:limit or None]
    for it in items:
        if missing := [k for k in fields if not it.get(k)]:
            raise UserError(f"{it['line']}: a toy {task} item without {' or '.join(map(repr, missing))}")
        if "events" in fields and not ToyJudge.reads(it["events"]):
            raise UserError(f"{it['line']}: events without the toy's keys (a toy event is {{\"text\", \"key\", ...}})")
    return items


def toy_metrics(model, tok, c):
    """The toy stage's metrics, by the exact toy judge: ASR word error rate (align); Miss / Hall / Total and the
    fraction of events of each type stated exactly (base, sft); multiple-choice accuracy (sft: an answer counts
    when it is the right option's answer sentence, prepare.parse_answer). A metric none of whose items could be
    read is left out, never 0; with no other metric, that ends the run."""
    if c["stage"] not in TOY_STAGES:
        raise UserError(f"--stage={c['stage']}: no such toy stage ({', '.join(TOY_STAGES)})")
    judge = ToyJudge()
    if c["stage"] == "align":
        asr = toy_items(read_manifest(os.path.join(c["data_dir"], "align_test.jsonl")), "asr", ("response",), c["limit"])
        kept, outs = answers(model, tok, asr, c, c["max_new_tokens"])
        if not kept:
            raise SystemExit("align: no rate: no ASR item could be read (named above)")
        errors = [wer(it["response"], text) for it, (text, _) in zip(kept, outs)]
        return {"asr_wer": sum(e for e, _ in errors) / sum(n for _, n in errors)}
    base = c["stage"] == "base"
    use_audio = True
    if base:  # the visual base captions as its training showed it its visual captions: frames alone (the vision stage),
        # or each frame with its second's audio tokens, written as silence (config/toy_base.py); shown frames alone,
        # that base states far fewer of the moves and disappearances it sees (dev/LOG.md, session 12)
        use_audio, written_audio = trained_inputs(c["ckpt"])
        c = {**c, "written_audio": written_audio}
    test = read_manifest(os.path.join(c["data_dir"], "base_test.jsonl" if base else "test.jsonl"))
    captions = toy_items(test, "caption", ("events",), c["limit"])
    questions = [] if base else toy_items(test, "qa", ("options", "answer"), c["limit"])
    caps, outs = answers(model, tok, captions, c, c["max_new_tokens"], use_audio)
    texts = [text for text, _ in outs]
    judged, _ = judge.judge_all([{"caption": text, "events": it["events"]} for text, it in zip(texts, caps)])
    if not judged:
        raise SystemExit(f"{c['stage']}: no rate: no caption item could be read (named above)")
    out = {**rates(judged), "accuracy": judge.accuracy(texts, caps)}
    if not base:
        qa, outs = answers(model, tok, questions, c, c["max_new_tokens"])
        if qa:
            chosen = [judge.world.parse_answer(text, it["options"]) for (text, _), it in zip(outs, qa)]
            out["qa_acc"] = sum(letter == it["answer"] for letter, it in zip(chosen, qa)) / len(qa)
        else:
            print(f"sft: no qa_acc: none of the {len(questions)} QA items could be read (named above)", flush=True)
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


def percent_row(name, r, items):
    return f"{name:<12}{100 * r['miss']:>7.1f}{100 * r['hall']:>7.1f}{100 * r['total']:>8.1f}{r['judged']:>8} of {items}"


def say_dropped(task, total, reasons):
    """One line: how many of the manifest's items a task leaves out, and why."""
    said = [f"{n} {why}" for why, n in reasons.items() if n]
    print(f"{task}: {total} items; dropped: {', '.join(said) if said else 'none'}", flush=True)


def caption_benchmark(load, c):
    """The released caption benchmark: a greedy caption per video, judged JUDGE_RUNS times against the atomic events
    with seeds SEED, SEED + 1, ...; the run with the median Total is reported, its rates over the items it judged.
    Each caption goes to out_dir/captions.jsonl as soon as it is made, and a rerun continues from that file."""
    listed = read_manifest(c["manifest"])
    items = [it for it in listed if it.get("events")][:c["limit"] or None]
    ids = [str(it.get("id") or video_id(it["video"], c)) for it in items]
    path = os.path.join(c["out_dir"], "captions.jsonl")
    made = {r["id"]: r for r in read_records(path, {"id": str, "prediction": str, "truncated": bool})}
    todo = [it for i, it in zip(ids, items) if i not in made]
    if made:
        print(f"captions: {sum(i in made for i in ids)} captions from {path} (an earlier run), {len(todo)} to make")
    unreadable = 0
    if todo:
        model, tok = load()
        os.makedirs(c["out_dir"], exist_ok=True)
        unreadable = len(todo)
        with open(path, "a", encoding="utf-8") as f:
            for _, it, (text, ended) in answer_stream(model, tok, todo, c, c["caption_tokens"], c["use_audio"]):
                rec = {"id": str(it.get("id") or video_id(it["video"], c)), "video": video_id(it["video"], c),
                       "prompt": it["prompt"], "prediction": text, "truncated": not ended}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
                made[rec["id"]] = rec
                unreadable -= 1
    say_dropped("captions", len(listed), {"without events": sum(not it.get("events") for it in listed),
                                          "unreadable (named above)": unreadable})
    done = [(it, made[i]) for i, it in zip(ids, items) if i in made]
    if not done:
        raise SystemExit(f"captions: no caption to judge: none of the {len(items)} videos could be read")
    write_predictions(c, [it["video"] for it, _ in done], [r["prediction"] for _, r in done])
    judge = LLMJudge(c["judge_model"] or None, cache_path=c["judge_cache"], timeout=c["judge_timeout"])
    try:
        run = median_of_runs(judge, [{"id": r["id"], "caption": r["prediction"], "truncated": r["truncated"],
                                      "events": it["events"]} for it, r in done], JUDGE_RUNS, workers=c["workers"])
    except JudgeError as e:  # a judge that fails on every item must not look like a perfect model
        raise SystemExit(f"captions: {e} (the captions are kept in {path}; every answer is cached, a rerun asks only "
                         f"for what failed)") from e
    finally:
        judge.close()
    judged = {r["id"]: r for r in run["results"]}
    write_json(c, "captions.json", [{**r, **judged.get(r["id"], {"error": run["errors"].get(r["id"])})} for _, r in done])
    print(f"captions: {len(done)} videos, {sum(r['truncated'] for _, r in done)} truncated; judge {judge.model}, "
          f"{JUDGE_RUNS} runs; each run's rates over the items it judged")
    print(f"{'seed':<12}{'Miss%':>7}{'Hall%':>7}{'Total%':>8}{'judged':>8}")
    for r in run["runs"]:
        print(percent_row(f"    {r['seed']}", r, len(done)))
    print(percent_row(f"median {run['seed']}", run, len(done)))
    if run["errors"]:
        print(f"the judge failed on {len(run['errors'])} item(s) in the median run, left out of its rates:")
        print("\n".join(f"  {e}" for e in run["errors"].values()))
    return {k: run[k] for k in ("miss", "hall", "total", "seed", "runs")} | {"judged": len(judged), "items": len(done)}


def options_text(options):
    """Video-MME lists its options as "A. ..."; bare options get their letters."""
    return "\n".join(o if re.match(r"[A-D]\. ", o) else f"{l}. {o}" for l, o in zip("ABCD", options))


def read_qa(path):
    """The multiple-choice items (those with an "answer" letter) of a JSONL manifest, media paths made absolute. An item
    keeps its prompt (the one its model was trained on, as the toy's); one with "question" and "options" gets QA_PROMPT.
    A malformed line is named and skipped (read_manifest); a manifest without a multiple-choice item is a UserError."""
    def prepare(it):
        if "answer" in it:
            it.setdefault("task", "qa")
            if "prompt" not in it:
                it["prompt"] = QA_PROMPT.format(question=it["question"], options=options_text(it["options"]))
    items = [it for it in read_manifest(path, prepare) if "answer" in it]
    if not items:
        raise UserError(f"{path}: no multiple-choice item (one with an \"answer\" letter)")
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


def qa_benchmark(load, c):
    listed = read_qa(c["manifest"])[:c["limit"] or None]
    items, outs = answers(*load(), listed, c, c["answer_tokens"], c["use_audio"])
    say_dropped("qa", len(listed), {"unreadable (named above)": len(listed) - len(items)})
    if not items:
        raise SystemExit("qa: no accuracy: none of the videos could be read")
    return qa_report(c, "qa", items, [text for text, _ in outs])


def parse_letter(answer):
    if extract_letter(answer) is None:
        raise ValueError("no option letter A-D in the answer")  # the client re-asks with the next seed
    return answer


def read_predictions(path):
    try:
        with open(path, encoding="utf-8") as f:
            return {p["id"][0]: p["pred"] for p in json.load(f)}
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise UserError(f"{path}: not a predictions file [{{\"id\": [video], \"pred\": caption}}, ...] ({e})") from e


def qa_from_captions(load, c):
    """Paper 5.3: a text LLM (qa_model) answers each question from the caption of its video alone. An item the LLM
    fails on is named and left out of the accuracy; with none answered there is no accuracy."""
    items = read_qa(c["manifest"])[:c["limit"] or None]
    videos = list(dict.fromkeys(it["video"] for it in items))
    if c["captions"]:
        preds = read_predictions(c["captions"])
        if missing := [video_id(v, c) for v in videos if video_id(v, c) not in preds]:
            raise UserError(f"{c['captions']}: no caption of {len(missing)} videos, e.g. {missing[0]}")
        caps = {v: preds[video_id(v, c)] for v in videos}
    else:
        prompt = c["caption_prompt"] or trained_prompt(c["ckpt"])
        kept, outs = answers(*load(), [{"video": v, "prompt": prompt} for v in videos], c, c["caption_tokens"],
                             c["use_audio"])
        write_predictions(c, [it["video"] for it in kept], [text for text, _ in outs])
        caps = {it["video"]: text for it, (text, _) in zip(kept, outs)}
        unread = sum(it["video"] not in caps for it in items)
        say_dropped("qa_from_captions", len(items), {"of unreadable videos (named above)": unread})
        items = [it for it in items if it["video"] in caps]
        if not items:
            raise SystemExit("qa_from_captions: no accuracy: none of the videos could be read")
    client = LLMClient(c["qa_model"], cache_path=c["judge_cache"], timeout=c["judge_timeout"])

    def ask(it):  # the video's own prompt, asked of its description
        question = it["prompt"].replace("based on the video", "based on the description of the video")
        messages = [{"role": "user", "content": CAPTION_QA_PROMPT.format(caption=caps[it["video"]], question=question)}]
        return client.ask(messages, parse_letter, SEED, f"item {it.get('id', video_id(it['video'], c))}")
    try:
        outs = each(ask, items, c["workers"])
    finally:
        client.close()
    failed = [str(o) for o in outs if isinstance(o, JudgeError)]
    if len(failed) == len(items):  # an LLM that answered nothing must not look like a model that got all wrong
        raise SystemExit(f"qa_from_captions: no accuracy: the LLM ({client.model}) failed on all {len(items)} items, "
                         f"e.g. {failed[0]} (every answer is cached, a rerun asks only for what failed)")
    answered = [(it, o) for it, o in zip(items, outs) if not isinstance(o, JudgeError)]
    out = qa_report(c, "qa_from_captions", [it for it, _ in answered], [o for _, o in answered])
    if failed:
        print(f"the LLM ({client.model}) failed on {len(failed)} item(s), left out of the accuracy:")
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


def read_matches(path):
    games = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise UserError(f"{path}: cannot read the matches: {e.strerror or e}") from e
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                g = json.loads(line)
                if not (isinstance(g, dict) and isinstance(g.get("a"), str) and isinstance(g.get("b"), str)
                        and g.get("winner") in ("a", "b", "tie")):
                    raise ValueError('not {"a": "model", "b": "model", "winner": "a" | "b" | "tie"}')
            except ValueError as e:
                raise UserError(f"{path}:{n}: {e}") from e
            games.append(g)
    return games


def elo_table(c):
    if not c["matches"]:
        raise UserError("--task=elo needs --matches=FILE")
    games = read_matches(c["matches"])
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
    if not c["manifest"] or not c["events_out"]:
        raise UserError("--task=events needs --manifest=FILE and --events_out=FILE")
    listed = read_manifest(c["manifest"])
    items = [it for it in listed if it["task"] == "caption" and it.get("response")][:c["limit"] or None]
    say_dropped("events", len(listed), {"not captions with a response": len(listed) - sum(
        it["task"] == "caption" and bool(it.get("response")) for it in listed)})
    client = LLMClient(c["events_model"], cache_path=c["judge_cache"], timeout=c["judge_timeout"])
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
    """(model, tokenizer) of --ckpt: its config and tokenizer.json checked before the weights are loaded."""
    if not c["ckpt"]:
        raise UserError(f"--{'task=' + c['task'] if c['task'] else 'stage=' + c['stage']} needs --ckpt=DIR")
    read_config(c["ckpt"])
    tok = load_tokenizer(c["tokenizer"] or c["ckpt"])
    return load_checkpoint(c["ckpt"], getattr(torch, c["dtype"]), c["device"]).eval(), tok


def run_task(c):
    if c["task"] in (no_model := {"elo": elo_table, "events": add_events}):
        return no_model[c["task"]](c)
    tasks = {"captions": caption_benchmark, "qa": qa_benchmark, "qa_from_captions": qa_from_captions}
    if c["task"] not in tasks:
        raise UserError(f"unknown task {c['task']!r}: captions, qa, qa_from_captions, elo or events")
    if not c["manifest"]:
        raise UserError(f"--task={c['task']} needs --manifest=FILE")
    # the model is loaded when a task first needs it: after its manifest is read, and not at all when every caption
    # comes from an earlier run or a predictions file
    return tasks[c["task"]](lru_cache(maxsize=1)(lambda: load_model(c)), c)


def main(argv):
    c = configure(globals(), argv)
    t0 = time.time()
    if c["task"]:
        merge_results(os.path.join(c["out_dir"], "results.json"), {c["task"]: run_task(c)}, {c["task"]: time.time() - t0})
        return
    model, tok = load_model(c)
    trained = train_config(c["ckpt"])  # read before the metrics, so that a bad file cannot cost them
    metrics = toy_metrics(model, tok, c)
    seconds = {c["stage"]: trained.get("seconds", 0.0) + time.time() - t0}
    meta = os.path.join(c["data_dir"], "meta.json")  # the toy generator's own time
    if c["stage"] == "base" and os.path.exists(meta):
        seconds["prepare"] = json.load(open(meta))["seconds"]
    init = os.path.normpath(str(trained.get("init_from")))
    while c["stage"] == "base" and (before := train_config(init)):  # the toy's stages before the base, by their
        name = os.path.basename(os.path.dirname(init))  # directories' names: copy, then vision
        if name in seconds:
            break
        seconds[name] = before.get("seconds", 0.0)
        init = os.path.normpath(str(before.get("init_from")))
    merge_results(c["results"], {c["stage"]: metrics}, seconds)
    print(f"{c['stage']}: {json.dumps(metrics)}")

if __name__ == "__main__":
    run(main)
