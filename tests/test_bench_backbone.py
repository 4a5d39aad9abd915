"""bench/backbone.py --smoke runs, our Qwen2 agrees with transformers, and it prints its ratios."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_backbone_smoke():
    r = subprocess.run([sys.executable, os.path.join("bench", "backbone.py"), "--smoke"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    diff = re.search(r"^logits max abs diff: (\S+)$", out, re.M)
    assert diff and float(diff.group(1)) < 1e-4, out
    assert re.search(r"^greedy tokens match: True$", out, re.M), out
    lines = out.strip().splitlines()
    assert lines[-2].startswith("prefill_ratio: ") and lines[-1].startswith("decode_ratio: "), out
    for line in lines[-2:]:
        assert float(line.split(": ")[1]) > 0, line
