"""
How much better than its greedy captions are a toy checkpoint's own samples, MrDPO's raw material? For the caption
clips of a split: the greedy caption and n nucleus samples of each (MrDPO's temperature 1 and top-p 0.9), judged by
the exact toy judge. Prints Miss / Hall / Total of the greedy captions, of each sample, of the better and the worse of
the first two (a released MrDPO pair) and of the best of n; then, by event kind (appear, move, say, ...), the greedy
captions' events stated right, of the events, and the sentences of that kind said. The checkpoint is shown its media
as its training was (eval.trained_inputs: the base hears its soundtrack written). A diagnostic for issue 13
(dev/LOG.md, sessions 11-12). Not part of make toy.

$ python dev/sample_oracle.py out/toy/sft/final --split=test --n=8
$ python dev/sample_oracle.py out/toy/sft/final --split=train --videos=160
$ python dev/sample_oracle.py out/toy/base/final --split=base_test --n=0
"""
import argparse
import os
import random
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval as E  # noqa: E402
from config import configure  # noqa: E402
from data import Features, decode_response, read_manifest  # noqa: E402
from judge import ToyJudge, rates  # noqa: E402


def total(j):
    return (j["missed"] + j["incorrect"] + j["hallucinated"]) / j["events"]


def percent(judgments):
    r = rates(judgments)
    return f"Miss {100 * r['miss']:.1f} / Hall {100 * r['hall']:.1f} / Total {100 * r['total']:.1f}"


@torch.no_grad()
def main():
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("--split", default="test", help="a toy manifest: test, val, train, base_test, ...")
    p.add_argument("--n", type=int, default=8, help="samples per clip")
    p.add_argument("--videos", type=int, default=0, help="a seeded subset of this many clips (0: all)")
    args = p.parse_args()
    c = configure(dict(vars(E)), [f"--ckpt={args.ckpt}", f"--cache_dir={os.path.join(ROOT, E.cache_dir)}"])
    model, tok = E.load_model(c)
    items = [it for it in read_manifest(os.path.join(ROOT, "data", "toyav", f"{args.split}.jsonl")) if it["task"] == "caption"]
    if args.videos:
        items = random.Random(0).sample(items, min(args.videos, len(items)))
    use_audio, written_audio = E.trained_inputs(args.ckpt)
    data = Features(model, tok, items, fps=c["fps"], max_frames=c["max_frames"], cache_dir=c["cache_dir"],
                    use_audio=use_audio, responses=False, written_audio=written_audio)
    items, judge, stop = data.items, ToyJudge(), (tok.token_to_id("<|im_end|>"),)

    def captions(**kw):
        return model.generate((data.example(i, c["device"])[:2] for i in range(len(items))), max_new_tokens=c["max_new_tokens"],
                              stop_ids=stop, **kw)
    greedy = [decode_response(tok, x[0])[0] for x in captions(greedy=True)]
    g = [judge.judge(text, it["events"]) for text, it in zip(greedy, items)]
    print(f"{len(items)} clips of {args.split}; greedy: {percent(g)}")
    if args.n:
        generators = [torch.Generator().manual_seed(1000 + i) for i in range(len(items))]
        samples = captions(n=args.n, generators=generators, temperature=1.0, top_p=0.9)
        s = [[judge.judge(decode_response(tok, x)[0], it["events"]) for x in xs] for xs, it in zip(samples, items)]
        for k in range(args.n):
            print(f"sample {k}: {percent([js[k] for js in s])}")
        if args.n >= 2:
            print(f"better of the first two: {percent([min(js[:2], key=total) for js in s])}; "
                  f"worse: {percent([max(js[:2], key=total) for js in s])}")
        best = [min(js, key=total) for js in s]
        print(f"best of {args.n}: {percent(best)}; clips where it beats greedy: "
              f"{sum(total(b) < total(x) for b, x in zip(best, g))}, where the better of two does: "
              f"{sum(total(min(js[:2], key=total)) < total(x) for js, x in zip(s, g))}, of {len(items)}")
    said, right, events = judge.sentence_counts(greedy, items, kind=lambda key: key[0])
    print("greedy by kind: " + "; ".join(f"{k} {right[k]}/{events[k]} (said {said[k]})" for k in sorted(events)))


if __name__ == "__main__":
    main()
