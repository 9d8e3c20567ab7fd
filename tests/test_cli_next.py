"""The command line says what comes next: a run ends with the report and claims commands after
its table; ``swalab plan`` says it is timing steps before it does."""

from __future__ import annotations

from swalab.cli import main

SMALL = [
    "--seeds",
    "1",
    "--set",
    "train.epochs=1",
    "--set",
    "data.train_size=200",
    "--set",
    "methods=[{method: sgd}]",
    "--set",
    "landscape.pieces=[]",
]


def test_a_run_ends_with_the_next_steps_after_its_table(tmp_path, capsys):
    assert main(["run", "mnist1d", "--out", str(tmp_path), "--jobs", "1", *SMALL]) == 0
    out = capsys.readouterr().out
    table = out.index("mnist1d: test_accuracy")
    steps = out.index("\nNext:\n")
    assert table < steps
    assert f"swalab report {tmp_path} --html" in out[steps:]
    assert f"swalab claims {tmp_path}" in out[steps:]


def test_plan_says_what_it_times_first(tmp_path, capsys):
    assert main(["plan", "mnist1d", "--out", str(tmp_path), "--repeats", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith(
        "mnist1d: timing 1 training steps of mnist1d_cnn (batch 100) on cpu"
    )


def test_landscape_captions_say_what_is_drawn_and_which_seed():
    from swalab.report.build import LANDSCAPE_FIGURES, _landscape_caption

    rays = next(c for piece, name, c in LANDSCAPE_FIGURES if name == "rays.png")
    stopped = _landscape_caption("rays.png", rays, {"seed": 3, "rays": {"tails": False}})
    assert stopped.startswith("Train NLL along raw random rays") and "also plots" in stopped
    assert "Seed 3; the other seeds' figures are in `landscape/seed<k>/`" in stopped
    # rays stopped at their width that evaluated the test split too (issue 24): both named
    tested = {"seed": 3, "rays": {"tails": False}}
    tested["settings"] = {"rays": {"test_on_stopped_rays": True}}
    assert _landscape_caption("rays.png", rays, tested).startswith(
        "Train NLL and test error along raw random rays"
    )
    full = _landscape_caption("rays.png", rays, {"seed": 0, "rays": {"tails": True}})
    assert full.startswith(rays)
