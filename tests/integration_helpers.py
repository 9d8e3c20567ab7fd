"""Oracles and runners shared by the Lightning and Hugging Face integration tests.

The expected averages are computed here from recorded weights by the formulas themselves (the mean
of the averaged steps; the EMA recurrence with warm-up), never through swalab.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def params(module: torch.nn.Module) -> list[torch.Tensor]:
    """A snapshot (detached copies) of the module's parameters, in order."""
    return [p.detach().clone() for p in module.parameters()]


def mean(snapshots: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """The element-wise mean of parameter snapshots: the SWA average of those steps."""
    return [torch.stack(ts).mean(0) for ts in zip(*snapshots)]


def ema(
    snapshots: list[list[torch.Tensor]], decay: float, gamma: float, power: float
) -> list[torch.Tensor]:
    """EMA with warm-up over the snapshots: the first is copied, the t-th (t >= 1) folded in with
    ``decay_t = min(decay, 1 - (1 + t / gamma) ** -power)``."""
    average = snapshots[0]
    for t, weights in enumerate(snapshots[1:], start=1):
        decay_t = min(decay, 1 - (1 + t / gamma) ** -power)
        average = [decay_t * a + (1 - decay_t) * w for a, w in zip(average, weights)]
    return average


def assert_all_close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


def run_readme_example(after: str, cwd: Path) -> str:
    """Run the first ```python block of README.md after the line that starts with ``after`` in a
    fresh interpreter in ``cwd``; assert that it succeeds and return its standard output."""
    text = README.read_text()
    rest = text[text.index("\n" + after) :]
    start = rest.index("```python\n") + len("```python\n")
    done = subprocess.run(
        [sys.executable, "-c", rest[start : rest.index("```", start)]],
        cwd=cwd,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout
