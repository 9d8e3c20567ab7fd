"""What each run file holds, checked whenever it is read back.

A run directory may come from someone else or have been damaged (a half-copied file, a hand
edit): every reader in ``rundir.py`` and the report passes what it parsed through one of these
checks, so a bad file stops the command with one line naming the file and what is wrong in it,
never a traceback or a bare key name. The checks are structural (types, required keys, ranges),
not a re-derivation of the numbers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import Tensor

from .config import LANDSCAPE_PIECES
from .files import RunFileError, redo_hint

__all__ = [
    "check_checkpoint",
    "check_landscape",
    "check_meta",
    "check_metrics",
    "check_result",
    "check_results_table",
    "check_weights",
]


def _bad(path: Path, what: str) -> RunFileError:
    return RunFileError(f"cannot read {path}: {what}; {redo_hint(path)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _mapping(path: Path, data: Any, what: str = "a JSON object") -> dict[str, Any]:
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise _bad(path, f"expected {what}, got {type(data).__name__}")
    return data


def _require(
    path: Path, data: dict[str, Any], key: str, ok: Any, expected: str, where: str = ""
) -> None:
    if key not in data:
        raise _bad(path, f"{where}missing key {key!r} ({expected})")
    if not ok(data[key]):
        raise _bad(path, f"{where}{key!r} must be {expected}, got {data[key]!r:.60}")


def _numbers(path: Path, data: dict[str, Any], where: str = "") -> None:
    """Metric values (``*_loss``, ``*_accuracy``, ...) are numbers or null."""
    for key, value in data.items():
        if key.endswith(("_loss", "_nll", "_accuracy", "_ece", "_mse", "_error", "lr")) and not (
            value is None or _is_number(value)
        ):
            raise _bad(path, f"{where}{key!r} must be a number, got {value!r:.60}")


def check_result(path: Path, data: Any) -> dict[str, Any]:
    """``result.json``: the run's row of ``results.csv``."""
    row = _mapping(path, data)
    _require(path, row, "status", lambda v: isinstance(v, str) and v, "a status such as 'done'")
    for key, ok, expected in (
        ("method", lambda v: isinstance(v, str) and v, "a method label"),
        ("seed", _is_int, "an integer"),
        ("epochs", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    ):
        if key in row:
            _require(path, row, key, ok, expected)
    _numbers(path, row)
    return row


def check_metrics(path: Path, records: list[Any]) -> list[dict[str, Any]]:
    """``metrics.jsonl``: one object per epoch, epochs 1, 2, ... in order."""
    for number, record in enumerate(records, 1):
        where = f"line {number}: "
        if not isinstance(record, dict):
            raise _bad(path, f"{where}expected a JSON object, got {type(record).__name__}")
        _require(
            path, record, "epoch", lambda v, n=number: v == n and _is_int(v), f"{number}", where
        )
        _numbers(path, record, where)
    return records


def check_meta(path: Path, data: Any) -> dict[str, Any]:
    """``meta.json``: the command, versions and environment of the run."""
    meta = _mapping(path, data)
    if "command" in meta and not (
        isinstance(meta["command"], list) and all(isinstance(a, str) for a in meta["command"])
    ):
        raise _bad(path, "'command' must be a list of strings")
    if "config_sha256" in meta and not isinstance(meta["config_sha256"], str):
        raise _bad(path, "'config_sha256' must be a string")
    imports = meta.get("imports", {})
    if not isinstance(imports, dict):
        raise _bad(path, "'imports' must be a mapping of module names")
    for module, where in imports.items():
        up = where.get("above_run") if isinstance(where, dict) else None
        if not (
            isinstance(module, str)
            and module.isidentifier()
            and isinstance(where, dict)
            and isinstance(where.get("directory"), str)
            and (up is None or (_is_int(up) and 1 <= up <= 64))
        ):
            raise _bad(
                path,
                f"'imports' entry {module!r} must be a top-level module name mapped to "
                "{'directory': a path, 'above_run': null or an integer from 1 to 64}",
            )
    return meta


def check_results_table(path: Path, header: list[str] | None, rows: list[dict[str, Any]]) -> None:
    """``results.csv``: the columns every reader needs, a seed that is an integer in every row."""
    missing = [c for c in ("method", "seed", "status") if c not in (header or [])]
    if missing:
        raise _bad(path, f"no column {missing[0]!r} in its header")
    for number, row in enumerate(rows, 2):
        if None in row or any(v is None for v in row.values()):
            raise _bad(path, f"line {number} has a different number of fields than the header")
        try:
            int(row["seed"])
        except ValueError:
            raise _bad(
                path, f"line {number}: seed must be an integer, got {row['seed']!r:.40}"
            ) from None
        for key, value in row.items():
            if key.endswith(("_loss", "_accuracy", "_ece", "_mse")) and value not in ("", None):
                try:
                    float(value)
                except ValueError:
                    raise _bad(
                        path, f"line {number}: {key} must be a number, got {value!r:.40}"
                    ) from None


def _tensors(value: Any) -> bool:
    """A state dict's values: tensors, or nested dicts/lists of tensors and numbers (SWAG)."""
    if isinstance(value, Tensor) or value is None or isinstance(value, (int, float, str, bool)):
        return True
    if isinstance(value, dict):
        return all(_tensors(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_tensors(v) for v in value)
    return False


def check_weights(path: Path, state: Any) -> dict[str, Any]:
    """``init.pt``, ``final.pt``, ``trajectory/epoch<n>.pt``, ``pretrain/seed<k>.pt``: a state
    dict, parameter names to tensors."""
    weights = _mapping(path, state, "a state dict (parameter names to tensors)")
    if not weights:
        raise _bad(path, "the state dict is empty")
    for key, value in weights.items():
        if not _tensors(value):
            raise _bad(path, f"{key!r} holds a {type(value).__name__}, not a tensor")
    return weights


def check_checkpoint(path: Path, ckpt: Any, *, full: bool = True) -> dict[str, Any]:
    """``checkpoint.pt``: the last epoch's model, optimizer, recipe, RNG states and history, or a
    diverged run's mark (``full=False``: the epoch and the mark alone, for planning)."""
    ckpt = _mapping(path, ckpt, "a checkpoint dict")
    _require(path, ckpt, "epoch", lambda v: _is_int(v) and v >= -1, "an integer >= -1")
    if not full:
        return ckpt
    if ckpt.get("diverged"):
        if not isinstance(ckpt["diverged"], str):
            raise _bad(path, "'diverged' must be a message")
        return ckpt
    for key, expected in (
        ("model", "a state dict"),
        ("optimizer", "an optimizer state dict"),
        ("recipe", "a recipe state dict"),
    ):
        _require(path, ckpt, key, lambda v: isinstance(v, dict), expected)
    check_weights(path, ckpt["model"])
    _require(path, ckpt, "history", lambda v: isinstance(v, list), "a list of epoch records")
    if len(ckpt["history"]) != ckpt["epoch"] + 1:
        raise _bad(
            path, f"its history has {len(ckpt['history'])} epochs, its epoch is {ckpt['epoch'] + 1}"
        )
    check_metrics(path, ckpt["history"])
    for key in ("generator", "torch_rng"):
        _require(path, ckpt, key, lambda v: isinstance(v, Tensor), "an RNG state tensor")
    return ckpt


def check_landscape(path: Path, data: Any) -> dict[str, Any]:
    """``landscape.json``: which runs and seed, the settings and each piece's summary."""
    summary = _mapping(path, data)
    _require(path, summary, "seed", _is_int, "an integer")
    for key in ("sgd", "swa"):
        if key in summary and not isinstance(summary[key], str):
            raise _bad(path, f"{key!r} must be a method label, got {summary[key]!r:.60}")
    for key in ("skipped", "seconds", "settings", "protocol"):
        if key in summary and not isinstance(summary[key], dict):
            raise _bad(path, f"{key!r} must be a JSON object")
    for piece in LANDSCAPE_PIECES:
        if piece in summary and not isinstance(summary[piece], dict):
            raise _bad(path, f"{piece!r} must be a JSON object")
    for key, value in summary.get("seconds", {}).items():
        if not (_is_number(value) and math.isfinite(value)):
            raise _bad(path, f"seconds.{key} must be a number")
    return summary
