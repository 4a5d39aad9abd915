"""make toy's own stages around the training scripts, on tiny worlds and a tiny arch: the toy world kept by seed
(prepare.py --keep), the toy encoders pretrained once per world and code (data/toyav/pretrain_encoders.py), loaded
into a scratch model whole or not at all (training.load_encoders), and the ablations' table of mean +- standard
deviation over seeds (data/toyav/ablations.py)."""
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import training
from config import UserError, configure
from data import load_tokenizer, load_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOYAV = os.path.join(ROOT, "data", "toyav")
sys.path.insert(0, TOYAV)  # pretrain_encoders imports the world's generator as `prepare`, its neighbour


def load(name):
    spec = importlib.util.spec_from_file_location(f"toyav_{name}", os.path.join(TOYAV, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pe, ab = load("pretrain_encoders"), load("ablations")

ARCH = dict(  # the toy's classes, tinier than config/toy_vision.py's; frames stay the world's 64 x 64
    llm=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
             tie_word_embeddings=True),
    vision=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=64,
                patch_size=16),
    whisper=dict(num_mel_bins=80, d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
                 max_source_positions=100),
    qformer=dict(encoder_width=16, hidden=16, heads=2, intermediate=32, window=25, frames_per_segment=100, llm_dim=32),
    pool=2, segment_seconds=2.0, time_aligned=False)


def arch_file(path, **vision):
    path.write_text(f"arch = {dict(ARCH, vision=dict(ARCH['vision'], **vision))!r}\n")
    return str(path)


