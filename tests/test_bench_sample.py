"""bench/sample.py runs, the engine and one video at a time give the same tokens, and it ends with the speedup line."""
import re

import pytest

from conftest import run_cli



@pytest.mark.parametrize("samples", [1, 2], ids=["greedy", "nucleus"])
def test_sample_bench_smoke(samples):
    out = run_cli("bench/sample.py", "--smoke", f"--samples={samples}")
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    one, engine = re.fullmatch(r"tokens: one at a time (\w+), engine (\w+), identical", lines[1]).groups()
    assert one == engine
    assert re.fullmatch(r"speedup: \d+\.\d\d", lines[-1]) and float(lines[-1].split()[1]) > 0
