import pytest

from config import configure


def defaults():
    return {"lr": 1e-4, "steps": 10, "name": "toy", "greedy": False, "targets": ("q_proj",), "device": None,
            "PEAK": {"H100": 1.0}}


def test_files_then_flags_override_in_order(tmp_path):
    f = tmp_path / "cfg.py"
    f.write_text("import math\nlr = 3e-4\nsteps = 20\n_private = 1\n")
    g = defaults()
    resolved = configure(g, [str(f), "--steps=30", "--name=real run", "--greedy", "--lr=1", "--device=cuda"])
    assert resolved == {"lr": 1.0, "steps": 30, "name": "real run", "greedy": True, "targets": ("q_proj",), "device": "cuda"}
    with pytest.raises(SystemExit, match="unknown config key 'PEAK'"):  # module facts are not overridable
        configure(defaults(), ["--PEAK={}"])
    assert isinstance(g["lr"], float)


@pytest.mark.parametrize("arg,msg", [("--stpes=3", "unknown config key 'stpes'"), ("--steps=3.5", "steps must be int"),
                                     ("--greedy=yes", "greedy must be bool")])
def test_mistakes_fail_loudly(arg, msg):
    with pytest.raises(SystemExit, match=msg):
        configure(defaults(), [arg])
