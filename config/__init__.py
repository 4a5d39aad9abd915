"""
Overrides for the constants at the top of a script, nanoGPT style but without exec:

$ python train_sft.py config/toy_sft.py --lr=3e-4 --time_aligned=True
$ python train_sft.py config/toy_sft.py --lr 3e-4 --resume     # --key value too; a bare flag (bool or None) is True
$ python train_sft.py --help                                     # every setting, its default and its comment

Config files are Python by design (nanoGPT's convention): plain assignments, run with runpy. So only a positional
argument ending in .py is run as one; anything else is a usage error (a video given without --video= is never run
as Python). A value is parsed with ast.literal_eval, falling back to the raw string. Every key must exist in the
script with a value of the same type (an int may set a float, a bool sets neither; a None default takes True, False
or None), so a typo fails loudly instead of being ignored.

run(main) is every script's entry point: a UserError (a missing or unreadable file, a bad setting or manifest, a
checkpoint that does not fit) ends the run with one line naming the file or item, and exit status 2, no traceback.
"""
import ast
import io
import os
import runpy
import sys
import tokenize
import types


class UserError(Exception):
    """A mistake in what the user gave (a path, a file, a setting): the entry points print it as one line, exit 2."""


def run(main, argv=None):
    """sys.exit(main(argv)) for a script (an int return is the exit status), a UserError turned into one line."""
    try:
        status = main(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr, flush=True)
        status = 2
    sys.exit(status if isinstance(status, int) else 0)


def configure(g, argv):
    """Apply config files and --key=value from argv to the dict g (a script's globals); returns the
    resolved {key: value} of the overridable constants, to be saved with every checkpoint."""
    keys = [k for k, v in g.items() if not k.startswith("_") and not k.isupper()  # UPPER_CASE: fixed facts, not knobs
            and isinstance(v, (int, float, str, bool, tuple, list, dict, type(None)))]
    if "--help" in argv or "-h" in argv:
        print(usage(g, keys))
        raise SystemExit(0)
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if key not in keys:
                raise UserError(f"{arg}: unknown config key {key!r} (--help lists them)")
            flag = isinstance(g[key], bool) or g[key] is None  # a bare --flag means True
            if not sep and args and not args[0].startswith("--") and (not flag or args[0] in ("True", "False", "None")):
                sep, text = "=", args.pop(0)
                arg = f"--{key}={text}"
            if not sep and not flag:
                raise UserError(f"--{key} needs a value: --{key}=VALUE or --{key} VALUE")
            try:
                value = ast.literal_eval(text) if sep else True
            except (ValueError, SyntaxError):
                value = text
            _set(g, keys, key, value, arg)
        elif arg.endswith(".py"):
            for key, value in run_config(arg).items():
                if not key.startswith("_") and not callable(value) and not isinstance(value, types.ModuleType):
                    _set(g, keys, key, value, arg)
        else:
            raise UserError(f"{arg}: not a setting (--key=value) nor a config file (a .py file); --help lists the settings")
    return {k: g[k] for k in keys}


def run_config(path):
    """The names a config file sets; only a .py file is run, so a mistyped path never executes a video or a YAML file."""
    if not path.endswith(".py"):
        raise UserError(f"{path}: not a config file (a .py file)")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such config file")
    try:
        return runpy.run_path(path)
    except SyntaxError as e:
        raise UserError(f"{path}:{e.lineno}: {e.msg}") from e
    except Exception as e:  # a config file is assignments: whatever else fails in it is the file's mistake
        raise UserError(f"{path}: {type(e).__name__}: {e}") from e


def _set(g, keys, key, value, source):
    if key not in keys:
        raise UserError(f"{source}: unknown config key {key!r}")
    default = g[key]
    if not of_type(value, type(default)):
        kind = "True, False or None" if default is None else type(default).__name__
        raise UserError(f"{source}: {key} must be {kind}, got {value!r}")
    g[key] = float(value) if isinstance(default, float) else tuple(value) if isinstance(default, tuple) else value


def of_type(value, kind):
    """Whether a setting's value is of its kind as a literal or JSON writes it: an int for a float, a list for a tuple,
    True, False or None for None (a switch left to the checkpoint: time_aligned, snap_audio). A bool is an int to
    Python but never a count or a rate: --steps=True is a mistake."""
    wanted = {float: (int, float), tuple: (list, tuple), type(None): (bool, type(None))}.get(kind, kind)
    return isinstance(value, wanted) and (not isinstance(value, bool) or kind in (bool, type(None)))


# -----------------------------------------------------------------------------
# --help: the settings with their defaults and the comment after each in the source


def usage(g, keys):
    comments = {}
    for path in reversed(_sources(g)):  # the script last: its own comment wins over an imported default's
        comments.update(_comments(path))
    lines = [(g.get("__doc__") or "").strip(), "",
             "settings (config files first, then --key=value or --key value, each overriding the one before):"]
    for k in keys:
        lines.append(f"  --{k}={g[k]!r}" + (f"  # {comments[k]}" if comments.get(k) else ""))
    return "\n".join(lines)


def _sources(g):
    """The script's file, then the files of the modules it star-imports (train_sft.py's settings live in training.py)."""
    path = g.get("__file__")
    if not path or not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    star = [node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.names[0].name == "*"]
    return [path] + [sys.modules[m].__file__ for m in star if m in sys.modules]


def _comments(path):
    """{name: the first comment on the lines of its top-level assignment}."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    by_line = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            by_line.setdefault(tok.start[0], tok.string.lstrip("#").strip())
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            found = [by_line[n] for n in range(node.lineno, node.end_lineno + 1) if n in by_line]
            if found:
                out[node.targets[0].id] = found[0]
    return out
