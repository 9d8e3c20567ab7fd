"""Typed experiment configuration: dataclasses loaded from YAML presets or files, ``--set`` overrides.

Unknown keys and values of the wrong type are errors that name the key (nanoGPT-style checked
config); the resolved config is saved with every run.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data import DATASETS
from ..models import MODELS, default_options
from ..registry import reading_a_run
from .errors import ConfigError
from .methods import method_role, recipe_of
from .precision import PRECISIONS, check_compile
from .tracking import check_trackers

__all__ = [
    "PRESET_DIR",
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "LandscapeConfig",
    "MethodConfig",
    "ModelConfig",
    "PosthocConfig",
    "PretrainConfig",
    "TrainConfig",
    "apply_overrides",
    "load_config",
    "parse_yaml",
    "preset_names",
    "read_yaml",
    "to_dict",
]

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class DataConfig:
    name: str = "mnist1d"
    root: str = "data"
    options: dict[str, Any] = field(default_factory=dict)
    train_size: int | None = (
        None  # a seeded random subset of the training split (CPU-sized variants)
    )
    test_size: int | None = None  # the first test_size test samples


@dataclass
class ModelConfig:
    name: str = "mnist1d_cnn"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """The SGD budget B and the optimiser every method shares."""

    epochs: int = 40
    batch_size: int = 128
    eval_batch_size: int = 1000
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = True
    bn_batches: int | None = None
    # update_bn's weighting of the BN pass: "batches" (torch's: each batch counts equally) or
    # "samples" (the SWA paper's reference bn_update: each batch by its size; the paper presets)
    bn_weighting: str = "batches"
    eval_every: int = 1
    device: str = "auto"
    threads: int | None = None  # CPU threads for torch (None: torch's default)
    # keep the weights after every epoch (trajectory/) of every run (true), or of the runs of
    # these method labels (the SWA run's snapshots, for the landscape's ensemble piece)
    save_trajectory: bool | list[str] = False
    log: list[str] = field(default_factory=list)  # trackers: tensorboard, csv, mlflow, wandb
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast of the training step (lab/precision.py)
    channels_last: bool = False  # NHWC weights and batches in the training step
    compile: bool = False  # torch.compile the model of the training forward (lab/precision.py)

    def saves_trajectory(self, label: str) -> bool:
        """Whether the run of method ``label`` keeps its weights after every epoch."""
        if isinstance(self.save_trajectory, bool):
            return self.save_trajectory
        return label in self.save_trajectory


LANDSCAPE_PIECES = (
    "line",
    "rays",
    "plane",
    "plane_init",
    "snapshots",
    "ensemble",
    "predictions",
    "bn",
    "curvature",
)


@dataclass
class LandscapeConfig:
    """Landscape pieces ``swalab run`` computes for every seed after training (none by default),
    and their protocol; also the defaults of ``swalab landscape`` on the run (Izmailov et al.,
    2018, §3; the pieces ``swalab claims`` reads are line, rays, ensemble and bn)."""

    pieces: list[str] = field(default_factory=list)
    # pieces added for the first seed only (a plane costs grid**2 points: the paper's Fig. 1
    # plane of one seed, labelled so in the report); with pieces: [] no landscape step runs
    first_seed: list[str] = field(default_factory=list)
    line_points: int = 21  # t in [-0.5, 1.5] on t * w_SGD + (1 - t) * w_SWA
    rays: int = 10  # random directions
    ray_points: int = 21  # points along each ray, from 0 to ||w_SWA|| / 2
    rise: float = 0.1  # train-NLL (data loss) rise that defines the width along a ray
    # how the rays' random directions are scaled (swalab.landscape.normalize_direction), one set
    # of rays per entry, the first the primary: filter (per output filter, Li et al. 2018; biases
    # and BN affine not moved), layer (per tensor), raw (unit Gaussian: the SWA paper's Fig. 4)
    directions: list[str] = field(default_factory=lambda: ["filter", "raw"])
    # evaluate each ray beyond its width (the figure's whole curves); false: stop at the first
    # point past the rise, which gives the same widths at about half the cost
    ray_tails: bool = True
    grid: int = 21  # points per side of the planes
    # curvature piece (swalab.curvature): the Hessian of the train NLL at both solutions, on the
    # first curvature_samples training samples; power iterations and Hutchinson probes
    curvature_samples: int = 1000
    curvature_iterations: int = 20
    curvature_probes: int = 10


@dataclass
class PosthocConfig:
    """Post-hoc SWA windows (``swalab.posthoc``): the run of method ``run`` stores snapshots (float64
    running sums and power-function EMA tracks) after every ``every``-th epoch, from which
    ``swalab posthoc`` evaluates the SWA average over a grid of (start, end) epoch windows."""

    run: str = ""  # the method label whose epochs are collected ("": none; "auto": the longest SWA)
    every: int = 1
    starts: list[int] = field(default_factory=list)  # 1-based epochs; empty: a grid of ~10
    ends: list[int] = field(default_factory=list)  # 1-based epochs; empty: a grid of ~10


@dataclass
class PretrainConfig:
    """Optional shared pre-training (documents 000 and 003): every method starts from its result."""

    epochs: int = 0
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    cosine: bool = True


@dataclass
class MethodConfig:
    method: str = "sgd"
    label: str = ""
    budget: float = 1.0
    baseline: str = ""  # label of the method to pair with (default: the SGD run at budget 1)
    lr: float | None = None  # this method's initial learning rate (default: train.lr)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.label:
            self.label = self.method if self.budget == 1.0 else f"{self.method}-{self.budget:g}B"


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    description: str = ""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    methods: list[MethodConfig] = field(default_factory=lambda: [MethodConfig()])
    landscape: LandscapeConfig = field(default_factory=LandscapeConfig)
    posthoc: PosthocConfig = field(default_factory=PosthocConfig)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_values(self)
        _keep_snapshots(self)
        _check_posthoc(self)

    def default_label(self, role: str) -> str | None:
        """The first method of ``role`` (see ``lab.methods.ROLES``) at budget 1, else the first of
        that role at all, else None: the SGD (``baseline``) and SWA (``average``) of the landscape
        and the claims."""
        named = [m for m in self.methods if method_role(m.method) == role]
        chosen = [m for m in named if m.budget == 1.0] or named
        return chosen[0].label if chosen else None


LIMITS: dict[str, int | float] = {
    "epochs": 100_000,  # train.epochs, pretrain.epochs
    "threads": 1024,  # train.threads, --threads (libgomp aborts far beyond the cores)
    "seeds": 10_000,  # how many seeds (--seeds N)
    "budget": 100.0,  # a method's budget, in units of train.epochs
    "grid": 1001,  # landscape.grid, --grid: grid**2 points per plane
    "line_points": 100_001,
    "rays": 100_000,
    "ray_points": 100_001,
}
"""Upper bounds of sizes a config or the command line sets: a typo (``epochs: 1e9``) is an error
before any work, not a memory error or a silent hang."""


def check_range(key: str, value: Any, low: int | float, limit: str) -> None:
    """``value`` in ``[low, LIMITS[limit]]``, else one line naming the value and the range."""
    high = LIMITS[limit]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not (_finite(value) and low <= value <= high):
        raise ConfigError(f"{key} must be in [{low:g}, {high:g}], got {value!r}")


def _check_values(cfg: ExperimentConfig) -> None:
    t, p, d = cfg.train, cfg.pretrain, cfg.data
    checks = [
        ("name", cfg.name[:40], _path_component(cfg.name), SAFE_NAME),
        ("train.epochs", t.epochs, t.epochs > 0, "> 0"),
        ("train.lr", t.lr, _finite(t.lr) and t.lr > 0, "> 0"),
        ("train.momentum", t.momentum, _finite(t.momentum) and 0 <= t.momentum < 1, "in [0, 1)"),
        ("train.batch_size", t.batch_size, t.batch_size > 0, "> 0"),
        ("train.eval_batch_size", t.eval_batch_size, t.eval_batch_size > 0, "> 0"),
        ("train.eval_every", t.eval_every, t.eval_every > 0, "> 0"),
        ("train.bn_batches", t.bn_batches, t.bn_batches is None or t.bn_batches > 0, "> 0 or null"),
        (
            "train.bn_weighting",
            t.bn_weighting,
            t.bn_weighting in ("batches", "samples"),
            "batches or samples",
        ),
        ("train.threads", t.threads, t.threads is None or t.threads > 0, ">= 1 or null"),
        ("train.device", t.device, bool(t.device.strip()), "a device (auto, cpu, cuda, cuda:1)"),
        (
            "train.weight_decay",
            t.weight_decay,
            _finite(t.weight_decay) and t.weight_decay >= 0,
            ">= 0",
        ),
        ("train.optimizer", t.optimizer, t.optimizer in OPTIMIZERS, f"one of {OPTIMIZERS}"),
        (
            "train.precision",
            t.precision,
            t.precision in PRECISIONS,
            f"one of {', '.join(PRECISIONS)}",
        ),
        ("pretrain.epochs", p.epochs, p.epochs >= 0, ">= 0"),
        ("pretrain.lr", p.lr, _finite(p.lr) and p.lr > 0, "> 0"),
        (
            "pretrain.weight_decay",
            p.weight_decay,
            _finite(p.weight_decay) and p.weight_decay >= 0,
            ">= 0",
        ),
        ("pretrain.optimizer", p.optimizer, p.optimizer in OPTIMIZERS, f"one of {OPTIMIZERS}"),
        ("data.train_size", d.train_size, d.train_size is None or d.train_size > 0, "> 0 or null"),
        ("data.test_size", d.test_size, d.test_size is None or d.test_size > 0, "> 0 or null"),
        ("data.root", d.root, bool(d.root), "a directory path"),
        (
            "seeds",
            cfg.seeds,
            len(cfg.seeds) > 0 and len(set(cfg.seeds)) == len(cfg.seeds),
            "distinct, at least one",
        ),
        ("seeds", cfg.seeds, all(0 <= s < 2**31 for s in cfg.seeds), "in [0, 2**31)"),
        ("methods", len(cfg.methods), len(cfg.methods) > 0, "at least one method"),
        (
            "landscape.pieces",
            cfg.landscape.pieces,
            set(cfg.landscape.pieces) <= set(LANDSCAPE_PIECES),
            f"a list of {', '.join(LANDSCAPE_PIECES)}",
        ),
        (
            "landscape.first_seed",
            cfg.landscape.first_seed,
            isinstance(cfg.landscape.first_seed, list)
            and set(cfg.landscape.first_seed) <= set(LANDSCAPE_PIECES),
            f"a list of {', '.join(LANDSCAPE_PIECES)}",
        ),
        (
            "landscape.line_points",
            cfg.landscape.line_points,
            cfg.landscape.line_points >= 2,
            ">= 2",
        ),
        ("landscape.rays", cfg.landscape.rays, cfg.landscape.rays >= 1, ">= 1"),
        ("landscape.ray_points", cfg.landscape.ray_points, cfg.landscape.ray_points >= 2, ">= 2"),
        ("landscape.grid", cfg.landscape.grid, cfg.landscape.grid >= 2, ">= 2"),
        *(
            (
                f"landscape.{key}",
                getattr(cfg.landscape, key),
                getattr(cfg.landscape, key) >= 1,
                ">= 1",
            )
            for key in ("curvature_samples", "curvature_iterations", "curvature_probes")
        ),
        (
            "landscape.directions",
            cfg.landscape.directions,
            isinstance(cfg.landscape.directions, list)
            and len(cfg.landscape.directions) >= 1
            and len(set(cfg.landscape.directions)) == len(cfg.landscape.directions)
            and set(cfg.landscape.directions) <= {"filter", "layer", "raw"},
            "a non-empty list of distinct filter, layer, raw",
        ),
        (
            "landscape.rise",
            cfg.landscape.rise,
            _finite(cfg.landscape.rise) and cfg.landscape.rise > 0,
            "> 0",
        ),
    ]
    for key, value, ok, expected in checks:
        if not ok:
            if isinstance(value, float) and not math.isfinite(value):
                expected = f"a finite number {expected}"
            raise ConfigError(f"{key} must be {expected}, got {value!r}")
    # upper bounds (the lower ones above): one line naming the allowed range
    check_range("train.epochs", t.epochs, 1, "epochs")
    check_range("pretrain.epochs", p.epochs, 0, "epochs")
    if t.threads is not None:
        check_range("train.threads", t.threads, 1, "threads")
    if len(cfg.seeds) > LIMITS["seeds"]:
        raise ConfigError(
            f"seeds must hold at most {LIMITS['seeds']:g} seeds, got {len(cfg.seeds)}"
        )
    landscape = cfg.landscape
    check_range("landscape.grid", landscape.grid, 2, "grid")
    check_range("landscape.line_points", landscape.line_points, 2, "line_points")
    check_range("landscape.rays", landscape.rays, 1, "rays")
    check_range("landscape.ray_points", landscape.ray_points, 2, "ray_points")
    check_trackers(cfg.train.log, packages=False)  # names only: a report needs no tracker package
    if t.compile:
        check_compile()  # the device's part when a run starts (Precision)
    for key, options in (("data.options", d.options), ("model.options", cfg.model.options)):
        _check_finite(key, options)
    _check_option_types(cfg)
    labels = [m.label for m in cfg.methods]
    seen: dict[str, str] = {}
    for i, m in enumerate(cfg.methods):
        reserved = unicodedata.normalize("NFKC", m.label).casefold() in RESERVED_LABELS
        if not _path_component(m.label) or reserved:
            shown = m.label if len(m.label) <= 40 else m.label[:40] + "..."
            what = f"not one of {RESERVED_LABELS}" if reserved else SAFE_NAME
            raise ConfigError(
                f"methods[{i}].label must be {what}, got {shown!r} ({len(m.label)} characters)"
            )
        key = unicodedata.normalize("NFKC", m.label).casefold()
        if key in seen:
            same = (
                "more than once"
                if seen[key] == m.label
                else f"and {seen[key]!r} (the same folder name)"
            )
            raise ConfigError(f"method labels must be unique, got {m.label!r} {same}")
        seen[key] = m.label
    for m in cfg.methods:
        if not (_finite(m.budget) and 0 < m.budget <= LIMITS["budget"]):
            raise ConfigError(
                f"methods.{m.label}.budget must be in (0, {LIMITS['budget']:g}], got {m.budget}"
            )
        if m.lr is not None and not (_finite(m.lr) and m.lr > 0):
            raise ConfigError(f"methods.{m.label}.lr must be a finite number > 0, got {m.lr}")
        if m.baseline and m.baseline not in labels:
            raise ConfigError(
                f"methods.{m.label}.baseline must be a method label, got {m.baseline!r}"
            )
        _check_finite(f"methods.{m.label}.options", m.options)
    if isinstance(t.save_trajectory, list):
        unknown = [x for x in t.save_trajectory if x not in labels]
        if unknown:
            raise ConfigError(
                f"train.save_trajectory must be true, false or a list of method labels "
                f"({', '.join(labels)}), got {unknown[0]!r}"
            )


def _keep_snapshots(cfg: ExperimentConfig) -> None:
    """The landscape pieces that read the SWA run's snapshots (``ensemble``, ``snapshots``, and
    ``plane``: its start is an iterate of that run) make
    that run keep them: its label joins ``train.save_trajectory`` (so a preset's section still
    works when ``--set methods=...`` renames or drops runs; the run directory's config.yaml shows
    the list that was used)."""
    sgd, swa = cfg.default_label("baseline"), cfg.default_label("average")
    pieces = cfg.landscape.pieces + (cfg.landscape.first_seed if cfg.landscape.pieces else [])
    needs = set(pieces) & {"ensemble", "snapshots", "plane"}
    if needs and sgd is not None and swa is not None and not cfg.train.saves_trajectory(swa):
        cfg.train.save_trajectory = [*(cfg.train.save_trajectory or []), swa]


def _check_posthoc(cfg: ExperimentConfig) -> None:
    """``posthoc.run: auto`` becomes the label of the SWA run with the largest budget (whose
    trajectory holds the shorter ones'), or "" when there is none (so a preset's section still
    works when ``--set methods=...`` drops runs; config.yaml shows the label used)."""
    p, labels = cfg.posthoc, [m.label for m in cfg.methods]
    if p.run == "auto":
        swa = [m for m in cfg.methods if m.method == "swa"]
        p.run = max(swa, key=lambda m: m.budget).label if swa else ""
    if p.run and p.run not in labels:
        raise ConfigError(
            f"posthoc.run must be a method label ({', '.join(labels)}) or auto, got {p.run!r}"
        )
    if isinstance(p.every, bool) or not isinstance(p.every, int) or p.every < 1:
        raise ConfigError(f"posthoc.every must be an integer >= 1, got {p.every!r}")
    for key, values in (("posthoc.starts", p.starts), ("posthoc.ends", p.ends)):
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 1]
        if bad:
            raise ConfigError(f"{key} must be 1-based epochs (integers >= 1), got {bad[0]!r}")


SAFE_NAME = (
    "a plain folder name (1-100 characters; no '/', '\\', control characters; "
    "not starting with '.')"
)
# folders and files of a run directory (a label is a folder name beside them)
RESERVED_LABELS = (
    "pretrain",
    "landscape",
    "report",
    "config.yaml",
    "meta.json",
    "results.csv",
    "tb",
    "mlflow.db",
    "mlartifacts",
    "wandb",
)


def _path_component(name: str) -> bool:
    """Whether ``name`` is one safe folder name: it cannot lead out of its parent or hide there."""
    return (
        0 < len(name) <= 100
        and name == name.strip()
        and not name.startswith(".")
        and "/" not in name
        and "\\" not in name
        and not any(ord(c) < 32 or ord(c) == 127 for c in name)
    )


def _finite(value: float) -> bool:
    return math.isfinite(value)


def _check_option_types(cfg: ExperimentConfig) -> None:
    """Where a builder's parameter is annotated bool, int, float or str, the option's value must be
    one (``bn: maybe`` is an error, not ``True``). Unknown names and options are reported by
    :func:`check_parts`, with the other config errors."""
    for key, registry, name, options in (
        ("model.options", MODELS, cfg.model.name, cfg.model.options),
        ("data.options", DATASETS, cfg.data.name, cfg.data.options),
    ):
        if name not in registry:
            continue
        try:
            hints = typing.get_type_hints(registry.get(name))
        except (NameError, TypeError):  # an annotation that does not resolve is not checked
            hints = {}
        for option, value in options.items():
            tp = hints.get(option)
            union = typing.get_origin(tp) in (typing.Union, types.UnionType)
            scalar = typing.get_args(tp) if union else (tp,)
            if tp is not None and all(t in (bool, int, float, str, type(None)) for t in scalar):
                _coerce(value, tp, f"{key}.{option}")


def _check_finite(key: str, value: Any) -> None:
    """Numbers anywhere in free-form options must be finite (``.nan``, ``.inf`` are typos)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(f"{key}.{k}", v)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_finite(f"{key}[{i}]", v)


