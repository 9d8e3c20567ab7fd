"""A run of one's own model (README "Your own model, dataset or method") read from another
directory (issue 24): ``report`` and ``claims`` need none of its code, ``landscape`` imports it only
with ``--allow-import MODULE``, from the folder the run was made in when that folder holds the run
directory; never from a path ``meta.json`` names, never a module the user did not allow."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from swalab.lab.files import RunFileError
from swalab.lab.runschema import check_meta

MODULE = """
from pathlib import Path

import torch
from torch import nn

from swalab.data import DataBundle, Split

Path(__file__).with_name("IMPORTED-" + {tag!r}).write_text("")  # proof of an import


def tiny_mlp(in_shape, num_outputs, hidden=32):
    return nn.Sequential(
        nn.Flatten(), nn.Linear(in_shape[0], hidden), nn.ReLU(), nn.Linear(hidden, num_outputs)
    )


def my_sgd(run):
    from swalab.lab.methods import METHODS

    return METHODS.get("sgd")(run)


def blobs(*, root="data", download=False, seed=0, n=600):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 2, generator=g) + 3 * nn.functional.one_hot(y, 3)[:, :2].float()
    part = lambda s: Split(x[s], y[s])  # noqa: E731
    return DataBundle(
        "blobs", "classification", part(slice(0, 400)), part(slice(0, 0)), part(slice(400, n)),
        3, (2,),
    )
"""

CONFIG = """
name: mine
seeds: [0]
data: {name: "mylab:blobs", options: {n: 450}}
model: {name: "mylab:tiny_mlp", options: {hidden: 8}}
train: {epochs: 2, batch_size: 50, lr: 0.05, augment: false, threads: 1}
methods:
  - {method: sgd}
  - {method: swa, options: {swa_lr: 0.02, swa_start: 2}}
  - {method: "mylab:my_sgd", label: mine}
landscape: {line_points: 5}
posthoc: {run: swa}
"""


def swalab(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)  # only what the command itself puts on sys.path
    return subprocess.run(
        [sys.executable, "-m", "swalab", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The README's flow: ``mylab.py`` + ``mine.yaml``, ``swalab run mine.yaml --out runs/mine``."""
    root = tmp_path_factory.mktemp("i24d")
    proj = root / "proj"
    proj.mkdir()
    (proj / "mylab.py").write_text(textwrap.dedent(MODULE.format(tag="proj")))
    (proj / "mine.yaml").write_text(CONFIG)
    done = swalab(proj, "run", "mine.yaml", "--out", "runs/mine", "--jobs", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    (proj / "run.out").write_text(done.stdout)
    (proj / "IMPORTED-proj").unlink()  # the run imported it; from here on, only reads
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return proj, elsewhere


def test_the_run_records_where_its_module_came_from(project):
    proj, _ = project
    meta = json.loads((proj / "runs" / "mine" / "meta.json").read_text())
    assert meta["imports"] == {"mylab": {"directory": str(proj.resolve()), "above_run": 2}}
    # the next steps the run prints: the landscape, which rebuilds the model, allows its module
    hint = "swalab landscape runs/mine --what predictions --allow-import mylab\n"
    assert hint in (proj / "run.out").read_text()


@pytest.mark.parametrize("command", ["report", "claims"])
def test_report_and_claims_need_none_of_the_runs_code(project, command):
    proj, elsewhere = project
    run = proj / "runs" / "mine"
    done = swalab(elsewhere, command, str(run))
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (proj / "IMPORTED-proj").exists()  # nothing imported without the flag...
    done = swalab(elsewhere, command, str(run), "--allow-import", "mylab")
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (proj / "IMPORTED-proj").exists()  # ... nor with it: nothing needed the model
    if command == "report":
        assert "sgd" in (run / "report" / "report.md").read_text()


def test_landscape_imports_the_module_only_when_allowed(project):
    proj, elsewhere = project
    run = proj / "runs" / "mine"
    shutil.rmtree(run / "landscape", ignore_errors=True)
    err = one_line(swalab(elsewhere, "landscape", str(run), "--what", "line"))
    assert "would import module 'mylab'" in err and err.endswith("pass --allow-import mylab")
    assert not (run / "landscape").exists() and not (proj / "IMPORTED-proj").exists()
    # a module-name mismatch: allowing another module (or a submodule) allows nothing here
    for other in ("mylib", "mylab.sub"):
        err = one_line(swalab(elsewhere, "landscape", str(run), "--allow-import", other))
        assert err.endswith("pass --allow-import mylab"), err
    assert not (run / "landscape").exists() and not (proj / "IMPORTED-proj").exists()
    # a different mylab.py in the working directory: the run's own module is the one imported
    (elsewhere / "mylab.py").write_text(textwrap.dedent(MODULE.format(tag="decoy")))
    try:
        done = swalab(elsewhere, "landscape", str(run), "--allow-import", "mylab", "--what", "line")
    finally:
        (elsewhere / "mylab.py").unlink()
    assert done.returncode == 0, done.stdout + done.stderr
    assert (proj / "IMPORTED-proj").exists() and not (elsewhere / "IMPORTED-decoy").exists()
    (proj / "IMPORTED-proj").unlink()
    data = json.loads((run / "landscape" / "landscape.json").read_text())
    assert "line" in json.dumps(data)


def test_a_run_moved_out_of_its_project_names_where_its_module_was(project, tmp_path):
    proj, elsewhere = project
    moved = tmp_path / "moved"
    shutil.copytree(proj / "runs" / "mine", moved)
    err = one_line(swalab(elsewhere, "landscape", str(moved), "--allow-import", "mylab"))
    assert "cannot import module 'mylab'" in err
    assert f"the run imported it from {proj.resolve()}" in err
    assert not (proj / "IMPORTED-proj").exists()  # a path the file names is never searched
    assert swalab(elsewhere, "report", str(moved)).returncode == 0  # the report needs no code


def test_meta_json_cannot_point_the_import_anywhere(project, tmp_path):
    """The folder searched is the one that holds the run now; ``meta.json`` only says how far up."""
    proj, elsewhere = project
    moved = tmp_path / "a" / "moved"
    shutil.copytree(proj / "runs" / "mine", moved)
    meta_path = moved / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["imports"]["mylab"] = {"directory": str(proj), "above_run": None}
    meta_path.write_text(json.dumps(meta))
    err = one_line(swalab(elsewhere, "landscape", str(moved), "--allow-import", "mylab"))
    assert "cannot import module 'mylab'" in err and not (proj / "IMPORTED-proj").exists()
    # one level up is tmp_path/a: a mylab.py there is the run's folder, imported when allowed
    (tmp_path / "a" / "mylab.py").write_text(textwrap.dedent(MODULE.format(tag="beside")))
    meta["imports"]["mylab"]["above_run"] = 1
    meta_path.write_text(json.dumps(meta))
    done = swalab(elsewhere, "landscape", str(moved), "--allow-import", "mylab", "--what", "line")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "a" / "IMPORTED-beside").exists()


