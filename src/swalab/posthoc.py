"""Post-hoc averaging: choose the SWA window, LAWA's k or the EMA length after training.

Every SWA result depends on when averaging starts and stops, and every EMA on its length; all of
them are functions of one trajectory. :class:`Snapshots` stores, at each collection point (an epoch
end, or an optimizer step), what a later synthesis needs:

- the cumulative float64 sum of the weights and its count, so that the SWA average over any window
  of collections (Izmailov et al., 2018) is a difference of two sums divided by the difference of
  two counts — exact up to float rounding, and LAWA (Kaddour, 2022), the average of the last k
  checkpoints, is such a window;
- two or more power-function EMA tracks (Karras et al., 2024, "Analyzing and Improving the Training
  Dynamics of Diffusion Models", §3 and Appendix C.1-C.2): ``θ̂_t = β_t θ̂_{t-1} + (1 - β_t) θ_t`` with
  ``β_t = (1 - 1/t)^(γ+1)``, ``γ`` given by the relative width ``σ_rel`` through
  ``σ_rel = (γ+1)^½ (γ+2)^-1 (γ+3)^-½``. Snapshots of these tracks at several times span a space in
  which the EMA of any other ``σ_rel`` is approximated by least squares (Algorithm 3).

The tracks' weights have a closed form: after ``T`` updates the power EMA is
``Σ_s (s^(γ+1) - (s-1)^(γ+1)) / T^(γ+1) · θ_s``, so :func:`ema` solves the least-squares problem
on these exact discrete weights (the paper integrates continuous profiles ``t^γ``; the two agree
for large ``t``) and refuses a ``σ_rel`` whose weights the snapshots cannot fit.

Files: ``snapshot-00000001.pt ...`` (one per stored collection point, never changed once written)
and ``resume.pt`` (the running sums and tracks at full precision), each written whole (temporary
file + rename) and loaded with ``weights_only=True``.

Example:
    >>> snapshots = swalab.posthoc.Snapshots("run/snapshots", every=1)
    >>> for epoch in range(epochs):
    ...     train_one_epoch(model)
    ...     snapshots.update(model, step=epoch)
    >>> state = swalab.posthoc.swa_window(snapshots, start=120, end=149)
    >>> model.load_state_dict(state); swalab.update_bn(loader, model)
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Snapshots", "ema", "lawa", "sigma_rel_to_gamma", "swa_window"]

FORMAT = "swalab-posthoc-1"
_RESUME = "resume.pt"
_NAME = re.compile(r"snapshot-(\d{8})\.pt")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SIGMA_MAX = 1 / (2 * math.sqrt(3))  # σ_rel at γ = 0 (a uniform average from t = 0)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent γ > 0 whose power-function profile has relative width ``sigma_rel`` (Karras et
    al., 2024, Eq. 3 solved for γ): the largest real root of ``(γ+1) = σ² (γ+2)² (γ+3)``."""
    if not (isinstance(sigma_rel, (int, float)) and 0 < sigma_rel < _SIGMA_MAX):
        raise ValueError(f"sigma_rel must be a number in (0, {_SIGMA_MAX:.4f}), got {sigma_rel!r}")
    s = sigma_rel**-2  # γ³ + 7γ² + (16 - s)γ + (12 - s) = 0
    roots = torch.linalg.eigvals(
        torch.tensor(
            [[-7.0, -(16 - s), -(12 - s)], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64
        )
    )
    return max(float(r.real) for r in roots if abs(float(r.imag)) < 1e-9)


def _power_weights(t: Tensor, gamma: float, steps: Tensor) -> Tensor:
    """The weight of collection ``s`` (1-based, rows ``steps``) in the power EMA after ``t`` updates:
    ``(s^(γ+1) - (s-1)^(γ+1)) / t^(γ+1)`` for ``s <= t``, else 0. ``t``: a column of times."""
    g, s, t = gamma + 1, steps.double(), t.double()
    w = (s / t) ** g - ((s - 1) / t) ** g  # ratios <= 1: no overflow for large γ
    return torch.where(s <= t, w, torch.zeros((), dtype=torch.float64))


def _track_dtype(tensor: Tensor) -> torch.dtype:
    return torch.promote_types(tensor.dtype, torch.float32)


def _floating(state: Mapping[str, Tensor]) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


class Snapshots:
    """Store what post-hoc SWA windows, LAWA and power-function EMA synthesis need, while training.

    Call :meth:`update` at each collection point (every epoch end for SWA as in the paper, or every
    step); every ``every``-th collection writes one snapshot file. Opening an existing directory
    resumes from the last collection written there (the settings are read from it; giving others is
    an error); a step at or before the last one collected is skipped, so a training run resumed
    from an earlier checkpoint replays into the same files, byte for byte. The resume point is the
    last stored snapshot: resume training from a checkpoint at or before it (with ``every=1``,
    collect before saving the checkpoint, as the lab's trainer does).

    Args:
        directory: where the files go (created if missing).
        every: store a snapshot every ``every`` collections (SWA windows and LAWA can start and end
            only at stored collections).
        sigma_rels: relative widths of the power-function EMA tracks, two or more in
            ``(0, 0.2887)`` (the paper stores 0.05 and 0.10).
        ema_dtype: storage dtype of the tracks in the snapshot files: ``torch.float32``
            (default), ``torch.float16`` or ``torch.bfloat16``; the running tracks are kept in
            the model's dtype or float32, whichever is wider, and the sums in float64.
        output: ``with output(path) as tmp:`` gives the temporary path a file is written to and
            renames it over ``path`` on success (default: beside it, a rename); the laboratory
            passes its checked ``atomic_output``. Files are written through a file object, so
            their bytes do not depend on the temporary name.
    """

    def __init__(
        self,
        directory: str | Path,
        every: int | None = None,
        sigma_rels: Sequence[float] | None = None,
        ema_dtype: torch.dtype | None = None,
        output: Callable[[Path], AbstractContextManager[Path]] | None = None,
    ) -> None:
        if every is not None and (
            isinstance(every, bool) or not isinstance(every, int) or every < 1
        ):
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        if sigma_rels is not None:
            sigma_rels = tuple(sigma_rels)
            if len(sigma_rels) < 2 or len(set(sigma_rels)) != len(sigma_rels):
                raise ValueError(
                    f"sigma_rels must be two or more distinct values, got {list(sigma_rels)}"
                )
            for sigma in sigma_rels:
                sigma_rel_to_gamma(sigma)
        if ema_dtype is not None and ema_dtype not in _DTYPES.values():
            raise ValueError(
                f"ema_dtype must be torch.float32, torch.float16 or torch.bfloat16, got {ema_dtype}"
            )
        self.directory = Path(directory)
        self._output = output or _whole
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"snapshot directory {self.directory} is not a directory")
        self._state: dict[str, Any] | None = None
        self._index: dict[Path, dict[str, Any]] = {}
        resume = self.directory / _RESUME
        if resume.exists():
            state = _load(resume, mmap=False)
            given = {"every": every, "sigma_rels": sigma_rels, "ema_dtype": ema_dtype}
            stored = {
                "every": state["every"],
                "sigma_rels": tuple(state["sigma_rels"]),
                "ema_dtype": _DTYPES[state["ema_dtype"]],
            }
            for name, value in given.items():
                if value is not None and value != stored[name]:
                    raise ValueError(
                        f"{name}={value} differs from {stored[name]}, with which {self.directory} "
                        "was started: give the same or none"
                    )
            self._state = state
            every, sigma_rels, ema_dtype = (stored[k] for k in ("every", "sigma_rels", "ema_dtype"))
        self.every = every if every is not None else 1
        self.sigma_rels = sigma_rels if sigma_rels is not None else (0.05, 0.10)
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self.ema_dtype = ema_dtype if ema_dtype is not None else torch.float32

    # -- collecting -------------------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Collections so far."""
        return 0 if self._state is None else self._state["count"]

    @property
    def last_step(self) -> int | None:
        """The step of the last collection, or None before the first."""
        return None if self._state is None else self._state["step"]

    @torch.no_grad()
    def update(self, model: nn.Module | Mapping[str, Tensor], step: int | None = None) -> bool:
        """Collect ``model`` (or a state_dict) at ``step`` (default: the next after the last).

        Returns False, collecting nothing, for a step at or before the last collected one (a replay
        after a resume). Writes a snapshot file every ``every`` collections.
        """
        weights = model.state_dict() if isinstance(model, nn.Module) else dict(model)
        last = self.last_step
        if step is None:
            step = 0 if last is None else last + 1
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"step must be an integer, got {step!r}")
        if last is not None and step <= last:
            return False
        keys = _floating(weights)
        if self._state is None:
            self._state = {
                "format": FORMAT,
                "every": self.every,
                "sigma_rels": list(self.sigma_rels),
                "ema_dtype": next(k for k, v in _DTYPES.items() if v == self.ema_dtype),
                "count": 0,
                "step": step,
                "steps": [],
                "sum": {k: torch.zeros_like(weights[k], dtype=torch.float64) for k in keys},
                # at least float32: a bf16 track would stop moving once its increments round away
                "ema": [
                    {k: weights[k].detach().to(_track_dtype(weights[k]), copy=True) for k in keys}
                    for _ in self.gammas
                ],
            }
        state = self._state
        shapes = {k: tuple(weights[k].shape) for k in keys}
        if shapes != {k: tuple(v.shape) for k, v in state["sum"].items()}:
            raise ValueError(
                f"the model's floating tensors (names and shapes) differ from the ones collected "
                f"in {self.directory}"
            )
        device = weights[keys[0]].device if keys else torch.device("cpu")
        if keys and state["sum"][keys[0]].device != device:  # resumed from files: to the model
            state["sum"] = {k: v.to(device) for k, v in state["sum"].items()}
            state["ema"] = [{k: v.to(device) for k, v in track.items()} for track in state["ema"]]
        t = state["count"] + 1
        current = [weights[k].detach() for k in keys]
        torch._foreach_add_([state["sum"][k] for k in keys], [c.to(torch.float64) for c in current])
        for gamma, track in zip(self.gammas, state["ema"]):
            beta = (1.0 - 1.0 / t) ** (gamma + 1)  # 0 at t = 1: the first update copies
            tracked = [track[k] for k in keys]
            sources = [c.to(a.dtype) for a, c in zip(tracked, current)]
            torch._foreach_lerp_(tracked, sources, 1.0 - beta)
        state["count"], state["step"] = t, step
        state["steps"].append(step)
        state["other"] = {
            k: v.detach().clone() for k, v in weights.items() if k not in state["sum"]
        }
        if t % self.every == 0:
            self._write_snapshot(state)
            self._write(_cpu(state), self.directory / _RESUME)
        return True

    def _write_snapshot(self, state: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        snapshot = {
            "format": FORMAT,
            "count": state["count"],
            "step": state["step"],
            "steps": state["steps"][-self.every :],  # the collections since the previous snapshot
            "sigma_rels": list(self.sigma_rels),
            "sum": state["sum"],
            "ema": [{k: v.to(self.ema_dtype) for k, v in track.items()} for track in state["ema"]],
            "other": state["other"],
        }
        self._write(_cpu(snapshot), self.directory / f"snapshot-{state['count']:08d}.pt")

    def _write(self, obj: Any, path: Path) -> None:
        """``torch.save`` into a file object (the archive's inner name is then always "archive",
        not the temporary file's), through a temporary file renamed over ``path``."""
        with self._output(path) as tmp:
            with open(tmp, "wb") as f:
                torch.save(obj, f)

    # -- reading ----------------------------------------------------------------------------------

    def files(self) -> list[Path]:
        """The snapshot files in collection order."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if _NAME.fullmatch(p.name))

    def index(self) -> list[dict[str, Any]]:
        """Per stored snapshot: its path, count, step and the steps collected since the previous
        one (without its tensors)."""
        out = []
        for path in self.files():
            entry = self._index.get(path)
            if entry is None:  # a snapshot file never changes once written: read it once
                snap = _load(path)
                entry = self._index[path] = {
                    "path": path,
                    "count": snap["count"],
                    "step": snap["step"],
                    "steps": snap["steps"],
                }
            out.append(entry)
        return out


@contextlib.contextmanager
def _whole(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed over it on success and removed on failure."""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # still there only after a failure


def _cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu(v) for v in obj]
    return obj