def prepare(*args):
    out = subprocess.run([sys.executable, os.path.join(TOYAV, "prepare.py"), "--small", *map(str, args)], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """Two small toy worlds: the default seed's and seed 7's."""
    d = tmp_path_factory.mktemp("worlds")
    prepare("--out", d / "a")
    prepare("--out", d / "b", "--seed", 7)
    return d / "a", d / "b"


def files_of(d):
    return {os.path.relpath(os.path.join(r, f), d): os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs}


def test_prepare_keep_keeps_the_same_world_and_writes_another_seeds(worlds, tmp_path):
    a, b = worlds
    c = tmp_path / "c"
    shutil.copytree(a, c)
    stamps = {k: os.stat(p).st_mtime_ns for k, p in files_of(c).items()}
    assert "kept" in prepare("--out", c, "--keep")
    assert {k: os.stat(p).st_mtime_ns for k, p in files_of(c).items()} == stamps  # not a file written again
    assert "kept" not in prepare("--out", c, "--keep", "--seed", 7)
    assert json.loads((c / "meta.json").read_text())["seed"] == 7
    names = [n for n in files_of(b) if n.endswith((".jsonl", "tokenizer.json")) or n.startswith("audio/")]
    assert len(names) > 19
    for name in names:  # seed 7's world, as written into an empty directory
        assert (c / name).read_bytes() == (b / name).read_bytes(), name


def test_pretraining_frames_are_the_decoded_frames_and_utterances_are_the_worlds(worlds):
    """The encoders pretrain on frames drawn as the decoder returns the clips' and on utterances built as the
    world's speech. The frames: within 3 levels of 255, and within 1 for nearly every value (the decoder's rounding
    differs; the frames as drawn, before the YUV 4:2:0 round trip, are up to 170 levels off at colour edges)."""
    a, _ = worlds
    states = {pe.world.describe_state(bg, d, s): (bg, d, s) for bg in pe.world.BACKGROUNDS
              for d in [None, *map(str, range(10))]
              for s in [None, *[(c, k, p) for c in pe.world.COLOURS for k in pe.world.SHAPES for p in range(3)]]}
    images = [json.loads(x) for split in ("train", "val") for x in (a / f"image_{split}.jsonl").read_text().splitlines()]
    for it in images:
        decoded = load_video(a / it["video"], image_size=pe.world.SIZE).frames[0]  # (3, S, S) in [-1, 1]
        drawn = torch.from_numpy(pe.rgb_as_decoded(pe.world.draw_state(*states[it["response"]]))).permute(2, 0, 1)
        levels = ((decoded + 1) * 127.5 - drawn.float()).abs()  # (3, S, S)
        assert levels.max() <= 3.01 and (levels > 1.01).float().mean() < 0.05, it["id"]
    bank = pe.SoundBank()
    for words in (["bako"], ["zeta", "mizu", "fimo"]):
        rng = np.random.default_rng(3)
        pitch = bank.pitches[np.random.default_rng(3).integers(pe.PITCHES)]  # the draw utterance makes first
        assert np.allclose(bank.utterance(words, rng), pe.world.speech(words, pitch), atol=1e-12)


@pytest.fixture(scope="module")
def pretrain(tmp_path_factory):
    """run(data_dir, out, *flags): pretrain_encoders.py's main in this process, the tiny arch, a tiny corpus and
    batches, a few steps."""
    d = tmp_path_factory.mktemp("enc")
    config = arch_file(d / "arch.py")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in dict(AUDIO_SEGMENTS=16, EVAL_ITEMS=8, VISION_BATCH=16, AUDIO_BATCH=4).items():
            mp.setattr(pe, name, value)

        def run(data, out, *flags):
            mp.setattr(sys, "argv", ["pretrain_encoders.py", f"--data={data}", f"--config={config}", f"--out={out}",
                                     "--steps_scale=0.004", *flags])
            pe.main()
        yield run


def hash_of(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()["hash"]


def test_encoders_pretrained_once_per_world(worlds, pretrain, tmp_path, capsys, monkeypatch):
    a, b = worlds
    out, res = tmp_path / "encoders.safetensors", tmp_path / "results.json"
    pretrain(a, out, f"--results={res}")
    assert "encoders: " in capsys.readouterr().out
    first, digest = load_file(str(out)), hash_of(out)
    assert first and all(k.startswith(("tower.", "speech_encoder.")) for k in first)
    r = json.loads(res.read_text())
    assert {"retrieval_top1", "transcripts_exact", "seconds"} <= set(r["encoders"]) and r["seconds"]["encoders"] > 0

    with monkeypatch.context() as mp:  # the same world, code and arch: kept, nothing trains
        mp.setattr(pe, "pretrain_vision", lambda *a: pytest.fail("retrained the vision tower"))
        mp.setattr(pe, "pretrain_audio", lambda *a: pytest.fail("retrained the Whisper encoder"))
        before = out.read_bytes()
        pretrain(a, out, f"--results={res}")
        assert "kept" in capsys.readouterr().out and out.read_bytes() == before
        assert json.loads(res.read_text())["encoders"] == r["encoders"]  # the kept file's metrics

    save_file({"x": torch.zeros(1)}, str(out))  # not this script's file (no metadata): trained over, as another world's
    pretrain(b, out)  # another world: another hash, trained again
    printed = capsys.readouterr().out
    assert "kept" not in printed and "encoders: " in printed and hash_of(out) != digest
    second = load_file(str(out))
    assert second.keys() == first.keys() and not all(torch.equal(first[k], second[k]) for k in first)
    pretrain(b, out)
    assert "kept" in capsys.readouterr().out  # and kept for that world
    out.write_bytes(out.read_bytes()[:-100])  # cut short (a run killed while saving): trained again, not a traceback
    pretrain(b, out)
    printed = capsys.readouterr().out
    assert "cannot be read" in printed and "encoders: " in printed and load_file(str(out)).keys() == first.keys()


def test_content_hash_follows_the_world_the_arch_and_the_steps(worlds):
    a, b = worlds
    other = dict(ARCH, vision=dict(ARCH["vision"], hidden_size=32))
    h = pe.content_hash(str(a), ARCH, 1.0)
    assert h == pe.content_hash(str(a), ARCH, 1.0) and h[1] == 1337
    assert len({h[0], pe.content_hash(str(b), ARCH, 1.0)[0], pe.content_hash(str(a), other, 1.0)[0],
                pe.content_hash(str(a), ARCH, 0.5)[0]}) == 4


def scratch_config(world, tmp_path, encoders, arch=None):
    import train_sft
    return configure(dict(vars(train_sft)), [os.path.join(ROOT, "config", "toy_vision.py"), arch or arch_file(tmp_path / "arch.py"),
                                             f"--tokenizer={world / 'tokenizer.json'}", f"--encoders={encoders}",
                                             "--device=cpu", "--dtype=float32"])


@pytest.fixture(scope="module")
def encoders_file(worlds, pretrain, tmp_path_factory):
    path = tmp_path_factory.mktemp("file") / "encoders.safetensors"
    pretrain(worlds[0], path)
    return path


def test_load_encoders_puts_exactly_the_files_tensors_into_a_scratch_model(worlds, encoders_file, tmp_path):
    torch.manual_seed(0)
    plain, _ = training.build_model(scratch_config(worlds[0], tmp_path, ""), torch.device("cpu"))
    torch.manual_seed(0)
    loaded, _ = training.build_model(scratch_config(worlds[0], tmp_path, encoders_file), torch.device("cpu"))
    want, got, fresh = load_file(str(encoders_file)), loaded.state_dict(), plain.state_dict()
    assert {k for k in got if k.startswith(("tower.", "speech_encoder."))} == want.keys()
    for k in got:
        assert torch.equal(got[k], want[k] if k in want else fresh[k]), k
    assert not all(torch.equal(fresh[k], want[k]) for k in want)  # the file is not a scratch model's encoders
    assert not any(p.requires_grad for p in loaded.encoder_parameters())


def test_wrong_missing_or_unreadable_encoders_are_one_line_naming_the_file(worlds, encoders_file, tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    cases = [(encoders_file, arch_file(tmp_path / "wide.py", hidden_size=32, intermediate_size=64), "not the encoders of this arch"),
             (tmp_path / "nowhere.safetensors", None, "no such encoders file"),
             (garbage, None, "not a readable safetensors file")]
    for path, arch, what in cases:
        with pytest.raises(UserError) as e:
            training.build_model(scratch_config(worlds[0], tmp_path, path, arch), torch.device("cpu"))
        assert str(e.value).startswith(f"{path}: {what}") and "\n" not in str(e.value)


# -----------------------------------------------------------------------------
# ablations


def rounds(totals, miss, hall, pairs):
    return [{"round": t + 1, "total": x, "miss": m, "hall": h, "pairs": p} for t, (x, m, h, p) in enumerate(zip(totals, miss, hall, pairs))]


# per variant, per seed: the rounds' test rates, made up; "dpo"'s first seed ran a third round (the table stops at
# the fewest rounds every run has)
RUNS = {
    "gdpo_proxy": [rounds([0.30, 0.20], [0.20, 0.10], [0.10, 0.10], [40, 30]),
                   rounds([0.36, 0.22], [0.20, 0.12], [0.16, 0.10], [41, 30]),
                   rounds([0.33, 0.27], [0.20, 0.14], [0.13, 0.13], [45, 31])],
    "dpo": [rounds([0.50, 0.40, 0.10], [0.30, 0.30, 0.0], [0.20, 0.10, 0.10], [10, 10, 10]),
            rounds([0.50, 0.44], [0.30, 0.34], [0.20, 0.10], [12, 11]),
            rounds([0.50, 0.48], [0.30, 0.32], [0.20, 0.16], [14, 13])],
    "direct": [rounds([0.60, 0.70], [0.30, 0.35], [0.30, 0.35], [20, 21]),
               rounds([0.62, 0.70], [0.30, 0.35], [0.32, 0.35], [20, 21]),
               rounds([0.64, 0.70], [0.30, 0.35], [0.34, 0.35], [20, 21])],
}
# by hand, in %: mean, and the sample standard deviation sqrt(sum of squared deviations / (n - 1)), over the seeds
EXPECTED = {  # round 1, round 2, last round's Miss, Hall; mean pairs kept per round
    "gdpo_proxy": [(33.0, 3.0), (23.0, math.sqrt((9 + 1 + 16) / 2)), (12.0, 2.0), (11.0, math.sqrt((1 + 1 + 4) / 2)), (42, 30)],
    "dpo": [(50.0, 0.0), (44.0, 4.0), (32.0, 2.0), (12.0, math.sqrt((4 + 4 + 16) / 2)), (12, 11)],
    "direct": [(62.0, 2.0), (70.0, 0.0), (35.0, 0.0), (35.0, 0.0), (20, 21)],
}
PM = re.compile(r"^(-?\d+(?:\.\d+)?) (?:\+-|±) (\d+(?:\.\d+)?)$")


def mean_pm_std(cell):
    m = PM.match(cell.strip())
    assert m, cell
    return float(m[1]), float(m[2])


def check_table(text, sft_total):
    lines = [line for line in text.strip().splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert [c for c in header if c.startswith("round ")] == ["round 1", "round 2"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [r[0] for r in rows] == [ab.VARIANTS[n][1] for n in RUNS]
    for name, row in zip(RUNS, rows):
        (r1, r2, miss, hall, pairs) = EXPECTED[name]
        assert float(row[1]) == pytest.approx(100 * sft_total, abs=0.05)
        for cell, want in ((row[2], r1), (row[3], r2)):
            assert mean_pm_std(cell) == pytest.approx(want, abs=0.05 + 1e-9), (name, cell)
        got_miss, got_hall = row[4].split("/")
        assert mean_pm_std(got_miss) == pytest.approx(miss, abs=0.05 + 1e-9) and mean_pm_std(got_hall) == pytest.approx(hall, abs=0.05 + 1e-9)
        assert [int(x) for x in row[5].split("/")] == list(pairs)


def test_ablations_table_is_mean_and_standard_deviation_over_seeds():
    check_table(ab.table(RUNS, {"total": 0.8, "miss": 0.5, "hall": 0.3}), 0.8)


def test_ablation_variants_are_the_papers():
    """gDPO + proxy is make toy's config as it is; plain DPO has lambda = 0; Direct keeps one LoRA (no proxy)."""
    import train_mrdpo
    base = configure(dict(vars(train_mrdpo)), [os.path.join(ROOT, ab.CONFIG)])
    assert base["ce_weight"] > 0 and base["proxy"] is True
    changed = {}
    for name, (flags, _) in ab.VARIANTS.items():
        c = configure(dict(vars(train_mrdpo)), [os.path.join(ROOT, ab.CONFIG), *flags])
        changed[name] = {k: v for k, v in c.items() if base[k] != v}
    assert changed == {"gdpo_proxy": {}, "dpo": {"ce_weight": 0.0}, "direct": {"proxy": False}}


def test_ablations_run_only_what_is_missing_then_write_the_table(tmp_path, monkeypatch, capsys):
    """make ablations again after a cut: finished runs (every round's done.json and the final model) are read, not
    run; the seed-2024 method run is make toy's own; the table is printed and saved with the runs."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ab, "ROOT", str(tmp_path))

    def finish(d, recs):
        for rec in recs:
            os.makedirs(os.path.join(d, f"round{rec['round']}"), exist_ok=True)
            with open(os.path.join(d, f"round{rec['round']}", "done.json"), "w") as f:
                json.dump(rec, f)
        os.makedirs(os.path.join(d, "final"), exist_ok=True)
        open(os.path.join(d, "final", "train_config.json"), "w").write("{}")

    missing = ("direct", ab.SEEDS[2])
    for name, runs in RUNS.items():
        for seed, recs in zip(ab.SEEDS, runs):
            d = os.path.join("out", "toy", "mrdpo") if (name, seed) == ("gdpo_proxy", 2024) else \
                os.path.join("out", "toy", "ablations", f"{name}_s{seed}")
            if (name, seed) == missing:
                finish(d, recs[:1])  # cut short in round 2: its final model is not there
                os.remove(os.path.join(d, "final", "train_config.json"))
            else:
                finish(d, recs)
    json.dump({"sft": {"total": 0.8, "miss": 0.5, "hall": 0.3, "qa_acc": 0.7}}, open("out/toy/results.json", "w"))
    calls = []

    def fake_run(cmd, check):
        calls.append(cmd)
        out_dir = next(a.split("=", 1)[1] for a in cmd if a.startswith("--out_dir="))
        finish(out_dir, RUNS["direct"][2])
    monkeypatch.setattr(ab.subprocess, "run", fake_run)
    ab.main()
    assert len(calls) == 1
    cmd = calls[0]
    assert cmd[1:3] == ["train_mrdpo.py", ab.CONFIG] and f"--seed={missing[1]}" in cmd
    assert f"--out_dir={os.path.join('out', 'toy', 'ablations', f'direct_s{missing[1]}')}" in cmd
    assert set(ab.VARIANTS["direct"][0]) <= set(cmd)
    printed = capsys.readouterr().out
    saved = (tmp_path / "out" / "toy" / "ablations.md").read_text()
    assert saved.strip() in printed
    check_table(saved, 0.8)
    data = json.loads((tmp_path / "out" / "toy" / "ablations.json").read_text())
    assert data["sft"] == {"total": 0.8, "miss": 0.5, "hall": 0.3}
    assert data["runs"] == {n: {str(s): r for s, r in zip(ab.SEEDS, rs)} for n, rs in RUNS.items()}
