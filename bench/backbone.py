"""
Benchmark our Qwen2 (model.py) against transformers' Qwen2ForCausalLM on the same random weights:
prefill tokens/s (one forward over the prompt) and greedy decode tokens/s (generate with the KV cache).
The two are timed interleaved (ours, theirs, ours, theirs, ...) in one run and the medians compared,
so that load from other processes hits both alike.

$ python bench/backbone.py                      # default size, ~1-2 minutes on 2 CPU cores
$ python bench/backbone.py --smoke              # tiny, a few seconds
$ python bench/backbone.py --dtype=bfloat16 --n_layer=4 --prompt_len=256
"""
import ast
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# -----------------------------------------------------------------------------
n_embd = 512  # hidden_size
n_layer = 8  # num_hidden_layers
n_head = 8  # num_attention_heads
n_kv_head = 2  # num_key_value_heads (grouped-query attention)
intermediate = 1536  # intermediate_size of the SwiGLU MLP
vocab_size = 32000  # vocab_size
rope_theta = 1e6  # RoPE base, as in Qwen2
batch_size = 1  # prompts per prefill forward (decode always uses one prompt)
prompt_len = 512  # prompt tokens
new_tokens = 64  # greedy tokens generated after the prompt
warmup = 1  # untimed rounds of each measurement
repeats = 5  # timed rounds of each measurement (interleaved ours/theirs); the median is reported
dtype = "float32"  # float32 | bfloat16 | float16 (both models run in it)
device = "cpu"  # cpu | cuda
seed = 1337  # weights and prompt
smoke = False  # --smoke: a tiny model and few rounds, for the test
# -----------------------------------------------------------------------------
SMOKE = dict(n_embd=64, n_layer=2, n_head=4, n_kv_head=2, intermediate=128, vocab_size=256,
             prompt_len=32, new_tokens=8, warmup=1, repeats=2)


def parse_args(argv):
    """nanoGPT-style overrides: --key=value (value read with ast.literal_eval), and --smoke."""
    g = globals()
    for arg in argv:
        if arg == "--smoke":
            g["smoke"] = True
            continue
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"unknown argument {arg!r}: expected --key=value or --smoke")
        key, val = arg[2:].split("=", 1)
        if key not in CONFIG_KEYS:
            raise SystemExit(f"unknown config key {key!r}; known: {', '.join(CONFIG_KEYS)}")
        try:
            attempt = ast.literal_eval(val)
        except (SyntaxError, ValueError):
            attempt = val  # a bare string such as --dtype=bfloat16
        default = g[key]
        if isinstance(default, float) and isinstance(attempt, int) and not isinstance(attempt, bool):
            attempt = float(attempt)
        if type(attempt) is not type(default):
            raise SystemExit(f"--{key}: expected {type(default).__name__}, got {val!r}")
        g[key] = attempt


CONFIG_KEYS = [k for k, v in globals().items() if not k.startswith("_") and k != "SMOKE"
               and isinstance(v, (int, float, bool, str))]


def sync():
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def interleaved(fn_ours, fn_theirs):
    """Median seconds of each after warmup rounds, alternating A B A B ... in every round."""
    t_ours, t_theirs = [], []
    for i in range(warmup + repeats):
        a, _ = timed(fn_ours)
        b, _ = timed(fn_theirs)
        if i >= warmup:
            t_ours.append(a)
            t_theirs.append(b)
    return statistics.median(t_ours), statistics.median(t_theirs)


def main():
    argv = sys.argv[1:]
    parse_args(argv)
    if smoke:
        globals().update(SMOKE)
        parse_args(argv)  # explicit --key=value still wins over the smoke sizes
    import transformers as hf
    from model import Qwen2
    hf.utils.logging.disable_progress_bar()

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device=cuda but CUDA is not available")
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    print(f"torch {torch.__version__}, transformers {hf.__version__}, device {device}, dtype {dtype}, "
          f"threads {torch.get_num_threads()}")
    print(f"model: hidden {n_embd}, layers {n_layer}, heads {n_head}/{n_kv_head} kv, mlp {intermediate}, "
          f"vocab {vocab_size}; prompt {batch_size}x{prompt_len}, new_tokens {new_tokens}, "
          f"warmup {warmup}, repeats {repeats}")

    # the reference with random weights (q/k/v biases are zero at init: make them matter), saved and loaded
    torch.manual_seed(seed)
    cfg = hf.Qwen2Config(vocab_size=vocab_size, hidden_size=n_embd, intermediate_size=intermediate,
                         num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_kv_head,
                         rope_theta=rope_theta, tie_word_embeddings=False)
    ref = hf.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    ref = ref.to(device=device, dtype=dt)
    tmp = tempfile.mkdtemp(prefix="bench_backbone_")
    try:
        ref.save_pretrained(tmp)
        ours = Qwen2.from_pretrained(tmp, dtype=dt, device=device).eval()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"transformers attention: {ref.config._attn_implementation}")

    prompt = torch.randint(0, vocab_size, (batch_size, prompt_len), device=device)
    prompt1 = prompt[:1]
    ones1 = torch.ones_like(prompt1)

    with torch.inference_mode():
        diff = (ours(prompt)[0].float() - ref(prompt, use_cache=False).logits.float()).abs().max().item()
    print(f"logits max abs diff: {diff:.3e}")

    def prefill_ours():
        with torch.inference_mode():
            return ours(prompt)[0]

    def prefill_theirs():
        with torch.inference_mode():
            return ref(prompt, use_cache=False).logits

    def decode_ours():
        with torch.inference_mode():
            return ours.generate(ours.embed_tokens(prompt1), n=1, max_new_tokens=new_tokens, greedy=True)[0]

    def decode_theirs():
        with torch.inference_mode():
            out = ref.generate(prompt1, attention_mask=ones1, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[0, prompt_len:].tolist()

    a, b = decode_ours(), decode_theirs()
    assert len(a) == new_tokens and len(b) == new_tokens, (len(a), len(b))
    match = a == b
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    print(f"greedy tokens match: {match}" + ("" if match else f" (first difference at step {first})"))

    p_ours, p_theirs = interleaved(prefill_ours, prefill_theirs)
    d_ours, d_theirs = interleaved(decode_ours, decode_theirs)
    n_prefill = batch_size * prompt_len
    rows = [("prefill", n_prefill / p_ours, n_prefill / p_theirs, p_ours, p_theirs),
            ("decode", new_tokens / d_ours, new_tokens / d_theirs, d_ours, d_theirs)]
    print()
    print(f"{'metric':<10}{'ours tok/s':>14}{'hf tok/s':>14}{'ratio':>9}{'ours s':>11}{'hf s':>11}")
    for name, o, t, so, st in rows:
        print(f"{name:<10}{o:>14.1f}{t:>14.1f}{o / t:>9.2f}{so:>11.4f}{st:>11.4f}")
    print("(decode: new_tokens / median wall time of one whole greedy generate, prefill of the prompt included)")
    print(f"prefill_ratio: {rows[0][1] / rows[0][2]:.2f}")
    print(f"decode_ratio: {rows[1][1] / rows[1][2]:.2f}")


if __name__ == "__main__":
    main()
