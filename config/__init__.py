"""
Overrides for the constants at the top of a script, nanoGPT style but without exec:

$ python train_sft.py config/toy_sft.py --lr=3e-4 --time_aligned=True

A config file is plain Python assignments (run with runpy); --key=value is parsed with
ast.literal_eval, falling back to the raw string. Every key must exist in the script with a value of
the same type (an int may set a float), so a typo fails loudly instead of being ignored.
"""
import ast
import runpy
import types


def configure(g, argv):
    """Apply config files and --key=value from argv to the dict g (a script's globals); returns the
    resolved {key: value} of the overridable constants, to be saved with every checkpoint."""
    keys = [k for k, v in g.items() if not k.startswith("_") and not k.isupper()  # UPPER_CASE: fixed facts, not knobs
            and isinstance(v, (int, float, str, bool, tuple, list, dict, type(None)))]
    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            try:
                value = ast.literal_eval(text) if sep else True  # a bare --flag means True
            except (ValueError, SyntaxError):
                value = text
            _set(g, keys, key, value, arg)
        else:
            for key, value in runpy.run_path(arg).items():
                if not key.startswith("_") and not callable(value) and not isinstance(value, types.ModuleType):
                    _set(g, keys, key, value, arg)
    return {k: g[k] for k in keys}


def _set(g, keys, key, value, source):
    if key not in keys:
        raise SystemExit(f"{source}: unknown config key {key!r}")
    default = g[key]
    if default is not None and not isinstance(value, type(default)) and not (isinstance(default, float) and isinstance(value, int)):
        raise SystemExit(f"{source}: {key} must be {type(default).__name__}, got {value!r}")
    g[key] = float(value) if isinstance(default, float) else value