@pytest.mark.parametrize(
    "imports",
    [
        [],
        {"my/lab": {"directory": "/x", "above_run": 1}},
        {"mylab": {"directory": 3, "above_run": 1}},
        {"mylab": {"directory": "/x", "above_run": 0}},
        {"mylab": {"directory": "/x", "above_run": True}},
        {"mylab": "/x"},
    ],
)
def test_meta_imports_schema(tmp_path, imports):
    path = tmp_path / "meta.json"
    with pytest.raises(RunFileError, match=f"cannot read {path}: 'imports'"):
        check_meta(path, {"command": ["swalab"], "imports": imports})
    good = {
        "mylab": {"directory": "/x", "above_run": 2},
        "pkg": {"directory": "/y", "above_run": None},
    }
    assert check_meta(path, {"imports": good})["imports"] == good


def test_run_roots_serve_allowed_modules_only_inside_the_block(tmp_path, monkeypatch):
    from swalab.registry import (
        UntrustedImportError,
        import_callable,
        imports_limited_to,
        trust_run_roots,
    )

    (tmp_path / "modx_i24d.py").write_text("def seven():\n    return 7\n")
    monkeypatch.chdir(tmp_path.parent)  # not the working directory
    monkeypatch.delitem(sys.modules, "modx_i24d", raising=False)
    root = str(tmp_path)
    with imports_limited_to(["other"]):
        assert trust_run_roots({"modx_i24d": root}, {"modx_i24d": root}) == []
        with pytest.raises(UntrustedImportError, match="pass --allow-import modx_i24d$"):
            import_callable("modx_i24d:seven", "model")
    assert root not in sys.path
    with imports_limited_to(["modx_i24d"]):
        assert trust_run_roots({"modx_i24d": root}, {}) == ["modx_i24d"]
        assert import_callable("modx_i24d:seven", "model")() == 7
        assert sys.path[0] == root
    assert root not in sys.path  # taken off when the block ends
    sys.modules.pop("modx_i24d", None)


def test_the_report_names_where_the_runs_modules_came_from(project):
    proj, _ = project
    report = (proj / "runs" / "mine" / "report" / "report.md").read_text()
    assert f"| imports | mylab ({proj.resolve()}) |" in report


def test_posthoc_imports_the_module_only_when_allowed(project):
    proj, elsewhere = project
    run = proj / "runs" / "mine"
    err = one_line(swalab(elsewhere, "posthoc", str(run), "--start", "1", "--end", "2"))
    assert "would import module 'mylab'" in err and err.endswith("pass --allow-import mylab")
    assert not (run / "posthoc.csv").exists() and not (proj / "IMPORTED-proj").exists()
    done = swalab(
        elsewhere, "posthoc", str(run), "--start", "1", "--end", "2", "--allow-import", "mylab"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (run / "posthoc.csv").exists() and (proj / "IMPORTED-proj").exists()
    (proj / "IMPORTED-proj").unlink()
