"""What the dev diagnostics share: a toy checkpoint's greedy answers to manifest items, with every eval.py setting
at its default (so a setting eval.py gains reaches them too)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval as E  # noqa: E402
from config import configure  # noqa: E402


def greedy_answers(ckpt, items):
    """(the items whose media could be read, their greedy answers' texts) of checkpoint ckpt."""
    c = configure(dict(vars(E)), [f"--ckpt={ckpt}", f"--cache_dir={os.path.join(ROOT, E.cache_dir)}"])
    model, tok = E.load_model(c)
    kept, outs = E.answers(model, tok, items, c, c["max_new_tokens"])
    return kept, [text for text, _ in outs]