OPTIMIZERS = ("sgd", "adam", "adamw")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the annotation ``tp`` (ints accepted as floats), or ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in hints:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"unknown config key {where!r} (known: {', '.join(names)})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    if cls is MethodConfig and "method" not in kwargs:
        raise ConfigError(f"{prefix} needs a 'method'")
    return cls(**kwargs)


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as plain data (what is saved in every run directory)."""
    return dataclasses.asdict(cfg)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


MAX_CONFIG_BYTES = 1 << 20  # a config is a page of YAML; anything near this size is not one


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without aliases: ``*name`` is refused, so a few hundred bytes cannot
    expand into millions of nodes (the "billion laughs" alias bomb)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(
                f"YAML aliases are not supported (*{event.anchor} at line "
                f"{event.start_mark.line + 1}); write the value out"
            )
        return super().compose_node(parent, index)


def parse_yaml(text: str) -> Any:
    """YAML text to plain data with the safe loader, aliases refused."""
    return yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader subclass


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from ``path``; an unreadable, oversized or invalid file: a one-line error."""
    try:
        with path.open("rb") as f:  # bounded: a link to /dev/zero is not read forever
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"larger than {MAX_CONFIG_BYTES} bytes; is it a swalab config?")
        data = parse_yaml(raw.decode())
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys")
    return data


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in nested ``data``; inside ``methods`` an item is addressed by its label,
    which may itself contain dots (``methods.swa-1.5B.budget``)."""
    parts = dotted.split(".")
    node: Any = data
    i = 0
    while i < len(parts) - 1:
        if isinstance(node, list):
            labels = [_label(m) for m in node if isinstance(m, dict)]
            j = next(
                (j for j in range(len(parts) - 1, i, -1) if ".".join(parts[i:j]) in labels), None
            )
            if j is None:
                raise ConfigError(
                    f"no method labelled {parts[i]!r} for --set {dotted} (labels: {', '.join(labels)})"
                )
            node = node[labels.index(".".join(parts[i:j]))]
            i = j
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted}: {'.'.join(parts[:i])} is not a mapping")
        node = node.setdefault(parts[i], {})
        i += 1
    if not isinstance(node, dict):
        raise ConfigError(
            f"cannot set {dotted}: address a method by its label, e.g. methods.swa.budget"
        )
    node[parts[-1]] = value


def _label(method: dict[str, Any]) -> str:
    if method.get("label"):
        return str(method["label"])
    budget = float(method.get("budget", 1.0))
    return str(method.get("method")) if budget == 1.0 else f"{method.get('method')}-{budget:g}B"


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as YAML (``3``, ``0.1``, ``[0, 1]``, ``true``, ``adam``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not p for p in key.strip().split(".")):
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        key, value = parse_override(text)
        _set_path(data, key, value)
    return data


def load_config(
    source: str, overrides: list[str] | None = None, variant: str | None = None
) -> ExperimentConfig:
    """The config of a preset name or a YAML file, with a variant's and ``--set`` overrides applied."""
    path = Path(source)
    if source.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file {source} not found")
    else:
        path = PRESET_DIR / f"{source}.yaml"
        if not path.is_file():
            import difflib

            close = difflib.get_close_matches(source, preset_names(), n=3, cutoff=0.4)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"unknown preset {source!r}{hint} (see `swalab list`)")
    data = read_yaml(path)
    data.setdefault("name", path.stem)
    if variant is not None:
        variants = data.get("variants") or {}
        if variant not in variants:
            known = ", ".join(variants) or "none"
            raise ConfigError(
                f"preset {data['name']!r} has no variant {variant!r} (variants: {known})"
            )
        for key, value in variants[variant].items():
            _set_path(data, key, value)
    apply_overrides(data, overrides or [])
    cfg = _build(ExperimentConfig, data)
    check_parts(cfg)
    return cfg


