import importlib
import os

import pytest

from config import UserError, configure, run_config, usage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def defaults():
    return {"lr": 1e-4, "steps": 10, "name": "toy", "greedy": False, "targets": ("q_proj",), "device": None,
            "PEAK": {"H100": 1.0}}


def test_files_then_flags_override_in_order(tmp_path):
    f = tmp_path / "cfg.py"
    f.write_text("import math\nlr = 3e-4\nsteps = 20\n_private = 1\n")
    g = defaults()
    resolved = configure(g, [str(f), "--steps=30", "--name=real run", "--greedy", "--lr=1", "--device=False"])
    assert resolved == {"lr": 1.0, "steps": 30, "name": "real run", "greedy": True, "targets": ("q_proj",), "device": False}
    with pytest.raises(UserError, match="unknown config key 'PEAK'"):  # module facts are not overridable
        configure(defaults(), ["--PEAK={}"])
    assert isinstance(g["lr"], float)


def test_key_space_value_as_well_as_key_equals_value():
    resolved = configure(defaults(), ["--steps", "30", "--name", "real run", "--greedy", "--lr", "1", "--targets",
                                      "('k_proj',)"])
    assert resolved["steps"] == 30 and resolved["name"] == "real run" and resolved["greedy"] is True
    assert resolved["lr"] == 1.0 and resolved["targets"] == ("k_proj",)
    assert configure(defaults(), ["--targets=['k_proj', 'v_proj']"])["targets"] == ("k_proj", "v_proj")  # a list, kept a tuple
    # a bare bool flag takes only True / False after it, so it can stand before anything else
    assert configure(defaults(), ["--greedy", "False", "--steps=2"])["greedy"] is False
    assert configure(defaults(), ["--device", "False"])["device"] is False  # a None default is a flag too
    with pytest.raises(UserError, match="--steps needs a value"):
        configure(defaults(), ["--steps"])


@pytest.mark.parametrize("arg,msg", [("--stpes=3", "unknown config key 'stpes'"), ("--steps=3.5", "steps must be int"),
                                     ("--greedy=yes", "greedy must be bool"), ("--stpes", "unknown config key 'stpes'"),
                                     ("--steps=True", "steps must be int"), ("--lr=False", "lr must be float"),
                                     ("--greedy=1", "greedy must be bool"), ("--device=yes", "device must be True, False or None"),
                                     ("--device=1", "device must be True, False or None"),
                                     ("--targets=q_proj", "targets must be tuple")])
def test_mistakes_fail_loudly(arg, msg):
    with pytest.raises(UserError, match=msg):
        configure(defaults(), [arg])


def test_only_a_py_file_is_run_as_a_config(tmp_path):
    """Config files are Python by design; anything else given without --key= is a usage error, never executed."""
    marker = tmp_path / "ran"
    clip = tmp_path / "clip.mp4"
    clip.write_text(f"import os\nos.mkdir({str(marker)!r})\n")  # valid Python: it would run if it were executed
    with pytest.raises(UserError, match="clip.mp4: not a setting"):
        configure(defaults(), [str(clip)])
    assert not marker.exists()
    with pytest.raises(UserError, match="clip.mp4: not a config file"):  # what scripts reading a --config call
        run_config(str(clip))
    assert not marker.exists()
    with pytest.raises(UserError, match="nowhere.py: no such config file"):
        configure(defaults(), [str(tmp_path / "nowhere.py")])
    (tmp_path / "broken.py").write_text("lr = (\n")
    with pytest.raises(UserError, match=r"broken.py:\d+: "):
        configure(defaults(), [str(tmp_path / "broken.py")])


def test_help_lists_every_setting_with_its_default_and_comment(tmp_path):
    script = tmp_path / "script.py"
    script.write_text('"""Does a thing."""\nlr = 1e-4  # peak learning rate\nsteps = (\n    10)  # optimizer steps\n'
                      'name = "toy"\nPEAK = 1\n')
    g = {"__file__": str(script), "__doc__": "Does a thing.", "lr": 1e-4, "steps": 10, "name": "toy", "PEAK": 1}
    lines = usage(g, ["lr", "steps", "name"]).splitlines()
    assert lines[0] == "Does a thing."
    assert "  --lr=0.0001  # peak learning rate" in lines and "  --steps=10  # optimizer steps" in lines
    assert "  --name='toy'" in lines and not any("PEAK" in x for x in lines)
    with pytest.raises(SystemExit) as e:
        configure(g, ["--steps=3", "--help"])
    assert e.value.code == 0


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(ROOT, "config")) if f.endswith(".py")
                                        and not f.startswith("_")))
def test_every_config_file_resolves_against_its_script(name):
    """Each config file sets only settings its stage's script has, with their types (a 3B or 72B config that takes
    the 7B one's settings by import included); a typo or a stale key would fail here, not on a GPU node."""
    stage = name[:-3].rsplit("_", 1)[1]
    script = {"align": "train_align", "sft": "train_sft", "base": "train_sft", "vision": "train_sft", "copy": "train_sft",
              "mrdpo": "train_mrdpo"}[stage]
    g = dict(vars(importlib.import_module(script)))
    c = configure(g, [os.path.join(ROOT, "config", name)])
    assert c["out_dir"].startswith("out/")
