"""The one registry mechanism: registered names, ``package.module:callable`` names, entry points,
and the README's own-model example run as written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from swalab.lab.config import load_config
from swalab.lab.runner import run_experiment
from swalab.models import create
from swalab.registry import Registry

README = Path(__file__).resolve().parent.parent / "README.md"
SRC = Path(__file__).resolve().parent.parent / "src"


def _write_module(path: Path, name: str, text: str) -> None:
    (path / f"{name}.py").write_text(text)


def test_module_callable_names(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    _write_module(
        tmp_path,
        "usermods",
        "import torch\nVALUE = 3\n"
        "class Ns:\n    @staticmethod\n    def twice(x=1):\n        return 2 * x\n"
        "def lin(in_shape, num_outputs, bias=True):\n"
        "    return torch.nn.Linear(in_shape[0], num_outputs, bias=bias)\n",
    )
    reg = Registry("thing")
    assert reg.group == "swalab.things"
    assert reg.create("usermods:Ns.twice", x=4) == 8
    model = create("usermods:lin", in_shape=(5,), num_outputs=2, bias=False)
    assert (
        isinstance(model, torch.nn.Linear) and model.bias is None and model.weight.shape == (2, 5)
    )
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['width'\].*takes \['bias'\]"):
        create("usermods:lin", in_shape=(5,), num_outputs=2, width=3)
    with pytest.raises(ValueError, match=r"cannot import module 'no_such_module_xyz' for thing"):
        reg.get("no_such_module_xyz:f")
    with pytest.raises(ValueError, match=r"module 'usermods' has no attribute 'missing'"):
        reg.get("usermods:missing")
    with pytest.raises(ValueError, match=r"'usermods:VALUE' is a int, not a callable"):
        reg.get("usermods:VALUE")
    with pytest.raises(ValueError, match=r"must have the form 'package.module:callable'"):
        reg.get("usermods:")
    with pytest.raises(ValueError, match=r"unknown thing 'nope'.*package.module:callable"):
        reg.get("nope")


def test_entry_points(tmp_path, monkeypatch):
    """A package declaring ``[swalab.models]`` entry points: its names are listed and built."""
    _write_module(
        tmp_path,
        "plugmods",
        "import torch\n"
        "def net(in_shape, num_outputs):\n    '''A plugged-in net.'''\n"
        "    return torch.nn.Linear(in_shape[0], num_outputs)\n",
    )
    info = tmp_path / "plugpkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plugpkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[swalab.models]\nplugnet = plugmods:net\nbroken = plugmods:absent\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry("model")
    assert reg.names() == ["broken", "plugnet"] and "plugnet" in reg
    assert reg.describe("plugnet") == "A plugged-in net."
    assert reg.create("plugnet", in_shape=(3,), num_outputs=4).weight.shape == (4, 3)
    with pytest.raises(ValueError, match=r"no attribute 'absent'.*entry point in swalab.models"):
        reg.get("broken")
    # a registered name wins over an entry point of the same name
    reg.register("plugnet")(lambda **kw: "builtin")
    assert reg.create("plugnet") == "builtin" and reg.names() == ["broken", "plugnet"]


def test_user_method_from_a_module(tmp_path, monkeypatch):
    """A user's recipe with a constant LR of 0.07: every epoch's lr in metrics.jsonl is 0.07."""
    monkeypatch.syspath_prepend(str(tmp_path))
    _write_module(
        tmp_path,
        "usermethods",
        "from swalab.lab.methods import Recipe\n"
        "def constant(run, value=0.5):\n"
        "    return Recipe(run.epochs, run.steps_per_epoch, lambda epoch, step: value)\n",
    )
    cfg = load_config(
        "mnist1d",
        [
            "seeds=[0]",
            "train.epochs=2",
            "train.threads=1",
            "data.train_size=500",
            "methods=[{method: 'usermethods:constant', label: const, options: {value: 0.07}}]",
        ],
    )
    run_experiment(cfg, tmp_path / "run", log=lambda _: None, progress=False)
    records = [
        json.loads(line)
        for line in (tmp_path / "run/const/seed0/metrics.jsonl").read_text().splitlines()
    ]
    assert [r["lr"] for r in records] == [0.07, 0.07]


def test_unknown_user_model_fails_before_training(tmp_path, capsys):
    from swalab.cli import main

    out = tmp_path / "run"
    assert (
        main(["run", "mnist1d", "--out", str(out), "--set", "model.name=no_such_pkg_q.models:Net"])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("swalab: error: model.name: cannot import module 'no_such_pkg_q.models'")
        and "\n" not in err
    )
    assert not list(out.glob("*/seed*/metrics.jsonl"))


@pytest.mark.slow
def test_readme_own_model_example_runs_as_written(tmp_path):
    section = (
        README.read_text()
        .split("### Your own model, dataset or method", 1)[1]
        .split("\n### ", 1)[0]
    )
    module = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    config = re.search(r"```yaml\n(.*?)```", section, re.DOTALL).group(1)
    command = re.search(r"run with `(swalab run [^`]+)`", section).group(1)
    assert len(module.strip().splitlines()) <= 15
    (tmp_path / "mylab.py").write_text(module)
    (tmp_path / "mine.yaml").write_text(config)
    # as the console script runs: the working directory is not on sys.path
    args = command.split()[1:]
    script = (
        f"import sys; from swalab.cli import main; sys.path.remove(''); sys.exit(main({args!r}))"
    )
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = (tmp_path / "runs/mine/results.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and all(",done," in row for row in rows[1:])


def test_cli_version_and_list_with_options(capsys):
    import swalab
    from swalab.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"swalab {swalab.__version__}\n"
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    options = {
        lines[i - 1].split()[0]: line.strip()
        for i, line in enumerate(lines)
        if line.startswith(" " * 29) and not line.startswith(" " * 30)
    }
    assert options["swa"] == "swa_lr=0.05, swa_start=None, schedule='reference', cycle=1, every=1"
    assert options["mnist1d_cnn"] == "bn=False"
    assert "sgd" in options and options["sgd"].startswith("schedule='reference'")
    assert "none" not in options  # no options, no line