def check_parts(cfg: ExperimentConfig) -> None:
    """Build and check what the config names, before any data is loaded or any run trains: the
    dataset and its options, the model and its options, and every method's recipe (its options,
    their values, and epochs such as ``swa_start`` against the run's length). A name reading a
    run may not import (``--allow-import``) is skipped: it was checked when the run was made.

    Raises:
        ConfigError: naming every problem found, in one line.
    """
    errors: list[str] = []
    dataset_error, model_error = (
        _lookup_error(DATASETS, cfg.data.name),
        _lookup_error(MODELS, cfg.model.name),
    )
    if dataset_error is None:
        pass  # reading a run whose dataset code is not allowed: checked when built, if ever
    elif dataset_error:
        errors.append(f"data.name: {dataset_error}")
    else:
        params = inspect.signature(DATASETS.get(cfg.data.name)).parameters
        known = set(params) - {"root", "download", "seed"}
        unknown = sorted(set(cfg.data.options) - known)
        if unknown:
            errors.append(
                f"unknown data.options {unknown} for dataset {cfg.data.name!r} "
                f"(known: {sorted(known)})"
            )
    if model_error == "":
        try:  # a builder swalab cannot call (signature) fails here, before any output
            known = set(default_options(cfg.model.name))
        except ValueError as err:
            model_error = str(err).splitlines()[0]
    if model_error is None:
        pass  # as the dataset: the model is built (and imported) only by what needs it
    elif model_error:
        errors.append(f"model.name: {model_error}")
    else:
        unknown = sorted(set(cfg.model.options) - known)
        if unknown:
            errors.append(
                f"unknown model.options {unknown} for model {cfg.model.name!r} "
                f"(known: {sorted(known)})"
            )
    for m in cfg.methods:
        if reading_a_run() and ":" in m.method:
            continue  # a method of the run's own code: imported only by what builds its recipe
        try:
            recipe_of(m, cfg.train)
        except (ValueError, TypeError) as err:
            errors.append(f"methods.{m.label}: {str(err).splitlines()[0]}")
    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        raise ConfigError(f"{len(errors)} config errors: " + "; ".join(errors))


def _lookup_error(registry: Any, name: str) -> str | None:
    """The first line of the error looking ``name`` up raises, "" when it is found, None when it
    is a run's own code and a run directory is read (``registry.reading_a_run``): the config was
    checked when the run was made, and only what builds the part imports it (or stops with one
    line naming ``--allow-import``)."""
    if reading_a_run() and ":" in name:
        return None
    try:
        registry.get(name)
    except ValueError as err:
        return str(err).splitlines()[0]
    return ""
