"""bench/gdpo_step.py --smoke, run in this process: it runs the shapes it advertises (the prefix counted here by
hand), each of its timed steps makes the passes it claims (the shared prefix: no encoder pass and 2 LLM passes, the
prefix and the three captions over its KV cache; the released scheme: 5 encoder and 5 LLM passes, counted by hooks),
the two schemes compute the same loss, and the speedup it prints is the quotient of the times it prints."""
import collections
import importlib.util
import os
import re

import torch

from conftest import printed_quotient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS_PER_FRAME = 12 * 12 + 12  # the bench's 24 x 24 patch grid, 2x2-pooled, a newline after each row
AUDIO, PROMPT = 60, 5 + 4  # one 30 s segment (videos up to 30 frames at 1 fps), spread evenly over the frames


def load_bench():
    spec = importlib.util.spec_from_file_location("gdpo_step", os.path.join(ROOT, "bench", "gdpo_step.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_gdpo_step_smoke(capsys, monkeypatch):
    bench, passes, per_call = load_bench(), collections.Counter(), collections.defaultdict(list)
    build = bench.build

    def hooked_build(c):
        model = build(c)
        for name, m in (("encoder", model.tower), ("encoder", model.speech_encoder), ("llm", model.llm.layers[0])):
            m.register_forward_pre_hook(lambda *_, name=name: passes.update([name]))
        return model

    def counted(fn, scheme):
        def run(*args, **kw):
            before = passes.copy()
            out = fn(*args, **kw)
            per_call[scheme].append(dict(passes - before))
            return out
        return run
    monkeypatch.setattr(bench, "build", hooked_build)
    monkeypatch.setattr(bench, "pair_step", counted(bench.pair_step, "ours"))
    monkeypatch.setattr(bench, "five_pass_loss", counted(bench.five_pass_loss, "5-pass"))
    bench.main(["--smoke"])
    lines = capsys.readouterr().out.strip().splitlines()
    prefix, caption = map(int, re.search(r"prefix (\d+) tokens, captions 3 x (\d+) tokens", lines[0]).groups())
    assert (prefix, caption) == (6 * TOKENS_PER_FRAME + AUDIO + PROMPT, 40)  # 1005 / 40: about 25, as 20,000 / 800
    assert per_call == {"ours": [{"llm": 2}] * 3, "5-pass": [{"encoder": 10, "llm": 5}] * 3}  # warm-up and 2 timed
    ours, five = map(float, re.fullmatch(r"loss: ours (\S+), 5-pass (\S+)", lines[1]).groups())
    assert abs(ours - five) < 1e-4
    t_ours, t_five = (re.fullmatch(rf"{re.escape(name)}\s+(\S+)", line).group(1) for name, line in
                      zip(("shared prefix (ours)", "5-pass (released)"), lines[3:5]))
    speedup = re.fullmatch(r"speedup: (\d+\.\d\d)", lines[-1]).group(1)
    assert printed_quotient(speedup, t_five, t_ours), (speedup, t_five, t_ours)


def test_default_shapes_keep_the_7b_proportions():
    """The proportions the bench's docstring claims for its default sizes: prefix / caption about 25 (20,000 / 800),
    MLP / width as Qwen2-7B's 18944 / 3584, and per prefix token about 3 times the matmul FLOPs of attention's
    (Qwen2-7B at 21,000 tokens: 3.1)."""
    bench = load_bench()
    with torch.device("meta"):
        llm = bench.build({"n_embd": bench.n_embd, "n_layer": bench.n_layer, "device": "meta"}).cfg.llm
    prefix = bench.frames * TOKENS_PER_FRAME + AUDIO + PROMPT
    assert 24 < prefix / bench.caption_tokens < 26
    assert abs(llm.intermediate_size / llm.hidden_size - 18944 / 3584) < 0.01
    D, kv = llm.hidden_size, llm.num_key_value_heads * llm.head_dim
    matmul = 2 * (2 * D * D + 2 * D * kv + 3 * D * llm.intermediate_size)  # q, o; k, v; gate, up, down
    attention = 2 * 2 * (prefix / 2) * D  # scores and weighted sum over half the prefix on average (causal)
    assert 2.5 < matmul / attention < 3.5
