"""`swalab posthoc` on a small preset: Table 1's SWA budgets computed post hoc from the 1.5B run."""

from __future__ import annotations

import csv

import pytest
import torch

from swalab.cli import main
from swalab.lab.config import ConfigError, load_config
from swalab.lab.files import load_torch
from swalab.lab.rundir import read_results
from swalab.lab.runner import run_experiment
from swalab.posthoc import swa_window

SETS = [
    "train.epochs=6",
    "data.train_size=200",
    "seeds=[0, 1]",
    "methods=[{method: sgd}, {method: swa}, {method: swa, budget: 1.25}, "
    "{method: swa, budget: 1.5}]",
    "posthoc.run=swa-1.5B",
    "landscape.pieces=[]",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("posthoc") / "run"
    run_experiment(load_config("mnist1d", SETS), out, progress=False, log=lambda s: None)
    return out


def test_table1_budgets_post_hoc_equal_the_shared_trajectory_runs(run_dir):
    """B = 6: swa_start = int(0.8 B) + 1 = 5; SWA at 1B, 1.25B, 1.5B average epochs 5..6, 5..8 (7.5 epochs, rounded up) and
    5..9 of one trajectory (sharing.py), so the 1.5B run's snapshots give all three."""
    results = {(r["method"], int(r["seed"])): r for r in read_results(run_dir)}
    for seed in (0, 1):
        snaps = run_dir / "swa-1.5B" / f"seed{seed}" / "posthoc"
        for label, end in (("swa", 6), ("swa-1.25B", 8), ("swa-1.5B", 9)):
            final = load_torch(run_dir / label / f"seed{seed}" / "final.pt")
            post_hoc = swa_window(snaps, 5, end)
            for key, value in final.items():
                if "running" not in key and value.is_floating_point():  # BN is recomputed
                    torch.testing.assert_close(post_hoc[key], value, rtol=1e-5, atol=1e-6)
    assert main(["posthoc", str(run_dir), "--start", "1", "5", "--end", "6", "8", "9"]) == 0
    with (run_dir / "posthoc.csv").open() as f:
        rows = {(r["method"], int(r["seed"])): r for r in csv.DictReader(f)}
    assert {(int(r["start"]), int(r["end"])) for r in rows.values()} >= {
        (a, b) for a in (1, 5) for b in (6, 8, 9)
    }
    for seed in (0, 1):
        for label, end in (("swa", 6), ("swa-1.25B", 8), ("swa-1.5B", 9)):
            row, want = rows[(f"swa-1.5B[5-{end}]", seed)], results[(label, seed)]
            # same weights to float rounding, BN recomputed by the same seeded pass
            assert float(row["test_accuracy"]) == pytest.approx(float(want["test_accuracy"]))
            assert float(row["test_loss"]) == pytest.approx(float(want["test_loss"]), rel=1e-5)
    assert (run_dir / "window_map.png").stat().st_size > 10_000


def test_bad_windows_are_one_line_errors(run_dir, capsys):
    assert main(["posthoc", str(run_dir), "--start", "0", "--end", "6"]) == 2
    assert capsys.readouterr().err.strip() == (
        "swalab: error: start=0 is outside the stored epochs 1..9"
    )
    assert main(["posthoc", str(run_dir), "--start", "6", "--end", "6"]) == 2
    assert "no window with start < end in starts=[6], ends=[6]" in capsys.readouterr().err


def test_posthoc_config_is_checked():
    with pytest.raises(ConfigError, match=r"^posthoc.run must be a method label \(sgd\) or auto"):
        load_config("mnist1d", ["methods=[{method: sgd}]", "posthoc.run=x"])
    # auto: the SWA run of the largest budget, or none
    assert load_config("mnist1d").posthoc.run == "swa-1.5B"
    assert load_config("mnist1d", ["methods=[{method: sgd}]"]).posthoc.run == ""
    with pytest.raises(ConfigError, match=r"^posthoc.every must be an integer >= 1, got 0"):
        load_config("mnist1d", ["posthoc.every=0"])


def test_claim_start_reads_the_band_from_posthoc_csv(run_dir):
    """Claim 7: B = 6, starts floor(f B) + 1 for f = 0.6..0.9 are 4, 5, 5, 6; E = 9 (1.5 B)."""
    from swalab.report.claims import evaluate_claims

    claim = evaluate_claims(run_dir)[-1]
    assert claim.id == "7" and not claim.values and "--start 4 5 6 --end 9" in claim.note
    assert main(["posthoc", str(run_dir), "--start", "4", "5", "6", "--end", "9"]) == 0
    with (run_dir / "posthoc.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert any(r["start"] == "1" for r in rows)  # the earlier grid's rows are kept
    claim = evaluate_claims(run_dir)[-1]
    # the claims' primary test set: the preset's large generated one (issue 19)
    key = "large_test_accuracy" if rows[-1].get("large_test_accuracy") else "test_accuracy"
    for seed in (0, 1):
        accuracy = [
            float(r[key])
            for r in rows
            if r["seed"] == str(seed) and r["end"] == "9" and r["start"] in ("4", "5", "6")
        ]
        assert len(accuracy) == 3
        assert claim.values[seed] == pytest.approx(max(accuracy) - min(accuracy))
    assert claim.margin == 1.0 and claim.verdict in ("supported", "undecided", "contradicted")


class Killed(Exception):
    pass


def test_a_run_killed_between_snapshot_and_checkpoint_resumes_into_the_same_files(
    run_dir, tmp_path, monkeypatch
):
    """Killed after writing epoch 7's snapshot but before its checkpoint: the resumed run trains
    epoch 7 again, skips collecting it a second time, and every snapshot file equals, byte for byte,
    that of the uninterrupted run (the module's fixture, same config)."""
    from swalab.lab.rundir import RunFiles

    original = RunFiles.save_checkpoint

    def dying(self, state):
        if self.path.parent.name == "swa-1.5B" and state["epoch"] == 6:  # 0-based: epoch 7
            raise Killed(self.path)
        return original(self, state)

    out = tmp_path / "run"
    monkeypatch.setattr(RunFiles, "save_checkpoint", dying)
    with pytest.raises(Killed):
        run_experiment(load_config("mnist1d", SETS), out, progress=False, log=lambda s: None)
    assert (out / "swa-1.5B" / "seed0" / "posthoc" / "snapshot-00000007.pt").is_file()
    monkeypatch.setattr(RunFiles, "save_checkpoint", original)
    run_experiment(load_config("mnist1d", SETS), out, progress=False, log=lambda s: None)
    for seed in (0, 1):
        ours = out / "swa-1.5B" / f"seed{seed}" / "posthoc"
        theirs = run_dir / "swa-1.5B" / f"seed{seed}" / "posthoc"
        names = sorted(p.name for p in theirs.iterdir())
        assert sorted(p.name for p in ours.iterdir()) == names and len(names) == 10
        for name in names:
            assert (ours / name).read_bytes() == (theirs / name).read_bytes(), (seed, name)
