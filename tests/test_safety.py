"""Issue 14: a run directory from someone else is safe to open, and bad input fails before work.

Every test here fails on the code before the fix: pickled code runs on resume, writes follow planted
symlinks, labels lead out of --out, files are created 0600, bad values train or crash late.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from swalab.cli import main
from swalab.lab.config import ConfigError, load_config
from swalab.lab.files import (
    LOCK_NAME,
    RunFileError,
    append_text,
    atomic_output,
    atomic_save,
    atomic_write_text,
    holds_files,
    load_torch,
)
from swalab.lab.rundir import RunDirectory

TINY = [
    "seeds=[0]",
    "train.epochs=3",
    "data.train_size=200",
    "data.test_size=200",
    "methods=[{method: sgd}, {method: swa, options: {swa_start: 2}}]",
]


def tiny_args(out: Path, *extra: str) -> list[str]:
    # one process: a bad run file stops the run with one line (under --jobs N, the default auto,
    # that run fails alone and the others go on: tests/test_jobs.py)
    args = ["run", "mnist1d", "--out", str(out), "--jobs", "1"]
    for item in [*TINY, *extra]:
        args += ["--set", item]
    return args


class Payload:
    """An extra pickled object whose unpickling creates ``marker`` (stands in for any shell command)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("swalab: error: ") and "Traceback" not in err, (
        err
    )
    return err


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A real small run: pre-training cache, trajectories, SGD and SWA, every file of a run directory."""
    out = tmp_path_factory.mktemp("safety") / "run"
    assert main(tiny_args(out, "pretrain.epochs=1", "train.save_trajectory=true")) == 0
    return out


@pytest.fixture
def run(finished, tmp_path) -> Path:
    """A private copy of the finished run."""
    return Path(shutil.copytree(finished, tmp_path / "run", symlinks=True))


# --- finding 1: no code runs from a received run directory ----------------------------------------


def test_every_file_of_a_real_run_loads_weights_only(finished):
    names = sorted(str(p.relative_to(finished)) for p in finished.rglob("*.pt"))
    trajectory = [f"trajectory/epoch{n:05d}.pt" for n in (1, 2, 3)]  # one file per epoch
    # the preset's posthoc.run: auto makes the swa run keep post-hoc snapshots too
    posthoc = ["posthoc/resume.pt", *(f"posthoc/snapshot-{n:08d}.pt" for n in (1, 2, 3))]
    assert names == ["pretrain/seed0.pt"] + sorted(
        f"{label}/seed0/{name}"
        for label in ("sgd", "swa")
        for name in ("checkpoint.pt", "final.pt", "init.pt", *trajectory)
        + (tuple(posthoc) if label == "swa" else ())
    )
    for name in names:
        assert load_torch(finished / name) is not None
    ckpt = load_torch(finished / "swa" / "seed0" / "checkpoint.pt")
    assert (
        ckpt["generator"].dtype == torch.uint8 and ckpt["optimizer"]["state"]
    )  # RNG and optimizer state
    assert len(RunDirectory(finished).run("swa", 0).trajectory()) == 3


def test_malicious_checkpoint_does_not_run_on_resume(run, tmp_path, capsys):
    """Done-when of issue 14: `swalab run` into a directory holding a malicious checkpoint."""
    marker = tmp_path / "PWNED"
    path = run / "swa" / "seed0" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    torch.save({**ckpt, "extra": Payload(marker)}, path)
    (path.parent / "result.json").unlink()  # the run is unfinished: the next command resumes it
    assert main(tiny_args(run, "pretrain.epochs=1", "train.save_trajectory=true")) == 2
    err = one_line_error(capsys)
    assert str(path) in err and "pickled io.open (refused" in err and f"delete {path.parent}" in err
    assert not marker.exists()


@pytest.mark.parametrize("name", ["final.pt", "init.pt", "trajectory/epoch00001.pt"])
def test_malicious_run_files_do_not_run_in_landscape(run, tmp_path, capsys, name):
    marker = tmp_path / "PWNED"
    path = run / "sgd" / "seed0" / name
    torch.save({"weights": torch.zeros(2), "extra": Payload(marker)}, path)
    what = {"final.pt": "line", "init.pt": "plane_init", "trajectory/epoch00001.pt": "plane_init"}[
        name
    ]
    assert main(["landscape", str(run), "--what", what, "--grid", "2", "--line-points", "2"]) == 2
    assert str(path) in one_line_error(capsys) and not marker.exists()


def test_malicious_pretrain_cache_is_refused(run, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    torch.save({"extra": Payload(marker)}, run / "pretrain" / "seed0.pt")
    shutil.rmtree(run / "sgd")  # sgd trains again from the cache
    assert main(tiny_args(run, "pretrain.epochs=1", "train.save_trajectory=true")) == 2
    err = one_line_error(capsys)
    assert "pretrain/seed0.pt" in err and "pre-train that seed again" in err and not marker.exists()


# --- finding 2: no write goes through a symlink ---------------------------------------------------


def test_atomic_writes_replace_a_planted_link_and_leave_its_target(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    import matplotlib.pyplot as plt

    from swalab.report.figures import _save
    from swalab.report.geometry import _savez

    writers = {
        "a.txt": lambda p: atomic_write_text(p, "new"),
        "b.pt": lambda p: atomic_save({"w": torch.ones(1)}, p),
        "c.npz": lambda p: _savez(p, x=np.ones(2)),
        "d.png": lambda p: _save(plt.figure(), p),
    }
    for name, write in writers.items():
        link = tmp_path / "run" / name
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(victim)
        write(link)
        assert (
            victim.read_text() == "precious" and not link.is_symlink() and link.stat().st_size > 0
        )
    plt.close("all")
    log = tmp_path / "run" / "log"
    log.symlink_to(victim)
    with pytest.raises(RunFileError, match=f"refusing to write {log}: it is a symlink"):
        append_text(log, "x")
    assert victim.read_text() == "precious"


def test_report_does_not_write_through_planted_links(run, tmp_path):
    assert main(["report", str(run), "--html"]) == 0
    written = sorted(p for p in (run / "report").iterdir())
    assert written
    victim = tmp_path / "victim"
    victim.write_text("precious")
    for path in written:
        path.unlink()
        path.symlink_to(victim)
    assert main(["report", str(run), "--html"]) == 0
    assert victim.read_text() == "precious"
    assert all(p.is_file() and not p.is_symlink() for p in written)


def test_write_test_link_in_out_is_not_followed(run, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (run / ".write-test").symlink_to(victim)
    assert main(tiny_args(run, "pretrain.epochs=1", "train.save_trajectory=true")) == 0
    assert victim.read_text() == "precious"


def test_symlinked_folder_inside_the_run_is_refused(run, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(run / "swa")
    (run / "swa").symlink_to(elsewhere, target_is_directory=True)
    assert main(tiny_args(run, "pretrain.epochs=1", "train.save_trajectory=true")) == 2
    assert "is a symlink" in one_line_error(capsys) and not any(elsewhere.rglob("*.*"))


def test_symlinked_report_folder_is_refused(run, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / "report").symlink_to(elsewhere, target_is_directory=True)
    assert main(["report", str(run)]) == 2
    assert f"{run / 'report'} is a symlink" in one_line_error(capsys)
    assert not any(elsewhere.iterdir())


def test_run_files_that_are_not_regular_files_are_refused(run, capsys):
    checkpoint = run / "swa" / "seed0" / "checkpoint.pt"
    checkpoint.unlink()
    os.mkfifo(checkpoint)
    (checkpoint.parent / "result.json").unlink()
    assert main(tiny_args(run, "pretrain.epochs=1", "train.save_trajectory=true")) == 2
    assert f"cannot read {checkpoint}: not a regular file" in one_line_error(capsys)
    checkpoint.unlink()
    checkpoint.symlink_to("/dev/zero")
    assert main(tiny_args(run, "pretrain.epochs=1", "train.save_trajectory=true")) == 2
    assert f"cannot read {checkpoint}: it is a symlink" in one_line_error(capsys)
    config = run / "config.yaml"
    config.unlink()
    config.symlink_to("/dev/zero")
    checkpoint.unlink()
    assert main(tiny_args(run, "pretrain.epochs=1", "train.save_trajectory=true")) == 2
    assert f"cannot read {config}: it is a symlink" in one_line_error(capsys)


# --- finding 3: labels and names stay inside --out, and are unique ------------------------------------


@pytest.mark.parametrize(
    "label",
    [
        "../ESCAPE",
        "/abs/path",
        "sgd/",
        "a/b",
        ".",
        "..",
        ".hidden",
        "x\x00y",
        "tab\there",
        "x" * 101,
        " sgd",
        "a\\b",
        "pretrain",
        "report",
    ],
)
def test_labels_are_single_safe_folder_names(label):
    with pytest.raises(ConfigError, match=r"methods\[0\]\.label must be"):
        load_config("mnist1d", [f"methods=[{{method: sgd, label: {json.dumps(label)}}}]"])


def test_traversal_label_writes_nothing_outside_out(tmp_path, capsys):
    out = tmp_path / "deep" / "out"
    code = main(tiny_args(out, "methods=[{method: sgd, label: ../../ESCAPE}]"))
    assert code == 2 and "label must be" in one_line_error(capsys)
    assert not (tmp_path / "ESCAPE").exists() and not out.exists()


def test_absolute_name_without_out_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "run",
                "mnist1d",
                "--set",
                f"name={tmp_path}/abs",
                *[arg for item in TINY for arg in ("--set", item)],
            ]
        )
        == 2
    )
    assert "name must be a plain folder name" in one_line_error(capsys)
    assert not (tmp_path / "abs").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "other, message",
    [
        ("sgd/", r"methods\[1\]\.label must be a plain folder name"),
        (
            "SGD",
            "labels must be unique, got 'SGD' and 'sgd' \\(the same folder name\\)",
        ),
        ("ｓｇｄ", "labels must be unique, got 'ｓｇｄ' and 'sgd'"),
        ("sgd", "labels must be unique, got 'sgd' more than once"),
    ],
)
def test_labels_unique_after_normalisation(other, message):
    with pytest.raises(ConfigError, match=message):
        load_config("mnist1d", [f"methods=[{{method: sgd}}, {{method: sgd, label: '{other}'}}]"])


def test_ordinary_labels_still_accepted():
    cfg = load_config(
        "mnist1d",
        [
            (
                "methods=[{method: sgd}, {method: swa, budget: 1.5}, "
                "{method: swa, label: 'swa lr=0.05 (paper)'}]"
            )
        ],
    )
    assert [m.label for m in cfg.methods] == ["sgd", "swa-1.5B", "swa lr=0.05 (paper)"]


# --- findings 5-7: every value checked before any work, one line, exit 2 ----------------------------


ALIAS_BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n" + "".join(
    f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n"
    for p, c in zip("bcdefgh", "cdefghi")
)


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--device", "foo"],
            "--device must be auto, cpu, cuda, cuda:N or mps, got 'foo'",
        ),
        (["--set", "train.device=foo"], "train.device must be auto, cpu, cuda"),
        (["--set", "train.threads=0"], "train.threads must be >= 1 or null, got 0"),
        (["--set", "data.train_size=0"], "data.train_size must be > 0 or null, got 0"),
        (
            ["--set", "train.weight_decay=.inf"],
            "train.weight_decay must be a finite number >= 0, got inf",
        ),
        (
            ["--set", "train.momentum=.nan"],
            "train.momentum must be a finite number in [0, 1), got nan",
        ),
        (["--set", "train.epochs=2.5"], "train.epochs must be int, got 2.5"),
        (
            ["--set", "model.options.bn=maybe"],
            "model.options.bn must be bool, got 'maybe'",
        ),
        (
            ["--set", "methods.swa.budget=.inf"],
            "budget must be in (0, 100], got inf",
        ),
        (["--set", "methods.swa.lr=.nan"], "lr must be a finite number > 0, got nan"),
        (
            ["--set", "methods.swa.options.swa_lr=.nan"],
            "methods.swa.options.swa_lr must be a finite number",
        ),
        (
            ["--set", "methods=[{method: sgd, label: %s}]" % ("x" * 300)],
            "label must be a plain folder name",
        ),
        (["--set", "train.augment=maybe"], "train.augment must be bool, got 'maybe'"),
        (["--set", "seeds=[-1]"], "seeds must be in [0, 2**31)"),
        (["--set", "x=[&a 1, *a]"], "YAML aliases are not supported"),
        (
            ["--set", "model.options.width=3"],
            "unknown model.options ['width'] for model 'mnist1d_cnn'",
        ),
        (
            ["--set", "data.options.noise=3"],
            "unknown data.options ['noise'] for dataset 'mnist1d'",
        ),
    ],
)
def test_cli_bad_values_fail_before_any_work(extra, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "mnist1d", "--out", str(out), *extra]) == 2
    assert message in one_line_error(capsys)
    assert not out.exists()  # nothing written, nothing trained


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without a GPU"
)
@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_cli_cuda_without_a_gpu(device, tmp_path, capsys):
    assert main(["run", "mnist1d", "--out", str(tmp_path / "out"), "--device", device]) == 2
    assert "no CUDA GPU is available here" in one_line_error(capsys)


def test_cli_empty_out_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "mnist1d", "--out", ""]) == 2
    assert "--out must be a directory path, got ''" in one_line_error(capsys)
    assert not any(tmp_path.iterdir())


def test_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    assert len(ALIAS_BOMB) < 600
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    assert (
        "YAML aliases are not supported" in one_line_error(capsys)
        and not (tmp_path / "out").exists()
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ray-distance", "-1"], "--ray-distance must be finite and > 0, got -1.0"),
        (["--margin", "nan"], "--margin must be finite and >= 0, got nan"),
        (["--rise", "inf"], "--rise must be finite and > 0, got inf"),
        (["--threads", "0"], "--threads must be in [1, 1024], got 0"),
        (["--device", "foo"], "--device must be auto, cpu, cuda"),
    ],
)
def test_landscape_bad_options(finished, extra, message, capsys):
    before = sorted(finished.rglob("*"))
    assert main(["landscape", str(finished), *extra]) == 2
    assert message in one_line_error(capsys)
    assert sorted(finished.rglob("*")) == before


# --- finding 6: a corrupt file is named in one line -------------------------------------------------


@pytest.mark.parametrize(
    "name, command",
    [
        ("swa/seed0/checkpoint.pt", "run"),
        ("swa/seed0/result.json", "run"),
        ("config.yaml", "run"),
        ("sgd/seed0/final.pt", "landscape"),
        ("config.yaml", "report"),
        ("swa/seed0/metrics.jsonl", "report"),
    ],
)
def test_corrupt_run_file_is_named(run, name, command, capsys):
    path = run / name
    path.write_bytes(b"\x00garbage{")
    if name.endswith("checkpoint.pt"):
        (path.parent / "result.json").unlink()
    argv = {
        "run": tiny_args(run, "pretrain.epochs=1", "train.save_trajectory=true"),
        "landscape": ["landscape", str(run), "--what", "line", "--line-points", "2"],
        "report": ["report", str(run)],
    }[command]
    assert main(argv) == 2
    assert str(path) in one_line_error(capsys)


def test_corrupt_predictions_npz_is_named(tmp_path, capsys):
    from test_report import make_run

    run = make_run(tmp_path / "run")
    (run / "landscape").mkdir()
    (run / "landscape" / "landscape.json").write_text('{"seed": 0, "predictions": {}}')
    (run / "landscape" / "predictions.npz").write_bytes(b"PK\x03\x04 not a zip")
    assert main(["report", str(run)]) == 2
    assert str(run / "landscape" / "predictions.npz") in one_line_error(capsys)


def test_restart_run_retrains_a_run_with_a_bad_file(run, capsys):
    args = tiny_args(run, "pretrain.epochs=1", "train.save_trajectory=true")
    expected = (run / "swa" / "seed0" / "result.json").read_text()
    (run / "swa" / "seed0" / "result.json").write_text("{")
    assert main(args) == 2
    assert "run again with --restart-run swa" in one_line_error(capsys)
    assert main([*args, "--restart-run", "nope"]) == 2
    assert "--restart-run 'nope' is not a method label" in one_line_error(capsys)
    assert main([*args, "--restart-run", "swa"]) == 0
    retrained = json.loads((run / "swa" / "seed0" / "result.json").read_text())
    old = json.loads(expected)
    assert {k: v for k, v in retrained.items() if k != "seconds"} == {
        k: v for k, v in old.items() if k != "seconds"
    }  # the same run, trained again bit-identically on the CPU


def test_resnet50_weights_that_are_not_a_torch_file(tmp_path):
    from swalab.models.resnet import load_pretrained

    path = tmp_path / "resnet50.pth"
    path.write_text("<html>404</html>")
    with pytest.raises(ValueError, match=f"{path} is not a torchvision resnet50 state_dict"):
        load_pretrained(torch.nn.Linear(1, 1), path)


# --- finding 6-7: disk full, temp files, umask, the --out lock -----------------------------------


def test_disk_full_is_one_line_leaves_no_temp_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "run" / "result.json"
    atomic_write_text(target, "old")
    with pytest.raises(RunFileError) as info, atomic_output(target) as tmp:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert str(info.value) == (
        f"cannot write {target}: No space left on device; free some space and run "
        "the same command again to continue"
    )
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == [
        "result.json"
    ]


def test_torch_save_failure_leaves_no_temp(tmp_path, monkeypatch):
    def broken_save(obj, f):
        Path(f).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RunFileError, match=f"cannot write {tmp_path / 'x.pt'}"):
        atomic_save({}, tmp_path / "x.pt")
    assert not any(tmp_path.iterdir())


def test_orphan_temp_files_and_the_lock_do_not_block_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    orphan = out / ".config.yaml.tmp-abcd1234.yaml"  # left by a process killed mid-write
    orphan.write_text("half")
    (out / LOCK_NAME).write_text("")
    old_orphan = out / ".config.yaml.k2j4_x9a.yaml"  # the temp name before this fix
    old_orphan.write_text("half")
    assert not holds_files(out)
    assert main(tiny_args(out, "methods=[{method: sgd}]", "train.epochs=1")) == 0
    assert not orphan.exists() and (out / "results.csv").is_file()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_save({"w": torch.ones(1)}, tmp_path / "b.pt")
        append_text(tmp_path / "c.log", "x\n")
    finally:
        os.umask(old)
    for name in ("a.txt", "b.pt", "c.log"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode


def test_second_process_on_the_same_out_with_another_config_exits_2(tmp_path, capsys):
    from swalab.lab.leases import Claims

    out = tmp_path / "out"
    with Claims(out) as other:  # another process has set up --out and writes it
        assert other.claim("writers/node7-1")
        RunDirectory(out).write_config({"name": "mnist1d", "train": {"lr": 0.5}})
        assert main(tiny_args(out)) == 2  # (the same config shares it: tests/test_shared_runs.py)
    assert "being written by another swalab process with a different config" in one_line_error(
        capsys
    )
    assert sorted(p.name for p in out.iterdir()) == [".claims", "config.yaml"]  # nothing more


# --- issue 23, class 2: reading a run imports no code it names -------------------------------------


@pytest.mark.parametrize("command", ["report", "claims", "landscape"])
def test_reading_a_run_never_imports_code_it_names(tmp_path, capsys, monkeypatch, command):
    from test_report import make_run

    run = make_run(tmp_path / "run")
    marker = tmp_path / "PWNED"
    (run / "evilmod.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef build(in_shape, num_outputs):\n    return None\n"
    )
    config = run / "config.yaml"
    data = yaml.safe_load(config.read_text())
    data["model"] = {"name": "evilmod:build", "options": {}}
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.chdir(run)  # the working directory is not put on sys.path
    monkeypatch.delitem(__import__("sys").modules, "evilmod", raising=False)
    if command != "landscape":  # results and claims need no model: nothing is imported (issue 24)
        assert main([command, str(run)]) == 0
        capsys.readouterr()
        assert not marker.exists()
        return
    assert main([command, str(run)]) == 2
    err = one_line_error(capsys)
    assert "would import module 'evilmod'" in err and "--allow-import evilmod" in err
    assert str(config) in err and not marker.exists()
    # the user says so on the command line: the module is imported (what it does next is theirs)
    with contextlib.suppress(Exception):  # the stand-in builds no real model
        main([command, str(run), "--allow-import", "evilmod"])
    capsys.readouterr()
    assert marker.exists()
    __import__("sys").modules.pop("evilmod", None)


@pytest.mark.parametrize("command", ["report", "claims", "run"])
def test_hand_edited_config_of_a_run_is_refused(run, capsys, command):
    config = run / "config.yaml"
    text = config.read_text()
    assert text.startswith("# swalab run wrote this file; sha256 of what follows: ")
    config.write_text(text.replace("lr: 0.1", "lr: 0.05", 1))
    assert config.read_text() != text
    argv = (
        tiny_args(run, "pretrain.epochs=1", "train.save_trajectory=true")
        if command == "run"
        else [command, str(run)]
    )
    assert main(argv) == 2
    assert f"{config} was edited after `swalab run` wrote it" in one_line_error(capsys)
    config.write_text(text)  # restored: the run reads again
    assert main(["report", str(run)]) == 0


# --- issue 23, class 3: nothing touched outside the run, workers die with the main process ---------


def _tree(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def test_out_that_is_not_a_run_is_refused_before_anything_is_touched(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    (out / ".draft.tmp-abcd1234.txt").write_text("looks like our temp file")
    (out / "sub" / ".x.tmp-zzzz9999").write_text("so does this")
    before = _tree(out)
    assert main(tiny_args(out)) == 2
    assert f"{out} is not empty and holds no swalab run" in one_line_error(capsys)
    assert _tree(out) == before  # nothing removed, no lock file, no probe


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_job_workers_die_with_a_killed_main_process(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    args = tiny_args(out, "train.epochs=200", "seeds=[0, 1]")
    args[args.index("--jobs") + 1] = "2"
    main_process = subprocess.Popen(
        [sys.executable, "-m", "swalab", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline, workers = time.monotonic() + 120, []
        while time.monotonic() < deadline:
            workers = [
                int(p.name)
                for p in Path("/proc").iterdir()
                if p.name.isdigit()
                and _alive(int(p.name))
                and f"PPid:\t{main_process.pid}\n" in _status(p)
            ]
            metrics = list(out.glob("*/seed*/metrics.jsonl"))
            if len(workers) >= 2 and metrics:  # the workers are training
                break
            time.sleep(0.2)
        assert len(workers) >= 2, "the workers did not start"
    finally:
        main_process.send_signal(signal.SIGKILL)
        main_process.wait()
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in workers)
    frozen = _tree(out)
    time.sleep(1.0)
    assert _tree(out) == frozen  # nothing written after the main process died


def _status(proc: Path) -> str:
    try:
        return (proc / "status").read_text()
    except OSError:
        return ""


# --- issue 23, class 5: validation before work, and upper bounds ------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "train.threads=100000"], "train.threads must be in [1, 1024], got 100000"),
        (
            ["--set", "train.epochs=1000000000"],
            "train.epochs must be in [1, 100000], got 1000000000",
        ),
        (
            ["--set", "pretrain.epochs=1000000"],
            "pretrain.epochs must be in [0, 100000], got 1000000",
        ),
        (["--seeds", "100000"], "--seeds must be in [1, 10000], got 100000"),
        (["--seeds", "0"], "--seeds must be in [1, 10000], got 0"),
        (["--set", "methods.swa.budget=1000"], "budget must be in (0, 100], got 1000.0"),
        (["--set", "landscape.grid=100000"], "landscape.grid must be in [2, 1001], got 100000"),
        (["--set", "landscape.rays=1000000"], "landscape.rays must be in [1, 100000], got 1000000"),
        *[
            (
                ["--set", f"methods=[{{method: sgd, label: {name}}}]"],
                "methods[0].label must be not one of",
            )
            for name in ("results.csv", "config.yaml", "meta.json", "Results.CSV")
        ],
        (
            ["--set", "model={name: mlp, options: {hidden: [0]}}"],
            "model.options: hidden width must be an int > 0, got 0",
        ),
        (
            ["--set", "model={name: mlp, options: {activation: swish2}}"],
            "model.options: activation must be one of",
        ),
        (
            ["--set", "data.options.val_size=999999"],
            "data.options: val_size must be",
        ),
        (
            ["--set", "model={name: resnet50, options: {weights: /nonexistent/r50.pth}}"],
            "model.options.weights: no file /nonexistent/r50.pth",
        ),
    ],
)
def test_values_and_bounds_fail_before_any_work(extra, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "mnist1d", "--out", str(out), *extra]) == 2
    assert message in one_line_error(capsys)
    assert not out.exists()  # nothing written, nothing trained


def test_offline_dataset_is_checked_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    root = tmp_path / "nodata"
    argv = ["run", "mnist1d", "--out", str(out), "--set", f"data={{name: cifar10, root: {root}}}"]
    assert main([*argv, "--set", "model={name: small_cnn, options: {}}"]) == 2
    assert f"CIFAR-10 not found in {root / 'cifar-10-batches-py'}; run with --download" in (
        one_line_error(capsys)
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--grid", "100000"], "--grid must be in [2, 1001], got 100000"),
        (["--line-points", "1000000"], "--line-points must be in [2, 100001], got 1000000"),
        (["--rays", "1000000"], "--rays must be in [1, 100000], got 1000000"),
        (["--threads", "5000"], "--threads must be in [1, 1024], got 5000"),
    ],
)
def test_landscape_upper_bounds(finished, extra, message, capsys):
    before = sorted(finished.rglob("*"))
    assert main(["landscape", str(finished), *extra]) == 2
    assert message in one_line_error(capsys)
    assert sorted(finished.rglob("*")) == before


def test_lightning_callback_checks_bn_options_before_training():
    pl = pytest.importorskip("lightning.pytorch")
    from torch.utils.data import DataLoader, TensorDataset

    from swalab.integrations.lightning import AveragingCallback

    for value in (0, -1, 2.5, True):
        with pytest.raises(
            ValueError, match=f"bn_max_batches must be an integer >= 1 or None, got {value!r}"
        ):
            AveragingCallback(bn_max_batches=value)
    with pytest.raises(ValueError, match="bn_loader must be an iterable of batches, got int"):
        AveragingCallback(bn_loader=3)

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
            self.steps = 0

        def training_step(self, batch, batch_idx):
            self.steps += 1
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = TensorDataset(torch.randn(8, 2))
    empty = DataLoader(TensorDataset(torch.randn(0, 2)), batch_size=4)
    net = Net()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[AveragingCallback(bn_loader=empty)],
    )
    with pytest.raises(ValueError, match="bn_loader yields no batches"):
        trainer.fit(net, DataLoader(data, batch_size=4))
    assert net.steps == 0  # refused at setup, not after all of training


# --- issue 23, done-when: every run file through every kind of damage, for each command reading it --

DAMAGES = ["missing", "empty", "truncated", "wrong type", "fifo", "symlink in", "symlink out",
           "hard link", "huge"]  # fmt: skip
# where a damage may leave a readable run: the command goes on (exit 0) or stops with one line
LENIENT = {"missing", "hard link"}
# (run file, a sibling of the same kind for "symlink in", the command that reads it)
READERS = [
    ("config.yaml", "results.csv", "claims"),
    ("config.yaml", "results.csv", "run"),
    ("results.csv", "meta.json", "claims"),
    ("meta.json", "config.yaml", "report"),
    ("swa/seed0/metrics.jsonl", "sgd/seed0/metrics.jsonl", "report"),
    ("landscape/landscape.json", "meta.json", "claims"),
    ("swa/seed0/result.json", "sgd/seed0/result.json", "run"),
    ("swa/seed0/checkpoint.pt", "swa/seed0/final.pt", "run"),
    ("sgd/seed0/final.pt", "sgd/seed0/init.pt", "landscape"),
    ("swa/seed0/trajectory/epoch00001.pt", "swa/seed0/final.pt", "landscape"),
]


def _damage(path: Path, damage: str, sibling: Path, outside: Path) -> None:
    original = path.read_bytes()
    if damage != "missing":
        copy = outside / f"copy-of-{path.name}"
        copy.write_bytes(original)
    path.unlink()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(original[: len(original) // 2])
    elif damage == "wrong type":
        if path.suffix == ".pt":
            torch.save([1, 2, 3], path)
        elif path.suffix in (".json", ".jsonl"):
            path.write_text("[1, 2, 3]\n")
        else:  # YAML, CSV: text of another kind
            path.write_text("- 1\n- 2\n" if path.suffix == ".yaml" else "a,b\n1,2\n")
    elif damage == "fifo":
        os.mkfifo(path)
    elif damage == "symlink in":
        path.symlink_to(sibling)
    elif damage == "symlink out":
        path.symlink_to(copy)
    elif damage == "hard link":
        os.link(copy, path)
    elif damage == "huge":
        with open(path, "wb") as f:
            f.truncate((64 << 20) + 1)  # sparse: no disk used


def _outside_state(outside: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in outside.iterdir()}


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("name, sibling, command", READERS, ids=[f"{n}-{c}" for n, _, c in READERS])
def test_every_damaged_run_file_is_one_line_and_touches_nothing_outside(
    run, tmp_path, capsys, name, sibling, command, damage
):
    outside = tmp_path / "outside"
    outside.mkdir()
    path = run / name
    if name.endswith("checkpoint.pt"):
        (path.parent / "result.json").unlink()  # the run resumes from its checkpoint
    _damage(path, damage, run / sibling, outside)
    before = _outside_state(outside)
    argv = {
        "run": tiny_args(run, "pretrain.epochs=1", "train.save_trajectory=true"),
        "claims": ["claims", str(run)],
        "report": ["report", str(run)],
        "landscape": ["landscape", str(run), "--what", "line,ensemble", "--line-points", "2"],
    }[command]
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if damage in LENIENT and code == 0:
        pass
    else:
        assert code == 2, err
        lines = err.splitlines()
        if command == "landscape":  # its progress lines on stderr come first
            lines = [line for line in lines if not line.startswith("landscape: ")]
        assert len(lines) == 1 and lines[0].startswith("swalab: error: "), err
        assert str(path) in lines[0] or damage == "missing", err
    assert _outside_state(outside) == before  # nothing outside the run read-modified or written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside", "run"]


def test_installed_entry_points_stay_importable_when_reading_a_run(monkeypatch):
    from importlib.metadata import EntryPoint

    from swalab.registry import Registry, UntrustedImportError, imports_limited_to

    registry = Registry("model")
    plugin = EntryPoint("plugged", "json:dumps", "swalab.models")
    monkeypatch.setattr(Registry, "_entry_points", lambda self: {"plugged": plugin})
    with imports_limited_to([]):
        assert registry.get("plugged") is json.dumps  # installed: the user's own choice
        with pytest.raises(UntrustedImportError, match="pass --allow-import json$"):
            registry.get("json:dumps")
    with imports_limited_to(["json"]):
        assert registry.get("json:dumps") is json.dumps
    assert registry.get("json:dumps") is json.dumps  # outside: the library imports as before


def test_appends_refuse_hard_links_and_fifos(tmp_path):
    outside = tmp_path / "outside.log"
    outside.write_text("mine\n")
    linked = tmp_path / "run" / "metrics.jsonl"
    linked.parent.mkdir()
    os.link(outside, linked)
    with pytest.raises(RunFileError, match="it is a hard link"):
        append_text(linked, "{}\n")
    assert outside.read_text() == "mine\n"
    fifo = tmp_path / "run" / "fifo.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(RunFileError, match="not a regular file"):
        append_text(fifo, "{}\n")  # returns at once: no reader would block it forever


def test_report_figure_fallback_copy_follows_no_symlink(run, tmp_path, capsys):
    """An older landscape (no line.npz) has its PNG copied into the report: never from a link to
    another file (report.html would embed it), never through a link planted at the target."""
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    src = run / "landscape" / "line.png"
    (run / "landscape" / "line.npz").unlink()
    png = src.read_bytes()
    src.unlink()
    src.symlink_to(secret)
    assert main(["report", str(run), "--html"]) == 2
    assert f"cannot read {src}: it is a symlink" in one_line_error(capsys)
    written = [p for p in run.rglob("*") if p.is_file() and not p.is_symlink()]
    assert not any(b"private" in p.read_bytes() for p in written)
    src.unlink()
    src.write_bytes(png)
    target = run / "report" / "line.png"
    target.parent.mkdir(exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        target.unlink()
    target.symlink_to(secret)
    assert main(["report", str(run)]) == 0
    capsys.readouterr()
    assert secret.read_text() == "private"
    assert not target.is_symlink() and target.read_bytes() == png
