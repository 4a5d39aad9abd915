"""
Captions per second, two ways, on the same model and the same videos in one run:
- one video at a time: Qwen2.generate (its samples share one prefill and decode together), video after video;
- the engine (engine.py): each video prefilled alone, then up to `batch` rows of many videos decoding together,
  a finished row's slot refilled with the next video.
Both return the same tokens (checked here: a digest of each way's tokens is printed). A video is its prompt prefix
(the LLM's input embeddings, as the cached features give them) and a caption length of its own (the step its caption
stops at), so rows finish at different steps, as real captions do.
The sizes are the 7B run's scaled down to a CPU with its proportions kept, as bench/gdpo_step.py: prefix / caption
tokens about 25 (20,000 video tokens to 800), MLP / width 5.3 and grouped KV heads as Qwen2-7B.

$ python bench/sample.py                # prints the table and, last, "speedup: X.XX" (captions/s, engine / one at a time)
$ python bench/sample.py --samples=2    # MrDPO's sampling: 2 nucleus samples per video, per-video seeds
$ python bench/sample.py --smoke        # tiny, a few seconds
"""
import hashlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from config import configure  # noqa: E402
from engine import Engine, Request  # noqa: E402
from model import Qwen2, Qwen2Config  # noqa: E402

# -----------------------------------------------------------------------------
n_embd = 512  # LLM width (8 heads of 64, 2 KV heads)
n_layer = 4  # LLM layers
vocab = 4096
videos = 16  # videos captioned each way
prefix_tokens = 3200  # mean prompt prefix per video (each within +-10 %): about 25 captions long
caption_tokens = 128  # mean caption length (each within +-25 %)
samples = 1  # captions per video: 1 greedy (the caption benchmark, caption.py); more: nucleus sampling (MrDPO)
batch = 8  # the engine's rows
compile = False  # torch.compile the engine's decode step
smoke = False  # tiny sizes, for the test
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"
seed = 1337
# -----------------------------------------------------------------------------


def build(c):
    D = c["n_embd"]
    cfg = Qwen2Config(vocab_size=c["vocab"], hidden_size=D, intermediate_size=D * 18944 // 3584,
                      num_hidden_layers=c["n_layer"], num_attention_heads=D // 64, num_key_value_heads=max(1, D // 256))
    return Qwen2(cfg).to(c["device"], getattr(torch, c["dtype"])).eval()


def workload(llm, c):
    """Per video: prefix embeddings (1, P, D) and a caption length."""
    g = torch.Generator().manual_seed(c["seed"])
    P, C = c["prefix_tokens"], c["caption_tokens"]
    out = []
    for _ in range(c["videos"]):
        p = int(P * (0.9 + 0.2 * torch.rand(1, generator=g).item()))
        ids = torch.randint(0, c["vocab"], (1, p), generator=g).to(c["device"])
        out.append((llm.embed_tokens(ids).detach(), max(1, int(C * (0.75 + 0.5 * torch.rand(1, generator=g).item())))))
    return out


def requests(work, c):
    sampled = c["samples"] > 1  # greedy single captions never stop on a random model: each stops at its length
    return [Request(e, c["samples"], length, temperature=1.0, top_p=0.9, greedy=not sampled,
                    generator=torch.Generator(c["device"]).manual_seed(c["seed"] + i)) for i, (e, length) in enumerate(work)]


def timed(fn, dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def digest(results):
    return hashlib.sha1(repr(results).encode()).hexdigest()[:16]


def main(argv):
    c = configure(globals(), argv)
    if c["smoke"]:
        c.update(n_embd=64, n_layer=2, vocab=256, videos=6, prefix_tokens=100, caption_tokens=8, batch=4)
    torch.manual_seed(c["seed"])
    dev = torch.device(c["device"])
    llm = build(c)
    work = workload(llm, c)
    engine = Engine(llm, batch=c["batch"], compile=c["compile"])

    def one_at_a_time():
        return [llm.generate(r.embeds, r.n, r.max_new_tokens, r.temperature, r.top_p, r.greedy, r.stop_ids, r.generator)
                for r in requests(work, c)]

    def batched():
        return engine.generate(requests(work, c))
    with torch.no_grad():
        warm = {**c, "videos": 2}  # first calls (allocator, kernels; the compile when asked) are not timed
        engine.generate(requests(workload(llm, warm), warm))
        t_one, one = timed(one_at_a_time, dev)
        t_eng, eng = timed(batched, dev)
        prefill, _ = timed(lambda: [llm.hidden(e) for e, _ in work], dev)  # the same work both ways
    captions = c["videos"] * c["samples"]
    tokens = sum(len(s) for video in one for s in video)
    print(f"device {dev}, {c['dtype']}, LLM {c['n_embd']} x {c['n_layer']} layers, {c['videos']} videos, prefix ~{c['prefix_tokens']} "
          f"tokens, captions ~{c['caption_tokens']} tokens, {c['samples']} per video ({'greedy' if c['samples'] == 1 else 'nucleus'}), "
          f"engine batch {c['batch']}{', compiled' if c['compile'] else ''}")
    print(f"tokens: one at a time {digest(one)}, engine {digest(eng)}, {'identical' if one == eng else 'DIFFERENT'}")
    print(f"{'way':<16}{'s':>8}{'captions/s':>12}{'decode s':>10}{'decode tok/s':>14}")
    for name, t in (("one at a time", t_one), ("engine", t_eng)):  # decode: all but the prefills, timed alone
        print(f"{name:<16}{t:>8.2f}{captions / t:>12.3f}{t - prefill:>10.2f}{tokens / max(1e-9, t - prefill):>14.1f}")
    print(f"prefill of the {c['videos']} videos alone: {prefill:.2f} s, {100 * prefill / t_one:.0f} % of one at a time")
    print(f"speedup: {t_one / t_eng:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
