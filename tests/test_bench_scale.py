"""bench/scale.py --smoke runs on the CPU, prints every row of its table with positive numbers, its gDPO and 5-pass
schemes compute the same loss, and it ends with the machine-readable SFT MFU line."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ("SFT ckpt on", "SFT ckpt off", "gDPO vs SFT", "gDPO vs 5-pass", "sampling n=2", "SigLIP", "Whisper", "cache saving")


def test_scale_smoke():
    out = subprocess.run([sys.executable, "bench/scale.py", "--smoke", "--device=cpu"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("cpu, ") and "2 layers" in lines[0]
    gdpo, five = map(float, re.fullmatch(r"loss: gDPO (\S+), 5-pass (\S+)", lines[1]).groups())
    assert abs(gdpo - five) < 1e-4
    assert lines[2].split()[:3] == ["measurement", "seconds", "rate"]
    rows = {name: line[len(name):].split() for line in lines[3:-1] for name in ROWS if line.startswith(name + " ")}
    assert set(rows) == set(ROWS), lines
    for name, (secs, rate, unit, ratio, peak, *_) in rows.items():
        assert all(float(x) > 0 for x in (secs, rate, ratio) if x != "-"), (name, rows[name])
        assert secs != "-" and peak == "-", (name, rows[name])  # no peak memory on the CPU
    assert rows["gDPO vs SFT"][3] != "-" and rows["gDPO vs 5-pass"][3] != "-"  # the two ratios
    assert rows["SFT ckpt on"][3] == "-" and rows["sampling n=2"][3] == "-"  # no peak FLOP/s or bandwidth on the CPU
    assert lines[-1] == "sft_mfu: -"


def test_scale_smoke_plus():
    """The 2+ path (--model=vs2plus_7b): every row but the 5-pass comparison, which 2+ has no released scheme for."""
    out = subprocess.run([sys.executable, "bench/scale.py", "--smoke", "--device=cpu", "--model=vs2plus_7b"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("cpu, ") and "vs2plus_7b" in lines[0] and "ViT" in lines[0]
    assert re.fullmatch(r"loss: gDPO \S+, 5-pass -", lines[1])
    names = [n if n != "SigLIP" else "ViT" for n in ROWS]
    rows = {name: line[len(name):].split() for line in lines[3:-1] for name in names if line.startswith(name + " ")}
    assert set(rows) == set(names), lines
    assert rows["gDPO vs 5-pass"][:4] == ["-", "-", "-", "-"]
    for name in set(names) - {"gDPO vs 5-pass"}:
        assert float(rows[name][0]) > 0 and (rows[name][1] == "-" or float(rows[name][1]) > 0), (name, rows[name])
    assert lines[-1] == "sft_mfu: -"
