"""
What the toy captions say, by event type: for each checkpoint, the sentences its greedy test captions state and how
many of them are right (an event of the clip, each counted once), against the events there are. A diagnostic for
issue 13 (dev/LOG.md): where MrDPO's lower Total comes from. Not part of make toy.

$ python dev/sentence_counts.py out/toy/sft/final out/toy/mrdpo/final
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data import read_manifest  # noqa: E402
from judge import ToyJudge  # noqa: E402
from toy_answers import greedy_answers  # noqa: E402

TYPES = ("visual", "sound", "speech", "unknown")  # unknown: a sentence no template makes


def main():
    judge = ToyJudge()
    items = [it for it in read_manifest(os.path.join(ROOT, "data", "toyav", "test.jsonl")) if it["task"] == "caption"]
    for ckpt in sys.argv[1:]:
        kept, texts = greedy_answers(ckpt, items)
        said, right, events = judge.sentence_counts(texts, kept)
        print(ckpt + ": " + ", ".join(f"{t} {said[t]} said, {right[t]} right, of {events[t]}" for t in TYPES))


if __name__ == "__main__":
    main()