def _load(path: Path, mmap: bool = True) -> dict[str, Any]:
    """A snapshot or resume file; memory-mapped by default, so reading the index does not read the
    tensors (the running state of a resume is read whole)."""
    data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a swalab post-hoc snapshot ({FORMAT})")
    return data


def _snapshots(snapshots: Snapshots | str | Path) -> Snapshots:
    return snapshots if isinstance(snapshots, Snapshots) else Snapshots(snapshots)


def _stored(index: list[dict[str, Any]], directory: Path) -> str:
    if not index:
        raise ValueError(f"no snapshots in {directory}")
    steps = [s["step"] for s in index]
    shown = ", ".join(map(str, steps)) if len(steps) <= 8 else f"{steps[0]}..{steps[-1]}"
    return f"stored steps {steps[0]}..{steps[-1]} (snapshots at {shown})"


def _result(
    total: dict[str, Tensor], other: dict[str, Tensor], dtypes: Mapping[str, torch.dtype]
) -> dict[str, Tensor]:
    return {**{k: v.to(dtypes[k]) for k, v in total.items()}, **other}


def swa_window(
    snapshots: Snapshots | str | Path, start: int, end: int, dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """The SWA average (Izmailov et al., 2018) of the weights collected at steps ``start..end``
    (both included): ``(S_end - S_before) / (n_end - n_before)`` from the stored float64 sums.

    ``start`` must be the first collection after a stored snapshot (or the first collection) and
    ``end`` a stored snapshot's step. Returns a state_dict (floating tensors in ``dtype``, the others
    as collected at ``end``), ready for ``load_state_dict`` and ``update_bn``.
    """
    snaps = _snapshots(snapshots)
    index = snaps.index()
    stored = _stored(index, snaps.directory)
    for name, value in (("start", start), ("end", end)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer step, got {value!r}")
    if start >= end:
        raise ValueError(f"window start={start} must be < end={end}; {stored}")
    first = index[0]["steps"][0]
    if start < first or end > index[-1]["step"]:
        raise ValueError(
            f"window [{start}, {end}] is outside the collected steps {first}..{index[-1]['step']}"
        )
    ends = [i for i, s in enumerate(index) if s["step"] == end]
    if not ends:
        raise ValueError(f"window end={end} is not a stored snapshot; {stored}")
    starts = [i for i, s in enumerate(index) if s["steps"][0] == start]
    if not starts:
        raise ValueError(
            f"window start={start} is not the first collection after a snapshot; {stored}"
        )
    return _difference(index, starts[0] - 1, ends[0], dtype)


def _difference(
    index: list[dict[str, Any]], before: int, end: int, dtype: torch.dtype
) -> dict[str, Tensor]:
    """The mean of the collections after snapshot ``before`` (-1: from the first) up to ``end``."""
    last = _load(index[end]["path"])
    total, count = last["sum"], last["count"]
    if before >= 0:
        prior = _load(index[before]["path"])
        total = {k: v - prior["sum"][k] for k, v in total.items()}
        count -= prior["count"]
    mean = {k: v / count for k, v in total.items()}
    return _result(mean, last["other"], dict.fromkeys(mean, dtype))


def lawa(
    snapshots: Snapshots | str | Path,
    k: int,
    at: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """LAWA (Kaddour, 2022): the average of the last ``k`` collections up to step ``at`` (default:
    the last stored), as a state_dict ready for ``update_bn``."""
    snaps = _snapshots(snapshots)
    index = snaps.index()
    stored = _stored(index, snaps.directory)
    if at is None:
        at = index[-1]["step"]
    ends = [i for i, s in enumerate(index) if s["step"] == at]
    if not ends:
        raise ValueError(f"at={at} is not a stored snapshot; {stored}")
    available = index[ends[0]]["count"]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= available:
        raise ValueError(
            f"k must be an integer in [1, {available}] (collections up to step {at}), got {k!r}"
        )
    want = index[ends[0]]["count"] - k
    before = [i for i, s in enumerate(index) if s["count"] == want]
    if want > 0 and not before:
        counts = sorted(available - s["count"] for s in index[: ends[0]])
        raise ValueError(
            f"k={k} does not end at a stored snapshot (every={snaps.every}); possible k: {counts}"
        )
    return _difference(index, before[0] if want > 0 else -1, ends[0], dtype)


def ema(
    snapshots: Snapshots | str | Path,
    sigma_rel: float,
    at: int | None = None,
    tolerance: float = 0.05,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """The power-function EMA of relative width ``sigma_rel`` at step ``at`` (default: the last
    stored), synthesised from the stored tracks by least squares (Karras et al., 2024, Algorithm 3).

    The coefficients ``x`` minimise ``‖Σ_i x_i w_i − w_r‖`` over the exact per-collection weights
    ``w_i`` of the stored snapshots (those at or before ``at``) and ``w_r`` of the target; a target
    fitted with relative error above ``tolerance`` is refused (``ValueError`` naming the reachable
    ``σ_rel`` range). Returns a state_dict ready for ``update_bn``.
    """
    snaps = _snapshots(snapshots)
    index = snaps.index()
    stored = _stored(index, snaps.directory)
    gamma = sigma_rel_to_gamma(sigma_rel)
    if at is None:
        at = index[-1]["step"]
    ends = [i for i, s in enumerate(index) if s["step"] == at]
    if not ends:
        raise ValueError(f"at={at} is not a stored snapshot; {stored}")
    used = index[: ends[0] + 1]
    coefficients, error = _fit(used, snaps.gammas, gamma)
    if error > tolerance:
        low, high = _reachable(used, snaps.gammas, tolerance)
        reach = f"[{low:.3g}, {high:.3g}]" if low is not None else "none"
        raise ValueError(
            f"sigma_rel={sigma_rel} is fitted with relative error {error:.3g} > {tolerance} by the "
            f"tracks {list(snaps.sigma_rels)} up to step {at}; reachable sigma_rel: {reach}"
        )
    total: dict[str, Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for j, entry in enumerate(used):
        snap = _load(entry["path"])
        for i, track in enumerate(snap["ema"]):
            x = float(coefficients[j * len(snaps.gammas) + i])
            for key, value in track.items():
                dtypes[key] = dtype
                total[key] = total.get(key, 0) + x * value.double()
    return _result(total, _load(used[-1]["path"])["other"], dtypes)


def _gram(
    used: list[dict[str, Any]], gammas: Sequence[float], gamma_r: float
) -> tuple[Tensor, Tensor, float]:
    """``A = W Wᵀ``, ``b = W w_r`` and ``‖w_r‖²`` over collections ``1..T`` (``T``: the last snapshot),
    the rows of ``W`` the weights of each stored (snapshot, track), in chunks of collections."""
    times = torch.tensor([[s["count"]] for s in used for _ in gammas], dtype=torch.float64)
    track_gammas = [g for _ in used for g in gammas]
    t_r = float(used[-1]["count"])
    n = len(track_gammas)
    a, b, rr = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), 0.0
    for lo in range(1, int(t_r) + 1, 1 << 15):
        steps = torch.arange(lo, min(int(t_r), lo + (1 << 15) - 1) + 1, dtype=torch.float64)
        w = torch.stack([_power_weights(times[i], g, steps) for i, g in enumerate(track_gammas)])
        w_r = _power_weights(torch.tensor(t_r), gamma_r, steps)
        a += w @ w.T
        b += w @ w_r
        rr += float(w_r @ w_r)
    return a, b, rr


def _fit(
    used: list[dict[str, Any]], gammas: Sequence[float], gamma_r: float
) -> tuple[Tensor, float]:
    """Least-squares coefficients and the relative error ``‖W x − w_r‖ / ‖w_r‖`` of the fit."""
    a, b, rr = _gram(used, gammas, gamma_r)
    x = torch.linalg.lstsq(a, b.unsqueeze(1), rcond=1e-12, driver="gelsd").solution.squeeze(1)
    residual = rr - 2 * float(x @ b) + float(x @ a @ x)
    return x, math.sqrt(max(residual, 0.0) / rr)


def _reachable(
    used: list[dict[str, Any]], gammas: Sequence[float], tolerance: float
) -> tuple[float | None, float | None]:
    """The smallest and largest σ_rel on a log grid over (0.001, 0.288) fitted within ``tolerance``."""
    grid = torch.logspace(math.log10(0.001), math.log10(0.288), 60).tolist()
    ok = [s for s in grid if _fit(used, gammas, sigma_rel_to_gamma(s))[1] <= tolerance]
    return (ok[0], ok[-1]) if ok else (None, None)
