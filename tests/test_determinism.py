"""Issue 23, class 4: with a stochastic model (dropout), ``--jobs 1``, ``--jobs 2`` and a run killed
after a checkpoint and resumed give bit-identical results and weights.

Whatever draws from the global RNG between epochs (evaluation, BatchNorm recomputation of an
average, the end of a run) must leave it as the checkpoint saved it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from swalab.cli import main
from swalab.lab.rundir import RunFiles

SETTINGS = [
    "seeds=[0, 1]",
    "train.epochs=4",
    "train.eval_every=1",
    "data.train_size=200",
    "data.test_size=100",
    "model={name: 'dropout_model:build', options: {}}",
    "landscape.pieces=[]",
    "methods=[{method: sgd}, {method: swa, options: {swa_start: 1}}]",
]


def _run(out: Path, jobs: int) -> int:
    args = ["run", "mnist1d", "--out", str(out), "--jobs", str(jobs)]
    for item in SETTINGS:
        args += ["--set", item]
    return main(args)


def _outcome(out: Path) -> dict[str, object]:
    found: dict[str, object] = {}
    for label in ("sgd", "swa"):
        for seed in (0, 1):
            path = out / label / f"seed{seed}"
            row = json.loads((path / "result.json").read_text())
            row.pop("seconds")
            found[f"{label}/{seed}/result"] = row
            found[f"{label}/{seed}/metrics"] = (path / "metrics.jsonl").read_text()
            final = torch.load(path / "final.pt", weights_only=True)
            found[f"{label}/{seed}/final"] = {k: v.tolist() for k, v in final.items()}
    return found


@pytest.fixture(scope="module")
def sequential(tmp_path_factory) -> dict[str, object]:
    out = tmp_path_factory.mktemp("det") / "jobs1"
    assert _run(out, 1) == 0
    return _outcome(out)


def test_two_jobs_equal_one_job_bit_for_bit(sequential, tmp_path):
    assert _run(tmp_path / "jobs2", 2) == 0
    assert _outcome(tmp_path / "jobs2") == sequential


@pytest.mark.parametrize("after", [1, 2, 3])
def test_killed_after_a_checkpoint_and_resumed_is_bit_identical(
    sequential, tmp_path, monkeypatch, after
):
    """The process dies right after the ``after``-th checkpoint is written (the worst moment: the
    in-memory RNG has moved on past what the checkpoint holds only if side work drew from it)."""
    out = tmp_path / "killed"
    save = RunFiles.save_checkpoint
    calls = [0]

    def dying(self, state):
        save(self, state)
        calls[0] += 1
        if calls[0] == after:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunFiles, "save_checkpoint", dying)
    assert _run(out, 1) == 130
    monkeypatch.setattr(RunFiles, "save_checkpoint", save)
    assert _run(out, 1) == 0
    assert _outcome(out) == sequential
