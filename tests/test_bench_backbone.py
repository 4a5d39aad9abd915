"""bench/backbone.py --smoke runs, our Qwen2 agrees with transformers, and its table is consistent: each tokens/s is
the tokens it names over the seconds it prints, each ratio the quotient of the two tokens/s, and the closing ratio
lines repeat the table's ratios."""
import re

from conftest import printed_quotient, run_cli



def test_bench_backbone_smoke():
    r = run_cli("bench/backbone.py", "--smoke")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    diff = re.search(r"^logits max abs diff: (\S+)$", out, re.M)
    assert diff and float(diff.group(1)) < 1e-4, out
    assert re.search(r"^greedy tokens match: True$", out, re.M), out
    batch, prompt, new = map(int, re.search(r"prompt (\d+)x(\d+), new_tokens (\d+),", out).groups())
    assert (batch, prompt, new) == (1, 32, 8)  # the smoke sizes
    table = {m[0]: m[1:] for m in re.findall(r"^(prefill|decode)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)$", out, re.M)}
    assert set(table) == {"prefill", "decode"}, out
    tokens = {"prefill": batch * prompt, "decode": new}  # decode: new tokens over a whole generate, prefill included
    for name, (ours, theirs, ratio, s_ours, s_theirs) in table.items():
        assert printed_quotient(ours, tokens[name], s_ours) and printed_quotient(theirs, tokens[name], s_theirs), name
        assert printed_quotient(ratio, ours, theirs), name
    lines = out.strip().splitlines()
    assert lines[-2:] == [f"prefill_ratio: {table['prefill'][2]}", f"decode_ratio: {table['decode'][2]}"], out
