"""Post-hoc averaging (swalab.posthoc) against directly computed averages."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from swalab import AveragedModel
from swalab.posthoc import Snapshots, ema, lawa, sigma_rel_to_gamma, swa_window


def _trained(epochs: int, directory: Path, every: int = 1) -> list[dict[str, torch.Tensor]]:
    """A small BN network trained by SGD; snapshots at each epoch end; the per-epoch weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    snaps = Snapshots(directory, every=every)
    states = []
    for epoch in range(epochs):
        for i in range(0, 64, 16):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i : i + 16]), y[i : i + 16]).backward()
            opt.step()
        snaps.update(model, step=epoch)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return states


def _averaged(states: list[dict[str, torch.Tensor]], epochs: range) -> dict[str, torch.Tensor]:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    averaged = None
    for epoch in epochs:
        model.load_state_dict(states[epoch])
        averaged = averaged or AveragedModel(model, use_buffers=True)
        averaged.update_parameters(model)
    return averaged.module.state_dict()


@pytest.mark.parametrize(("start", "end"), [(0, 4), (4, 8), (7, 11)])
def test_swa_window_equals_averaged_model(tmp_path: Path, start: int, end: int) -> None:
    states = _trained(12, tmp_path)
    got = swa_window(tmp_path, start, end)
    want = _averaged(states, range(start, end + 1))
    assert got.keys() == want.keys()
    for key, value in want.items():
        if value.is_floating_point():  # float64 sums against float32 running means: float rounding
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)
        else:  # num_batches_tracked: as collected at the window's end
            assert torch.equal(got[key], states[end][key])


def test_lawa_is_the_last_k(tmp_path: Path) -> None:
    states = _trained(10, tmp_path)
    for k, at in ((3, None), (10, None), (4, 6)):
        end = 9 if at is None else at
        want = _averaged(states, range(end - k + 1, end + 1))
        got = lawa(tmp_path, k, at=at)
        for key in want:
            torch.testing.assert_close(got[key].float(), want[key].float(), rtol=1e-5, atol=1e-6)


def test_windows_at_stored_boundaries_with_every(tmp_path: Path) -> None:
    states = _trained(12, tmp_path, every=3)  # snapshots after epochs 2, 5, 8, 11
    torch.testing.assert_close(
        swa_window(tmp_path, 3, 8)["0.weight"], _averaged(states, range(3, 9))["0.weight"]
    )
    with pytest.raises(ValueError, match=r"^window start=4 is not the first collection after"):
        swa_window(tmp_path, 4, 8)
    with pytest.raises(ValueError, match=r"^k=4 does not end at a stored snapshot.*\[3, 6, 9\]"):
        lawa(tmp_path, 4)


def test_bad_windows_name_the_value_and_the_range(tmp_path: Path) -> None:
    _trained(6, tmp_path)
    with pytest.raises(ValueError, match=r"^window start=3 must be < end=3; stored steps 0\.\.5"):
        swa_window(tmp_path, 3, 3)
    with pytest.raises(
        ValueError, match=r"^window \[2, 9\] is outside the collected steps 0\.\.5$"
    ):
        swa_window(tmp_path, 2, 9)
    with pytest.raises(ValueError, match=r"^k must be an integer in \[1, 6\]"):
        lawa(tmp_path, 7)
    with pytest.raises(ValueError, match=r"^at=9 is not a stored snapshot; stored steps 0\.\.5"):
        ema(tmp_path, 0.07, at=9)
    with pytest.raises(
        ValueError, match=r"^sigma_rel must be a number in \(0, 0\.2887\), got 0\.5"
    ):
        ema(tmp_path, 0.5)
    with pytest.raises(ValueError, match=r"^every must be an integer >= 1, got 0"):
        Snapshots(tmp_path / "x", every=0)
    with pytest.raises(ValueError, match=r"^sigma_rels must be two or more distinct values"):
        Snapshots(tmp_path / "x", sigma_rels=[0.05])
    with pytest.raises(ValueError, match=r"^every=2 differs from 1, with which"):
        Snapshots(tmp_path, every=2)


def test_sigma_rel_to_gamma_matches_the_paper() -> None:
    # Karras et al. (2024), §3: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94.
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)


def _walk(steps: int, dim: int = 256) -> torch.Tensor:
    """A random-walk trajectory with drift (rows: the weights after each step)."""
    g = torch.Generator().manual_seed(1)
    return (torch.randn(steps, dim, generator=g) + 0.05).cumsum(0)


def _direct_power_ema(trajectory: torch.Tensor, sigma_rel: float) -> torch.Tensor:
    gamma, track = sigma_rel_to_gamma(sigma_rel), torch.zeros(trajectory.shape[1])
    for t, w in enumerate(trajectory, start=1):
        track.lerp_(w, 1 - (1 - 1 / t) ** (gamma + 1))
    return track


