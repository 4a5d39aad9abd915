import contextlib
import io
import os
import runpy
import subprocess
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(path=None, vocab_size=300):
    """A tiny byte-level BPE with the Qwen2 chat special tokens, trained on a few sentences."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["system user assistant You are a helpful assistant.", "Describe the video in detail.",
            "A red circle appears.\n\nA tone plays.\nThe man says hello.", "\n", "\n\n"]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if path:
        tok.save(str(path))
    return tok


class RunsCode:
    """Unpickling this calls os.mkdir(path): a stand-in for a checkpoint crafted to run a shell command."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def write_crafted_state(file, marker):
    """A resume state whose unpickling would run code (it makes the directory marker), checked to do so when loaded
    the unsafe way (weights_only=False), so that a test showing it is not run shows something."""
    import torch
    payload = RunsCode(str(marker))  # one object (pickled once) where either resume state keeps its tensors
    torch.save({"optimizer": payload, "proxy": payload, "rng": {}}, file)
    torch.load(file, weights_only=False)
    assert os.path.isdir(marker)
    os.rmdir(marker)
    return file


def rounded(x):
    """The interval of exact values that print as x: a string stands for any number that rounds to its decimals;
    a number is exact."""
    if not isinstance(x, str):
        return x, x
    half = 0.5 * 10 ** -len(x.partition(".")[2])
    return float(x) - half, float(x) + half


def printed_quotient(q, a, b):
    """Whether the printed q can be a / b, for exact values that print as a and b (see rounded): what a bench prints
    as a rate or a ratio must be the quotient of what it prints as the work and the times."""
    (ql, qh), (al, ah), (bl, bh) = rounded(q), rounded(a), rounded(b)
    assert al >= 0 and bh > 0, (q, a, b)
    return (bl <= 0 or ql <= ah / bl * (1 + 1e-9)) and al / bh * (1 - 1e-9) <= qh  # b printed as 0: no upper bound


def run_cli(script, *args, env=None):
    """`python script args` run as that command runs it (as __main__, with sys.argv, its directory first on sys.path,
    in the repository, its globals fresh, an exception a traceback on stderr and exit status 1), in this process: a
    new process would import torch again, 5 s on the 2-core CI machine and a third of the suite's time. A
    CompletedProcess, as subprocess.run's."""
    argv, path, cwd, environ = sys.argv, sys.path, os.getcwd(), dict(os.environ)
    out, err, status = io.StringIO(), io.StringIO(), 0
    sys.argv = [script, *map(str, args)]
    sys.path = [os.path.dirname(os.path.join(ROOT, script)), *path]
    os.environ.update(env or {})
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
            except SystemExit as e:  # sys.exit(status) or raise SystemExit("message"), as the interpreter ends them
                status = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                if not isinstance(e.code, (int, type(None))):
                    print(e.code, file=sys.stderr)
            except Exception:
                traceback.print_exc()
                status = 1
    finally:
        sys.argv, sys.path = argv, path
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
    return subprocess.CompletedProcess([script, *map(str, args)], status, out.getvalue(), err.getvalue())
