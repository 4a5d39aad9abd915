"""
What a toy MrDPO run's kept pairs are: each round's pairs (train_mrdpo's own choice, with the run's saved config) judged
again event by event, counting how often the chosen caption states fewer wrong things (incorrect + hallucinated),
leaves out fewer or more, and is shorter, longer or as long (in sentences) as the rejected one. A diagnostic for
issue 13 (dev/LOG.md, session 10). Not part of make toy.

$ python dev/mrdpo_pairs.py out/toy/mrdpo
"""
import json
import os
import sys
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data import read_manifest, read_records  # noqa: E402
from judge import ToyJudge  # noqa: E402
from train_mrdpo import select_pair  # noqa: E402  the rule itself, not a copy of it


def main():
    run = sys.argv[1]
    c = json.load(open(os.path.join(run, "final", "train_config.json")))
    judge = ToyJudge()
    items = [it for it in read_manifest(c["train_data"]) if it.get("task") in ("caption", "qa")]  # train_mrdpo's order
    total = Counter()
    for t in range(1, c["rounds"] + 1):
        n = Counter()
        for r in read_records(os.path.join(run, f"round{t}", "samples_rank0.jsonl")):
            kept = select_pair(r["samples"], t, c)
            if not kept:
                continue
            won, lost = kept
            events = items[r["i"]]["events"]
            w, l = judge.judge(won["text"], events), judge.judge(lost["text"], events)
            wrong_w, wrong_l = w["incorrect"] + w["hallucinated"], l["incorrect"] + l["hallucinated"]
            len_w, len_l = (len(judge.world.parse_caption(x["text"])) for x in (won, lost))  # sentences
            n.update({"pairs": 1, "fewer wrong": wrong_w < wrong_l, "more wrong": wrong_w > wrong_l,
                      "fewer missed": w["missed"] < l["missed"], "more missed": w["missed"] > l["missed"],
                      "shorter": len_w < len_l, "longer": len_w > len_l, "as long": len_w == len_l})
        total.update(n)
        print(f"round {t}: " + ", ".join(f"{k} {v}" for k, v in n.items()))
    print("all rounds, the chosen caption against the rejected: " + ", ".join(f"{k} {v}" for k, v in total.items()))


if __name__ == "__main__":
    main()