def test_power_ema_tracks_are_the_closed_form(tmp_path: Path) -> None:
    """A stored track is the direct power EMA; synthesising a stored sigma_rel gives it back."""
    trajectory = _walk(200)
    snaps = Snapshots(tmp_path, every=20, sigma_rels=(0.05, 0.10))
    for step, w in enumerate(trajectory):
        snaps.update({"w": w}, step=step)
    direct = _direct_power_ema(trajectory, 0.10)
    stored = torch.load(snaps.files()[-1], weights_only=True)["ema"][1]["w"]
    torch.testing.assert_close(stored, direct, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ema(snaps, 0.10)["w"], direct, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("sigma_rel", [0.03, 0.07, 0.15])
def test_ema_synthesis_reproduces_a_tracked_ema(tmp_path: Path, sigma_rel: float) -> None:
    """Tracks 0.05 and 0.10 stored every 25 of 2000 steps synthesise another sigma_rel's EMA.

    Tolerance: the synthesised EMA differs from the directly tracked one by at most 0.1% of how
    far the tracked EMA lies from the nearest stored track, i.e. a negligible fraction of the
    difference between the EMA lengths one chooses among. The synthesis is exact on the span of
    the stored tracks; what remains is the least-squares misfit of the per-step weight profiles,
    which is below 0.2% here for sigma_rel in [0.03, 0.2] (Karras et al., 2024, Fig. 5 show profiles
    synthesised from 0.05/0.10 matching targets to that visual precision). Measured on this
    trajectory (2-core CPU): 2e-4, 2e-5, 1e-5 of that distance for 0.03, 0.07, 0.15.
    """
    trajectory = _walk(2000)
    snaps = Snapshots(tmp_path, every=25, sigma_rels=(0.05, 0.10))
    for step, w in enumerate(trajectory):
        snaps.update({"w": w}, step=step)
    direct = _direct_power_ema(trajectory, sigma_rel)
    nearest = min(
        (_direct_power_ema(trajectory, s) for s in (0.05, 0.10)),
        key=lambda t: float((t - direct).norm()),
    )
    got = ema(snaps, sigma_rel)["w"]
    assert float((got - direct).norm()) <= 1e-3 * float((nearest - direct).norm())


def test_unreachable_sigma_rel_names_the_range(tmp_path: Path) -> None:
    trajectory = _walk(400)
    snaps = Snapshots(tmp_path, every=100, sigma_rels=(0.05, 0.06))
    for step, w in enumerate(trajectory):
        snaps.update({"w": w}, step=step)
    with pytest.raises(ValueError, match=r"^sigma_rel=0.25 is fitted .* reachable sigma_rel: \["):
        ema(snaps, 0.25)


def test_half_precision_tracks(tmp_path: Path) -> None:
    """fp16/bf16 tracks: the synthesis is off by the storage rounding only. Its coefficients
    sum to 1 and stay below 1 in size here, so the relative error grows by at most about eps."""
    trajectory = _walk(2000)
    direct = _direct_power_ema(trajectory, 0.07)
    errors = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        snaps = Snapshots(tmp_path / str(dtype), every=25, ema_dtype=dtype)
        for step, w in enumerate(trajectory):
            snaps.update({"w": w}, step=step)
        stored = torch.load(snaps.files()[-1], weights_only=True)
        assert stored["ema"][0]["w"].dtype == dtype
        assert stored["sum"]["w"].dtype == torch.float64
        errors[dtype] = float((ema(snaps, 0.07)["w"] - direct).norm() / direct.norm())
    assert errors[torch.float32] < 1e-6
    for dtype in (torch.float16, torch.bfloat16):
        assert (
            errors[torch.float32] < errors[dtype] <= errors[torch.float32] + torch.finfo(dtype).eps
        )
    with pytest.raises(ValueError, match=r"^ema_dtype must be"):
        Snapshots(tmp_path / "bad", ema_dtype=torch.int8)


_WRITER = """
import sys, time, torch
from swalab.posthoc import Snapshots
snaps = Snapshots(sys.argv[1], every=2)
for step in range(int(sys.argv[2]), 1000):
    g = torch.Generator().manual_seed(step)
    snaps.update({"w": torch.randn(4096, generator=g), "n": torch.tensor(step)}, step=step)
    time.sleep(0.02)
"""


def _collect(directory: Path, start: int, stop: int) -> None:
    snaps = Snapshots(directory, every=2)
    for step in range(start, stop):
        g = torch.Generator().manual_seed(step)
        snaps.update({"w": torch.randn(4096, generator=g), "n": torch.tensor(step)}, step=step)


def test_snapshots_survive_a_kill_and_resume_bit_identical(tmp_path: Path) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _collect(straight, 0, 30)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(killed), "0"], env=env)
    try:
        deadline = time.monotonic() + 120
        while not (killed / "snapshot-00000008.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (killed / "resume.pt").exists()
    # The training run resumes from an earlier checkpoint (step 3): steps already collected are
    # replayed without being collected twice.
    _collect(killed, 3, 30)
    names = sorted(p.name for p in straight.iterdir())
    assert sorted(p.name for p in killed.iterdir() if not p.name.startswith(".")) == names
    for name in names:
        assert (straight / name).read_bytes() == (killed / name).read_bytes(), name


def test_low_precision_model_tracks_in_float32_and_changed_models_refused(tmp_path: Path) -> None:
    snaps = Snapshots(tmp_path)
    model = nn.Linear(3, 2).to(torch.bfloat16)
    snaps.update(model, step=0)
    snaps.update(model, step=1)
    stored = torch.load(snaps.files()[-1], weights_only=True)
    assert stored["ema"][0]["weight"].dtype == torch.float32
    assert stored["sum"]["weight"].dtype == torch.float64
    assert snaps.update(model, step=1) is False  # already collected
    with pytest.raises(ValueError, match=r"^the model's floating tensors \(names and shapes\)"):
        snaps.update(nn.Linear(3, 4), step=2)
