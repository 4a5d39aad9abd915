"""Issue 12: the faults found by fault injection, each fixed, and every entry point's user mistakes said in one line
naming the file or item, exit status 2, no traceback (driven as commands, conftest.run_cli; most fail before a model
loads).
MrDPO's faults are tested in test_mrdpo.py (they need its toy world), the audio fit and the cache key in test_media.py
and test_feature_cache.py, a reply that is no chat completion in test_judge.py."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import eval as ev
import training
from checkpoint import DEMO_PROMPT, CheckpointError
from config import UserError, configure
from conftest import run_cli, write_crafted_state
from data import read_manifest
from model import VideoSALMONN2
from test_av_model import ROOT, outputs, tiny_checkpoint, tiny_model  # noqa: F401 (a fixture)
from test_eval import greedy
from test_judge import answer_text, server  # noqa: F401 (a fixture)
from test_media import write_video
from test_train import world, write_config  # noqa: F401 (a fixture)


def latin1_manifest(path):
    path.write_bytes(b'{"video": "a.mp4", "prompt": "Describe.", "response": "ok"}\n'
                     b'{"video": "b.mp4", "prompt": "D\xe9cris la vid\xe9o.", "response": "ok"}\n')
    return path


@pytest.fixture(scope="module")
def mistakes(tiny_checkpoint, world, tmp_path_factory):  # noqa: F811
    """(command line, names its one-line error must hold) of each mistake, and a file that would mark code run."""
    d = tmp_path_factory.mktemp("mistakes")
    video, missing, marker = write_video(d / "v.mp4", 2), d / "nowhere", d / "ran"
    (d / "clip.mp4").write_text(f"import os\nos.mkdir({str(marker)!r})\n")  # valid Python: run, it would leave a mark
    no_tok, half = d / "no_tokenizer", d / "half"
    for ckpt in (no_tok, half):
        ckpt.mkdir()
        shutil.copy(tiny_checkpoint / "config.json", ckpt)
    (no_tok / "model.safetensors").write_bytes(b"not weights")  # loading the model first would fail on this instead
    shutil.copy(tiny_checkpoint / "tokenizer.json", half)
    weights = (tiny_checkpoint / "model.safetensors").read_bytes()
    (half / "model.safetensors").write_bytes(weights[:len(weights) // 2])  # a download that stopped half way
    cut_tc = d / "cut_train_config"
    shutil.copytree(half, cut_tc)  # its half weights would be named if the model loaded before its train_config.json
    (cut_tc / "train_config.json").write_text('{"caption_prompt": "Desc')
    latin1 = latin1_manifest(d / "latin1.jsonl")
    qa = d / "qa.jsonl"
    qa.write_text(json.dumps({"video": "v.mp4", "question": "What?", "options": ["a", "b", "c", "d"], "answer": "A"}) + "\n")
    (d / "empty.jsonl").write_text("")
    captions = d / "captions.jsonl"
    captions.write_text(json.dumps({"video": "v.mp4", "prompt": "Describe.", "response": "x"}) + "\n")

    # a training checkpoint to resume from (LoRA r 4), whose rank0.pt runs code when unpickled
    lora = dict(lora_r=4, lora_alpha=8, trainable=("lora_", "audio."))
    cfg = write_config(d / "lora.py", world, d / "run", **lora)
    c = configure(dict(vars(training)), [cfg])
    torch.manual_seed(c["seed"])
    model, _ = training.build_model(c, torch.device("cpu"))
    (d / "run" / "ckpt").mkdir(parents=True)
    save_file(training.trainable_state(model), str(d / "run" / "ckpt" / "trainable.safetensors"))
    (d / "run" / "ckpt" / "meta.json").write_text(json.dumps({"step": 1, "cursor": 2, "config": c, "world": 1}))
    write_crafted_state(d / "run" / "ckpt" / "rank0.pt", marker)
    empty = write_config(d / "empty.py", world, d / "empty_run", train_data=str(d / "empty.jsonl"))
    cases = [
        (["caption.py", d / "clip.mp4"], ["clip.mp4: not a setting"]),  # a positional argument is never run as Python
        (["caption.py", "--ckpt", missing, "--video", video], [f"{missing}: no such checkpoint directory"]),
        (["caption.py", f"--ckpt={no_tok}", f"--video={video}"], [no_tok / "tokenizer.json"]),  # before the model
        (["caption.py", f"--ckpt={half}", f"--video={video}"], [half / "model.safetensors", "incomplete download"]),
        (["caption.py", f"--ckpt={cut_tc}", f"--video={video}"], [cut_tc / "train_config.json"]),
        (["eval.py", "--task=captions", f"--ckpt={tiny_checkpoint}", f"--manifest={latin1}"], [f"{latin1}:2: not UTF-8"]),
        (["eval.py", "--task=qa", f"--ckpt={missing}", f"--manifest={qa}"], [f"{missing}: no such checkpoint directory"]),
        (["eval.py", "--task=elo", f"--matches={missing}"], [f"{missing}: cannot read the matches"]),
        (["eval.py", "--stage=sft", f"--ckpt={missing}"], [f"{missing}: no such checkpoint directory"]),
        (["train_sft.py", "config/nowhere.py"], ["config/nowhere.py: no such config file"]),
        (["train_sft.py", empty], [f"{d / 'empty.jsonl'}: no item"]),
        (["train_sft.py", cfg, "--resume"], [d / "run" / "ckpt" / "rank0.pt", "refused"]),  # and nothing ran
        (["train_sft.py", cfg, "--resume", "--lora_r", "8", "--lora_alpha", "16"], [d / "run" / "ckpt", "LoRA rank"]),
        (["train_align.py", f"--train_data={latin1}"], [f"{latin1}:2: not UTF-8"]),
        (["train_mrdpo.py", f"--init_from={missing}", f"--train_data={captions}", f"--out_dir={d / 'mrdpo'}"],
         [f"{missing}: no such checkpoint directory"]),
        (["export.py", f"--ckpt={missing}", f"--out={d / 'export'}"], [f"{missing}: no such checkpoint directory"]),
    ]
    return cases, marker


def test_every_entry_point_says_a_mistake_in_one_line(mistakes):
    cases, marker = mistakes
    for args, names in cases:
        out = run_cli(*args)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, out.stderr[-2000:])
        assert all(str(n) in lines[0] for n in names), (args, lines[0])
    assert not marker.exists()  # neither the video given as a config nor the crafted checkpoint ran


def test_help_lists_the_settings_with_defaults_and_comments():
    align = subprocess.run([sys.executable, "train_align.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    evaluate = run_cli("eval.py", "--help")  # the first as a process of its own: the scripts start as commands too
    assert align.returncode == evaluate.returncode == 0
    # train_align.py's own settings and those it takes from training.py, each with the comment after it
    assert "  --train_data='data/toyav/align_train.jsonl'  # audio-only items" in align.stdout.splitlines()
    assert "  --lr=2e-05  # peak learning rate" in align.stdout.splitlines()
    assert align.stdout.startswith("Audio modality alignment")
    assert "  --judge_timeout=120.0  # seconds one LLM request may take before it is abandoned and retried" in \
        evaluate.stdout.splitlines()


def test_caption_without_prompt_uses_the_prompt_the_checkpoint_was_trained_with(tiny_checkpoint, tmp_path):  # noqa: F811
    ckpt, trained = tmp_path / "ckpt", "Describe the video in detail."
    shutil.copytree(tiny_checkpoint, ckpt)
    (ckpt / "train_config.json").write_text(json.dumps({"caption_prompt": trained}))  # as training.save_final writes it
    video = write_video(tmp_path / "v.mp4", 2)
    out = run_cli("caption.py", f"--ckpt={ckpt}", f"--video={video}", "--greedy", "--max_new_tokens=8")
    assert out.returncode == 0, out.stderr[-2000:]
    want, demo = (greedy(ckpt, video, prompt, 8)[0] for prompt in (trained, DEMO_PROMPT))
    assert want != demo  # this model answers the two prompts differently, so the output tells which one was used
    assert out.stdout.strip() == want


def test_caption_benchmark_keeps_each_caption_continues_and_never_reports_no_judgment_as_a_rate(
        tiny_checkpoint, tmp_path, server):  # noqa: F811
    """Items without events and unreadable videos are dropped and counted; each caption goes to captions.jsonl as it
    is made and a rerun continues from it (a cut-off last line dropped); how many items each judge run judged stands
    next to its rates; judge_timeout is a setting; a judge failing on every item ends the run with one line, exit 1."""
    for i, name in enumerate("ab"):
        write_video(tmp_path / f"{name}.mp4", 2, tone=440.0 * (i + 1))
    (tmp_path / "bad.mp4").write_bytes(b"\x00garbage" * 100)
    manifest = tmp_path / "test.jsonl"
    manifest.write_text("".join(json.dumps(it) + "\n" for it in [
        {"video": "a.mp4", "prompt": "Describe.", "events": ["A tone plays."]},
        {"video": "bad.mp4", "prompt": "Describe.", "events": ["Anything."]},
        {"video": "b.mp4", "prompt": "Describe.", "events": ["A high tone plays."]},
        {"video": "c.mp4", "prompt": "Describe."}]))  # no events: not a benchmark item
    out_dir, env = tmp_path / "out", {"OPENAI_BASE_URL": f"http://127.0.0.1:{server.server_port}/v1", "OPENAI_API_KEY": "t"}
    args = ["eval.py", "--task=captions", f"--ckpt={tiny_checkpoint}", f"--manifest={manifest}", f"--out_dir={out_dir}",
            f"--cache_dir={tmp_path / 'cache'}", "--caption_tokens=4", "--batch=1", "--judge_model=test-judge"]
    # b's first request outlasts the 0.5 s time-out and is asked again; every other one of b's is rejected
    server.answer = lambda body: answer_text(0, 0, 0)
    server.faulty = lambda body: "A high tone plays." in body["messages"][1]["content"]
    server.faults = [("sleep", 1.5)] + [("status", 400, {})] * 7
    first = run_cli(*args, f"--judge_cache={tmp_path / 'j1.sqlite'}", "--judge_timeout=0.5", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "captions: 4 items; dropped: 1 without events, 1 unreadable (named above)" in first.stdout
    assert "bad.mp4" in first.stdout and len(server.requests) == 7 + 1 + 7
    rows = [line.split() for line in first.stdout.splitlines() if re.match(r"(\s+|median )20\d\d ", line)]
    assert len(rows) == 8 and all(r[-3:] == ["1", "of", "2"] for r in rows)
    made = [json.loads(x) for x in (out_dir / "captions.jsonl").read_text().splitlines()]
    assert [r["video"] for r in made] == ["a.mp4", "b.mp4"]

    # a rerun continues from the file (its captions are not made again) and the judge now fails on everything
    made[0]["prediction"] = "KEPT CAPTION"
    (out_dir / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in made) + '{"id": "c.mp')
    server.faults, server.faulty = [("status", 400, {})] * 100, lambda body: True
    second = run_cli(*args, f"--judge_cache={tmp_path / 'j2.sqlite'}", env=env)
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 1 and len(lines) == 1 and "no rate: the judge failed on all 2 items" in lines[0]
    assert "cut-off last line" in second.stdout and "2 captions from" in second.stdout
    preds = json.loads((out_dir / "predictions.json").read_text())
    assert [p["pred"] for p in preds][0] == "KEPT CAPTION"


def test_the_authors_position_ids_buffer_is_ignored_on_load(tmp_path):
    """save_pretrained of the authors' model writes the Q-Former's position_ids buffer: not a parameter, ignored by
    name; any other key the model does not have still fails the load."""
    m = tiny_model()
    m.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["speech_Qformer.bert.embeddings.position_ids"] = torch.arange(512)[None]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded = VideoSALMONN2.from_pretrained(tmp_path).eval()
    for a, b in zip(outputs(m), outputs(loaded)):
        assert torch.equal(a, b)
    state["speech_Qformer.bert.embeddings.word_embeddings.weight"] = torch.zeros(3, 4)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"1 unexpected keys \['audio.speech_Qformer.bert.embeddings.word_emb"):
        VideoSALMONN2.from_pretrained(tmp_path)


def test_manifest_fields_of_the_wrong_type_are_skipped_naming_file_line_and_field(tmp_path, caplog):
    toy_event = {"text": "A tone plays.", "key": ["tone", "low"], "type": "sound"}
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(it) + "\n" for it in [
        {"video": "a.mp4", "prompt": "Describe.", "events": "A red circle"},  # would be 12 one-letter events
        {"video": 5, "prompt": "Describe."},
        {"video": "b.mp4", "prompt": "Describe.", "response": ["A", "B"]},
        {"video": "c.mp4", "prompt": "Describe.", "events": [["nested"]]},
        {"video": "d.mp4", "prompt": "Describe.", "events": ["A red circle appears.", toy_event]}]))
    items = read_manifest(str(tmp_path / "m.jsonl"))
    assert [os.path.basename(it["video"]) for it in items] == ["d.mp4"]
    said = [r.getMessage() for r in caplog.records]
    for n, field in [(1, "'events'"), (2, "'video'"), (3, "'response'"), (4, "'events'")]:
        assert any(f"m.jsonl:{n}: skipped: field {field}" in s for s in said), (n, said)

    # a QA manifest's bad lines are named and skipped too; one with no multiple-choice item at all says so
    (tmp_path / "qa.jsonl").write_text("\n".join([
        json.dumps({"video": "a.mp4", "question": "What?", "options": ["x", "y", "z", "w"], "answer": "B"}),
        '{"video": "b.mp4", "question": ',
        json.dumps({"video": "c.mp4", "question": "What?", "options": "ABCD", "answer": "A"})]))
    caplog.clear()
    assert [os.path.basename(it["video"]) for it in ev.read_qa(str(tmp_path / "qa.jsonl"))] == ["a.mp4"]
    said = [r.getMessage() for r in caplog.records]
    assert any("qa.jsonl:2: skipped" in s for s in said) and any("qa.jsonl:3: skipped: field 'options'" in s for s in said)
    with pytest.raises(UserError, match="m.jsonl: no multiple-choice item"):
        ev.read_qa(str(tmp_path / "m.jsonl"))
    with pytest.raises(UserError, match="latin1.jsonl:2: not UTF-8"):
        read_manifest(str(latin1_manifest(tmp_path / "latin1.jsonl")))
