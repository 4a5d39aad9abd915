"""
The toy's test questions by kind: for each checkpoint, how many of each kind of question ("How many shapes
appeared?", "What colour was the circle?", ...) its greedy answers get right (prepare.parse_answer, as eval.py
counts them). A diagnostic for issue 13 (dev/LOG.md, session 10). Not part of make toy.

$ python dev/qa_by_question.py out/toy/sft/final
"""
import os
import sys
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data import read_manifest  # noqa: E402
from judge import ToyJudge  # noqa: E402
from toy_answers import greedy_answers  # noqa: E402


def kind(question):  # the question's template: its words up to the shape, colour or sound it names
    return " ".join(question.split()[:3]) + " ..."


def main():
    world = ToyJudge().world
    items = [it for it in read_manifest(os.path.join(ROOT, "data", "toyav", "test.jsonl")) if it["task"] == "qa"]
    for ckpt in sys.argv[1:]:
        kept, texts = greedy_answers(ckpt, items)
        asked, right = Counter(), Counter()
        for it, text in zip(kept, texts):
            asked[kind(it["question"])] += 1
            right[kind(it["question"])] += world.parse_answer(text, it["options"]) == it["answer"]
        print(f"{ckpt}: {sum(right.values())} of {sum(asked.values())} right; "
              + ", ".join(f"{k} {right[k]} of {n}" for k, n in asked.most_common()))


if __name__ == "__main__":
    main()
