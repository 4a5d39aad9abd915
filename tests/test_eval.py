"""eval.py's benchmarks: sequential Elo (Table 9), option-letter extraction, Video-MME QA accuracy on a tiny checkpoint,
the released caption benchmark and QA from captions against the fake OpenAI-compatible server of test_judge."""
import json
import os
import re

import pytest

from conftest import run_cli
import eval as ev
from checkpoint import DEMO_PROMPT
from data import encode_prompt, load_tokenizer, load_video
from judge import MAX_ATTEMPTS, SEED, rates, reduce_repeated_words
from model import VideoSALMONN2
from test_av_model import naive_greedy, tiny_checkpoint  # noqa: F401 (a fixture)
from test_judge import answer_text, caption_of, server  # noqa: F401 (a fixture)
from test_media import write_video

# the notes' (section 8) Video-MME prompt of video-SALMONN 2+, after its <video>\n
VIDEOMME = ("Select the best answer to the following multiple-choice question based on the video. Respond with only the "
            "letter (A, B, C, or D) of the correct option.\n{q}\n{o}\nThe best answer is:")


def run_eval(*args, port=None):
    env = {"OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1", "OPENAI_API_KEY": "test"} if port else None
    out = run_cli("eval.py", *args, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def write_manifest(path, items):
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    return path


def greedy(ckpt, video, prompt, max_new_tokens):
    """The model's greedy answer computed without eval.py nor generate: (text, ended with <|im_end|>)."""
    m, tok = VideoSALMONN2.from_pretrained(ckpt).eval(), load_tokenizer(str(ckpt))
    media = load_video(video, image_size=m.cfg.vision.image_size, n_mels=80, segment_seconds=m.cfg.segment_seconds)
    stop = tok.token_to_id("<|im_end|>")
    ids = naive_greedy(m, (*m.encode(media.frames, media.mel), media.times, media.duration), encode_prompt(tok, prompt),
                       max_new_tokens, stop)
    return tok.decode(ids, skip_special_tokens=True).strip(), ids[-1] == stop


# -----------------------------------------------------------------------------
# Elo and letters


def test_elo_hand_computed():
    assert ev.elo([{"a": "x", "b": "y", "winner": "a"}]) == {"x": 1004.0, "y": 996.0}  # 8 * (1 - 1/2)
    assert ev.elo([{"a": "x", "b": "y", "winner": "b"}]) == {"x": 996.0, "y": 1004.0}
    assert ev.elo([{"a": "x", "b": "y", "winner": "tie"}]) == {"x": 1000.0, "y": 1000.0}
    # then y beats x: expected 1 / (1 + 10 ** (8 / 400)) = 0.488489, so y gains 8 * 0.511511 = 4.09209
    first, second = {"a": "x", "b": "y", "winner": "a"}, {"a": "y", "b": "x", "winner": "a"}
    r = ev.elo([first, second])
    assert r["x"] == pytest.approx(999.90791, abs=1e-4) and r["y"] == pytest.approx(1000.09209, abs=1e-4)
    r = ev.elo([second, first])  # order matters: the last winner ends ahead
    assert r["y"] == pytest.approx(999.90791, abs=1e-4) and r["x"] == pytest.approx(1000.09209, abs=1e-4)
    assert sum(ev.elo([first, second, {"a": "z", "b": "x", "winner": "tie"}]).values()) == pytest.approx(3000)
    assert (ev.ELO_INITIAL, ev.ELO_BASE, ev.ELO_SCALE, ev.ELO_K) == (1000, 10, 400, 8)


def test_elo_cli_prints_table_by_rating(tmp_path):
    games = [{"a": "base", "b": "ours", "winner": "b"}, {"a": "ours", "b": "gpt", "winner": "a"},
             {"a": "gpt", "b": "base", "winner": "tie"}]
    out = run_eval("--task=elo", f"--matches={write_manifest(tmp_path / 'prefs.jsonl', games)}", f"--out_dir={tmp_path}")
    names = [line.split()[0] for line in out.splitlines()[1:]]
    assert names == sorted(ev.elo(games), key=lambda n: -ev.elo(games)[n]) and names[0] == "ours"
    assert json.loads((tmp_path / "results.json").read_text())["elo"] == pytest.approx(ev.elo(games))


@pytest.mark.parametrize("game", [{"a": ["x"], "b": "y", "winner": "a"}, {"a": "x", "b": 2, "winner": "tie"}])
def test_a_match_that_is_not_two_named_models_is_named(tmp_path, game):
    path = write_manifest(tmp_path / "prefs.jsonl", [{"a": "x", "b": "y", "winner": "a"}, game])
    with pytest.raises(ev.UserError, match=re.escape(f"{path}:2: not ")):
        ev.read_matches(str(path))


@pytest.mark.parametrize("text,letter", [("B", "B"), ("B.", "B"), ("(B)", "B"), ("The answer is B", "B"),
                                         ("The best answer is: C) red", "C"), ("D. red", "D"), (" A\n", "A"),
                                         ("", None), ("none of them", None), ("Beta", None), ("b", None)])
def test_extract_letter(text, letter):
    assert ev.extract_letter(text) == letter


# -----------------------------------------------------------------------------
# multiple-choice QA


def qa_items():
    return [{"id": "q0", "video": "a.mp4", "prompt": VIDEOMME.format(q="What colour?", o="A. red\nB. grey\nC. blue\nD. green"),
             "answer": "B"},  # the toy's form: the prompt is given
            {"id": "q1", "video": "a.mp4", "question": "What is heard?", "options": ["A. a tone", "B. a dog", "C. rain",
                                                                                     "D. speech"], "answer": "A"},
            {"id": "q2", "video": "b.mp4", "question": "How many circles?", "options": ["one", "two", "three", "four"],
             "answer": "C"}]  # bare options get their letters


def test_read_qa_builds_the_videomme_prompt(tmp_path):
    items = ev.read_qa(write_manifest(tmp_path / "qa.jsonl", qa_items() + [{"video": "a.mp4", "prompt": "Describe."}]))
    assert [it["id"] for it in items] == ["q0", "q1", "q2"]  # items with no answer are not QA
    assert items[1]["prompt"] == VIDEOMME.format(q="What is heard?", o="A. a tone\nB. a dog\nC. rain\nD. speech")
    assert items[2]["prompt"] == VIDEOMME.format(q="How many circles?", o="A. one\nB. two\nC. three\nD. four")
    assert items[0]["video"] == str(tmp_path / "a.mp4")


def test_qa_accuracy_counts_letters(tmp_path, monkeypatch):
    texts = ["The answer is B.", "(C) blue", "no idea"]
    monkeypatch.setattr(ev, "answers", lambda model, tok, items, c, n, use_audio: (items, [(t, True) for t in texts]))
    c = {"manifest": str(write_manifest(tmp_path / "qa.jsonl", qa_items())), "limit": 0, "use_audio": True,
         "answer_tokens": 8, "out_dir": str(tmp_path / "out")}
    out = ev.qa_benchmark(lambda: (None, None), c)
    assert out == {"accuracy": pytest.approx(1 / 3), "items": 3, "no_letter": 1}
    rows = json.loads((tmp_path / "out" / "qa.json").read_text())
    assert [(r["letter"], r["correct"]) for r in rows] == [("B", True), ("C", False), (None, False)]


def test_the_visual_base_is_shown_its_media_as_its_training_was(tmp_path, monkeypatch):
    """The toy base trained each frame beside its second's audio tokens, its soundtrack written (config/toy_base.py):
    its visual captions are asked that way, not of frames alone; the vision stage's, of frames alone."""
    seen = []

    def answers(model, tok, items, c, n, use_audio):
        seen.append((use_audio, c["written_audio"]))
        return items, [(it["response"], True) for it in items]
    monkeypatch.setattr(ev, "answers", answers)
    start = {"text": "The video begins on a black background.", "type": "visual", "key": ["start", "black"], "start": 0}
    write_manifest(tmp_path / "base_test.jsonl", [{"id": "a", "video": "a.mp4", "task": "caption", "prompt": "Describe.",
                                                   "response": start["text"], "events": [start]}])
    for trained, shown in (({"use_audio": True, "written_audio": True}, (True, True)),
                           ({"use_audio": False, "written_audio": False}, (False, False))):
        ckpt = tmp_path / str(len(seen))
        ckpt.mkdir()
        (ckpt / "train_config.json").write_text(json.dumps(trained))
        out = ev.toy_metrics(None, None, {"stage": "base", "ckpt": str(ckpt), "data_dir": str(tmp_path), "limit": 0,
                                          "max_new_tokens": 8, "written_audio": False})
        assert seen[-1] == shown and out["accuracy"] == {"visual": 1.0}


START = {"text": "The video begins on a black background.", "type": "visual", "key": ["start", "black"], "start": 0}


def toy_config(tmp_path, stage):
    return {"stage": stage, "ckpt": str(tmp_path), "data_dir": str(tmp_path), "limit": 0, "max_new_tokens": 8,
            "written_audio": False}


def readable(kind):
    """A fake `answers` that reads only the items of task kind, each answered with its own response."""
    def answers(model, tok, items, c, n, use_audio=True):
        kept = [it for it in items if it["task"] == kind]
        return kept, [(it["response"], True) for it in kept]
    return answers


def test_toy_eval_with_no_readable_item_gives_no_rate(tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "answers", readable("caption"))
    write_manifest(tmp_path / "align_test.jsonl", [{"audio": "a.wav", "task": "asr", "prompt": "Transcribe.", "response": "zeta"}])
    with pytest.raises(SystemExit, match="align: no rate: no ASR item could be read"):
        ev.toy_metrics(None, None, toy_config(tmp_path, "align"))


def test_toy_sft_with_no_readable_question_keeps_its_caption_metrics(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ev, "answers", readable("caption"))
    write_manifest(tmp_path / "test.jsonl", [
        {"video": "a.mp4", "task": "caption", "prompt": "Describe.", "response": START["text"], "events": [START]},
        {"video": "b.mp4", "task": "qa", "prompt": "What?", "response": "x", "options": ["x", "y"], "answer": "A"}])
    out = ev.toy_metrics(None, None, toy_config(tmp_path, "sft"))
    assert out["total"] == 0.0 and out["accuracy"] == {"visual": 1.0} and "qa_acc" not in out
    assert "sft: no qa_acc: none of the 1 QA items could be read" in capsys.readouterr().out


@pytest.mark.parametrize("stage,item,error", [
    ("base", {"task": "caption"}, "base_test.jsonl:1: a toy caption item without 'events'"),
    ("base", {"task": "caption", "events": ["A tone plays."]}, "base_test.jsonl:1: events without the toy's keys"),
    ("sft", {"task": "qa", "options": ["x", "y"]}, "test.jsonl:1: a toy qa item without 'answer'")])
def test_toy_items_without_what_the_judge_reads_are_named_before_generating(tmp_path, monkeypatch, stage, item, error):
    monkeypatch.setattr(ev, "answers", lambda *args: pytest.fail("generated before the manifest was checked"))
    (tmp_path / "train_config.json").write_text("{}")
    write_manifest(tmp_path / ("base_test.jsonl" if stage == "base" else "test.jsonl"),
                   [{"video": "a.mp4", "prompt": "Describe.", "response": "x", **item}])
    with pytest.raises(ev.UserError, match=re.escape(error)):
        ev.toy_metrics(None, None, toy_config(tmp_path, stage))


def test_toy_eval_rejects_an_unknown_stage(tmp_path):
    with pytest.raises(ev.UserError, match="--stage=bsae: no such toy stage"):
        ev.toy_metrics(None, None, toy_config(tmp_path, "bsae"))


def eval_main(monkeypatch, *argv):
    """eval.py's main in this process, the settings it overrides restored after the test."""
    for arg in argv:
        key = arg[2:].partition("=")[0]
        monkeypatch.setattr(ev, key, getattr(ev, key))
    ev.main(list(argv))


def test_toy_eval_of_a_checkpoint_without_train_config(tmp_path, monkeypatch):
    """A checkpoint without train_config.json (a released one) gets its metrics written, not a FileNotFoundError."""
    monkeypatch.setattr(ev, "load_model", lambda c: (None, None))
    monkeypatch.setattr(ev, "toy_metrics", lambda model, tok, c: {"total": 0.5})
    eval_main(monkeypatch, "--stage=sft", f"--ckpt={tmp_path}", f"--data_dir={tmp_path}", f"--results={tmp_path / 'r.json'}")
    assert json.loads((tmp_path / "r.json").read_text())["sft"] == {"total": 0.5}


def first_letter(text):
    """This test's own letter rule: the first word of the answer that is one capital A-D on its own."""
    return next((w for w in re.split(r"\W+", text) if w in ("A", "B", "C", "D")), None)


def test_qa_task_end_to_end(tiny_checkpoint, tmp_path):  # noqa: F811
    write_video(tmp_path / "a.mp4", 2)
    write_video(tmp_path / "b.mp4", 2, colour=(200, 30, 30), tone=880.0)
    manifest = write_manifest(tmp_path / "qa.jsonl", qa_items())
    run_eval("--task=qa", f"--ckpt={tiny_checkpoint}", f"--manifest={manifest}", f"--out_dir={tmp_path / 'out'}",
             f"--cache_dir={tmp_path / 'cache'}", "--answer_tokens=5")
    rows = json.loads((tmp_path / "out" / "qa.json").read_text())
    prompts = [VIDEOMME.format(q="What colour?", o="A. red\nB. grey\nC. blue\nD. green"),
               VIDEOMME.format(q="What is heard?", o="A. a tone\nB. a dog\nC. rain\nD. speech"),
               VIDEOMME.format(q="How many circles?", o="A. one\nB. two\nC. three\nD. four")]
    preds = [greedy(tiny_checkpoint, str(tmp_path / v), p, 5)[0] for v, p in zip(("a.mp4", "a.mp4", "b.mp4"), prompts)]
    assert [(r["video"], r["prompt"], r["prediction"]) for r in rows] == list(zip(("a.mp4", "a.mp4", "b.mp4"), prompts, preds))
    letters = [first_letter(p) for p in preds]
    correct = [letter == answer for letter, answer in zip(letters, "BAC")]
    assert [(r["letter"], r["answer"], r["correct"]) for r in rows] == list(zip(letters, "BAC", correct))
    qa = json.loads((tmp_path / "out" / "results.json").read_text())["qa"]
    assert qa == {"accuracy": pytest.approx(sum(correct) / 3), "items": 3, "no_letter": letters.count(None)}


# -----------------------------------------------------------------------------
# the caption benchmark against the fake judge


def fake_judgment(body):
    """Counts that depend on the seed and on the item's number of events; an item with a BROKEN event never parses."""
    if "BROKEN" in body["messages"][1]["content"]:
        return "I cannot judge this."
    n, r = int(re.search(r"There are totally (\d+) base events", body["messages"][0]["content"])[1]), body["seed"] - SEED
    missed = r % (n + 1)
    return answer_text(missed, (r // 2) % (n - missed + 1), (5 * r) % 3)


def test_caption_benchmark_end_to_end(tiny_checkpoint, tmp_path, server):  # noqa: F811
    events = {"a.mp4": ["A grey screen brightens.", "A tone plays.", "Nobody speaks."],
              "b.mp4": ["A red screen is shown.", "A high tone plays."], "c.mp4": ["BROKEN event."]}
    items = []
    for i, (video, evs) in enumerate(events.items()):
        write_video(tmp_path / video, 2, tone=440.0 * (i + 1))
        items.append({"video": video, "events": evs, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the video."}, {"from": "gpt", "value": " ".join(evs)}]})
    server.answer = fake_judgment
    out = run_eval("--task=captions", f"--ckpt={tiny_checkpoint}", f"--manifest={write_manifest(tmp_path / 'test.jsonl', items)}",
                   f"--out_dir={tmp_path / 'out'}", f"--cache_dir={tmp_path / 'cache'}", "--caption_tokens=6",
                   f"--judge_cache={tmp_path / 'judge.sqlite'}", "--judge_model=test-judge", port=server.server_port)
    rows = json.loads((tmp_path / "out" / "captions.json").read_text())
    assert [r["id"] for r in rows] == [r["video"] for r in rows] == list(events)
    for r in rows:  # the model's own greedy caption; an unfinished one is de-looped before judging
        pred, ended = greedy(tiny_checkpoint, str(tmp_path / r["video"]), "Describe the video.", 6)
        assert (r["prompt"], r["prediction"], r["truncated"]) == ("Describe the video.", pred, not ended)
        asked = {caption_of(b) for b in server.requests if str(events[r["video"]]) in b["messages"][1]["content"]}
        assert asked == {reduce_repeated_words(pred) if r["truncated"] else pred}
    assert json.loads((tmp_path / "out" / "predictions.json").read_text()) == [
        {"id": [r["video"]], "pred": r["prediction"]} for r in rows]
    # each judged item: exactly the 7 seeds of the released protocol, one request each
    for video in ("a.mp4", "b.mp4"):
        seeds = sorted(b["seed"] for b in server.requests if str(events[video]) in b["messages"][1]["content"])
        assert seeds == list(range(SEED, SEED + 7)) and all(b["model"] == "test-judge" for b in server.requests)
    # the median-Total run, computed from the fake judge's rule
    runs = []
    for seed in range(SEED, SEED + 7):
        judged = [json.loads(fake_judgment({"seed": seed, "messages": [{"content": f"There are totally {len(events[v])} "
                                                                        "base events"}, {"content": ""}]})) for v in ("a.mp4", "b.mp4")]
        counts = [{"events": len(events[v]), "missed": j["Missed"], "incorrect": j["Incorrect"], "hallucinated": j["Hallucination"]}
                  for v, j in zip(("a.mp4", "b.mp4"), judged)]
        runs.append((seed, counts, rates(counts)))
    seed, counts, median = sorted(runs, key=lambda run: run[2]["total"])[3]
    for r, cnt in zip(rows, counts):
        assert {k: r[k] for k in cnt} == cnt
    assert "error" in rows[2] and "missed" not in rows[2] and "item c.mp4" in rows[2]["error"]
    row = next(line for line in out.splitlines() if line.startswith("median"))
    assert row.split() == ["median", str(seed)] + [f"{100 * median[k]:.1f}" for k in ("miss", "hall", "total")] + ["2", "of", "3"]
    seed_rows = [line.split() for line in out.splitlines() if re.match(r"\s+20\d\d ", line)]
    assert len(seed_rows) == 7 and all(r[-3:] == ["2", "of", "3"] for r in seed_rows)  # how many judged, next to each rate
    assert any("item c.mp4" in line for line in out.splitlines())
    res = json.loads((tmp_path / "out" / "results.json").read_text())["captions"]
    assert res["seed"] == seed and (res["judged"], res["items"]) == (2, 3)
    assert [res[k] for k in ("miss", "hall", "total")] == pytest.approx([median[k] for k in ("miss", "hall", "total")])


@pytest.mark.parametrize("record", [{"caption": "z"}, ["z"], {"id": "a.mp4", "prediction": 3, "truncated": False}])
def test_caption_benchmark_names_a_bad_record_of_an_earlier_run(tmp_path, record):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "captions.jsonl").write_text(json.dumps({"id": "b.mp4", "prediction": "x", "truncated": False})
                                                     + "\n" + json.dumps(record) + "\n")
    c = {"manifest": str(write_manifest(tmp_path / "test.jsonl", [{"video": "a.mp4", "prompt": "Describe.", "events": ["x"]}])),
         "limit": 0, "out_dir": str(tmp_path / "out")}
    with pytest.raises(ev.UserError, match=re.escape(f"{tmp_path / 'out' / 'captions.jsonl'}:2: not a record with 'id' (str)")):
        ev.caption_benchmark(lambda: pytest.fail("the model loaded before the earlier captions were read"), c)


# -----------------------------------------------------------------------------
# QA from captions


def test_qa_from_captions_with_fixed_letter(tmp_path, server):  # noqa: F811
    server.answer = lambda body: "The answer is (B)."
    manifest = write_manifest(tmp_path / "qa.jsonl", qa_items())  # answers B, A, C
    preds = tmp_path / "predictions.json"
    preds.write_text(json.dumps([{"id": ["a.mp4"], "pred": "A grey screen and a tone."}, {"id": ["b.mp4"], "pred": "Red."}]))
    out = run_eval("--task=qa_from_captions", f"--captions={preds}", f"--manifest={manifest}", f"--out_dir={tmp_path / 'out'}",
                   f"--judge_cache={tmp_path / 'judge.sqlite'}", "--qa_model=test-qa", port=server.server_port)
    assert "accuracy 33.3%" in out
    assert json.loads((tmp_path / "out" / "results.json").read_text())["qa_from_captions"]["accuracy"] == pytest.approx(1 / 3)
    assert [r["letter"] for r in json.loads((tmp_path / "out" / "qa_from_captions.json").read_text())] == ["B"] * 3
    assert len(server.requests) == 3 and all((b["model"], b["seed"]) == ("test-qa", SEED) for b in server.requests)
    asked = sorted(b["messages"][-1]["content"] for b in server.requests)
    for caption, question in (("A grey screen and a tone.", "What colour?"), ("A grey screen and a tone.", "What is heard?"),
                              ("Red.", "How many circles?")):
        assert any(caption in a and question in a and "based on the description of the video" in a for a in asked)


def test_qa_from_captions_scores_only_the_answered_items(tmp_path, server, monkeypatch):  # noqa: F811
    """An item the LLM never answers with a letter is left out of the accuracy, not counted wrong; with none answered
    there is no accuracy at all, never 0 %."""
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{server.server_port}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    server.answer = lambda body: "I cannot tell." if "How many circles?" in body["messages"][-1]["content"] else "B"
    preds = tmp_path / "predictions.json"
    preds.write_text(json.dumps([{"id": ["a.mp4"], "pred": "Grey."}, {"id": ["b.mp4"], "pred": "Red."}]))
    c = {"manifest": str(write_manifest(tmp_path / "qa.jsonl", qa_items())), "limit": 0, "captions": str(preds),
         "out_dir": str(tmp_path / "out"), "judge_cache": str(tmp_path / "judge.sqlite"), "judge_timeout": 5.0,
         "qa_model": "test-qa", "workers": 2}
    out = ev.qa_from_captions(None, c)
    assert out == {"accuracy": 0.5, "items": 2, "no_letter": 0, "failed": 1}  # q0 (B) right, q1 (A) wrong, q2 failed
    assert [r["id"] for r in json.loads((tmp_path / "out" / "qa_from_captions.json").read_text())] == ["q0", "q1"]
    server.answer = lambda body: "I cannot tell."
    with pytest.raises(SystemExit, match="qa_from_captions: no accuracy: the LLM \\(test-qa\\) failed on all 3 items"):
        ev.qa_from_captions(None, {**c, "judge_cache": str(tmp_path / "judge2.sqlite")})


def test_qa_from_generated_captions(tiny_checkpoint, tmp_path, server):  # noqa: F811
    """Without --captions the model captions each video once (the released demo prompt) and the LLM reads those."""
    server.answer = lambda body: "B"
    write_video(tmp_path / "a.mp4", 2)
    write_video(tmp_path / "b.mp4", 2, colour=(200, 30, 30), tone=880.0)
    run_eval("--task=qa_from_captions", f"--ckpt={tiny_checkpoint}", f"--manifest={write_manifest(tmp_path / 'qa.jsonl', qa_items())}",
             f"--out_dir={tmp_path / 'out'}", f"--cache_dir={tmp_path / 'cache'}", "--caption_tokens=5",
             f"--judge_cache={tmp_path / 'judge.sqlite'}", port=server.server_port)
    preds = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert preds == [{"id": [v], "pred": greedy(tiny_checkpoint, str(tmp_path / v), DEMO_PROMPT, 5)[0]}
                     for v in ("a.mp4", "b.mp4")]
    asked = [b["messages"][-1]["content"] for b in server.requests]
    assert len(asked) == 3 and all(b["model"] == ev.qa_model for b in server.requests)
    caps = {p["id"][0]: p["pred"] for p in preds}
    assert sorted(asked) == sorted(ev.CAPTION_QA_PROMPT.format(caption=caps[os.path.basename(it["video"])], question=it[
        "prompt"].replace("based on the video", "based on the description of the video")) for it in ev.read_qa(tmp_path / "qa.jsonl"))


# -----------------------------------------------------------------------------
# atomic events of ground-truth captions (the GPT-4o role of 3.3.1)


def test_events_task_decomposes_captions_into_a_new_manifest(tmp_path, server):  # noqa: F811
    def sentences(body):  # a fake decomposer: one event per sentence; a caption containing BAD never gets a list
        caption = body["messages"][1]["content"].split("#### Video Description\n")[1].split("\n\nList")[0]
        return "no list here" if "BAD" in caption else json.dumps([s.strip() + "." for s in caption.split(".") if s.strip()])
    server.answer = sentences
    (tmp_path / "videos").mkdir()
    manifest = write_manifest(tmp_path / "videos" / "sft.jsonl", [
        {"video": "a.mp4", "prompt": "Describe.", "response": "A dog runs. A bell rings."},
        {"video": "b.mp4", "task": "caption", "prompt": "Describe.", "response": "BAD caption."},
        {"video": "c.mp4", "task": "qa", "prompt": "What?", "response": "B", "answer": "B"},
        {"video": "d.mp4", "prompt": "Describe.", "response": "A man says hello."}])
    out = tmp_path / "events.jsonl"
    args = ("--task=events", f"--manifest={manifest}", f"--events_out={out}", f"--out_dir={tmp_path / 'out'}",
            f"--judge_cache={tmp_path / 'judge.sqlite'}", "--events_model=test-gpt4o")
    printed = run_eval(*args, port=server.server_port)
    assert "sft.jsonl:2" in printed and "2 of 3 captions decomposed" in printed  # the failed item is named
    items = ev.read_manifest(str(out))
    assert [it["events"] for it in items] == [["A dog runs.", "A bell rings."], ["A man says hello."]]
    assert [it["video"] for it in items] == [str(tmp_path / "videos" / v) for v in ("a.mp4", "d.mp4")]
    assert all(b["model"] == "test-gpt4o" for b in server.requests)
    asked = len(server.requests)
    run_eval(*args, port=server.server_port)
    assert len(server.requests) - asked == MAX_ATTEMPTS  # only the failed item is asked again
