"""bench/gdpo_step.py runs, its two schemes compute the same loss, and it ends with the speedup line."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gdpo_step_smoke():
    out = subprocess.run([sys.executable, "bench/gdpo_step.py", "--smoke"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    ours, five = map(float, re.fullmatch(r"loss: ours (\S+), 5-pass (\S+)", lines[1]).groups())
    assert abs(ours - five) < 1e-4
    assert re.fullmatch(r"speedup: \d+\.\d\d", lines[-1]) and float(lines[-1].split()[1]) > 0
