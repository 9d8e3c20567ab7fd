"""``swalab`` command line: list presets and registries, run experiments.

swalab --version
swalab list
swalab run mnist1d
swalab run mnist1d --jobs 2
swalab run cifar100-vgg16 --executor submitit --executor-option partition=gpu
swalab run mnist1d --executor ray --executor-option num_gpus=0.25
swalab plan cifar10-wrn28x10 --variant gpu
swalab run cifar100-vgg16 --download --seeds 3 --set train.batch_size=256
swalab run my_experiment.yaml --out runs/x
torchrun --standalone --nproc_per_node=8 -m swalab run cifar100-vgg16 --download
swalab landscape runs/mnist1d --grid 21 --rays 10
swalab landscape runs/mnist1d --seed all --what line,rays,ensemble,bn
swalab claims runs/mnist1d
swalab posthoc runs/mnist1d --start 10 20 25 --end 30 45
swalab status runs/mnist1d
swalab report runs/mnist1d --html --format png,svg,pdf
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _options(builder: Callable[..., Any], skip: tuple[str, ...]) -> str:
    """``name=default`` for every keyword option of a registered builder."""
    params = inspect.signature(builder).parameters.values()
    shown = [
        p for p in params if p.name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    return ", ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in shown)


def _cmd_list(args: argparse.Namespace) -> int:
    from .data import DATASETS
    from .lab.config import load_config, preset_names
    from .lab.methods import METHODS
    from .models import MODELS

    print("presets (swalab run NAME [--variant V]):")
    for name in preset_names():
        cfg = load_config(name)
        variants = f"  [variants: {', '.join(cfg.variants)}]" if cfg.variants else ""
        print(f"  {name:<26} {cfg.description}{variants}")
    fixed = {
        "datasets": ("root", "download", "seed"),
        "models": ("in_shape", "num_outputs"),
        "methods": ("run",),
    }  # what the lab passes itself
    for title, registry in (("datasets", DATASETS), ("models", MODELS), ("methods", METHODS)):
        print(f"{title}:  (options with their defaults; your own: package.module:callable)")
        for name in registry.names():
            print(f"  {name:<26} {registry.describe(name)}")
            options = _options(registry.get(name), fixed[title])
            if options:
                indent = " " * 29
                print(
                    textwrap.fill(
                        options, width=100, initial_indent=indent, subsequent_indent=indent
                    )
                )
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .lab.config import check_range, load_config
    from .lab.devices import resolve_device
    from .lab.distributed import setup
    from .lab.files import run_directory
    from .lab.inputs import check_inputs
    from .lab.jobs import auto_jobs
    from .lab.runner import run_experiment

    overrides = list(args.set)
    if args.seeds is not None:
        check_range("--seeds", args.seeds, 1, "seeds")
        overrides.append(f"seeds={list(range(args.seeds))}")
    if args.device is not None:
        resolve_device(args.device, "--device")
        overrides.append(f"train.device={args.device}")
    cfg = load_config(args.config, overrides, args.variant)
    resolve_device(cfg.train.device, "train.device")
    check_inputs(cfg, args.download)  # data and model options, offline data: before --out
    labels = [m.label for m in cfg.methods]
    for label in args.restart_run:
        if label not in labels:
            raise ValueError(
                f"--restart-run {label!r} is not a method label of this experiment "
                f"(labels: {', '.join(labels)})"
            )
    out = _out(args, cfg)
    world = setup(
        cfg.train.batch_size, cfg.train.device, args.dist_timeout
    )  # one process unless under torchrun
    from .lab.executors import parse_options

    executor_options = parse_options(args.executor_option)
    if args.executor != "local" and args.jobs is not None:
        raise ValueError(
            f"--jobs is for --executor local; --executor {args.executor} runs one job per seed "
            "tree (set its resources with --executor-option)"
        )
    jobs = 1 if args.executor != "local" else "auto" if args.jobs is None else args.jobs
    if jobs == "auto":
        device = world.device if world.size > 1 else resolve_device(cfg.train.device)
        jobs = auto_jobs(cfg.train.threads, device, len(cfg.seeds) * len(cfg.methods), world.size)
    try:
        # rank 0 alone writes; several `swalab run` on one --out share its runs (lab/leases.py)
        with run_directory(out, lock=False) if world.main else contextlib.nullcontext():
            rows = run_experiment(
                cfg,
                out,
                download=args.download,
                argv=sys.argv,
                progress=sys.stderr.isatty(),
                world=world,
                jobs=jobs,
                restart=args.restart_run,
                share=not args.no_share,
                executor=args.executor,
                executor_options=executor_options,
            )
    except BaseException:
        world.close(finished=False)
        raise
    world.close()
    if world.main and rows and cfg.landscape.pieces:  # what `swalab claims` reads, every seed
        from .lab.leases import Claims
        from .report.geometry import landscapes_of_run

        with Claims(out) as claims:  # one of the processes sharing --out computes them
            if claims.claim("landscape"):
                with run_directory(out, lock=False):  # after the other ranks have left
                    landscapes_of_run(out, jobs=min(jobs, len(cfg.seeds)))
            else:
                print(f"landscape pieces: computed by another process ({out})", file=sys.stderr)
    if world.main and rows:
        from .lab.runimports import imported_modules

        print(next_steps(out, sorted(imported_modules(cfg, out))))
    return 0


def next_steps(out: Path, own_modules: list[str] | None = None) -> str:
    """What to run after ``swalab run``: the report and the claims (printed after the table);
    the landscape rebuilds the model, so it allows the config's own modules (``own_modules``)."""
    allow = "".join(f" --allow-import {m}" for m in own_modules or [])
    return (
        "\nNext:\n"
        f"  swalab report {out} --html    the report: tables, learning curves, landscape, times\n"
        f"  swalab claims {out}           a verdict on each of the paper's claims\n"
        f"  swalab landscape {out} --what predictions{allow}\n"
        "      the calibration (reliability diagrams) in the report, where the run did not compute it\n"
        f"  swalab landscape {out} --seed all --what plane{allow}\n"
        "      the paper's Fig. 1 plane of every seed (the run computes the first seed's if its\n"
        "      landscape.first_seed asks for it, as the default preset does)"
    )


def _cmd_plan(args: argparse.Namespace) -> int:
    from .lab.config import load_config
    from .lab.devices import resolve_device
    from .lab.plan import plan_experiment

    device = None if args.device is None else resolve_device(args.device, "--device")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    cfg = load_config(args.config, args.set, args.variant)
    if device is None:
        device = resolve_device(cfg.train.device, "train.device")

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    print(plan_experiment(cfg, _out(args, cfg), device, args.repeats, log=say).format(cfg))
    return 0


def _out(args: argparse.Namespace, cfg: Any) -> Path:
    """``--out``, or the run directory of the preset (and its variant) under ``runs/``."""
    if args.out is not None and not args.out.strip():
        raise ValueError("--out must be a directory path, got ''")
    if args.out:
        return Path(args.out)
    return Path("runs") / (cfg.name + (f"-{args.variant}" if args.variant else ""))


def _cmd_landscape(args: argparse.Namespace) -> int:
    from .lab.devices import resolve_device
    from .report import LandscapeOptions, compute_landscape
    from .report.rundir import RunDir

    if args.device is not None:
        resolve_device(args.device, "--device")
    what = [w.strip() for w in args.what.split(",") if w.strip()] if args.what else None
    if args.seed is None or args.seed == "all":
        seeds = RunDir(args.run_dir).cfg.seeds if args.seed == "all" else [None]
    else:
        try:
            seeds = [int(args.seed)]
        except ValueError:
            raise ValueError(f"--seed must be an integer or 'all', got {args.seed!r}") from None
    # the protocol of the run's landscape: section unless given here (the claims compare seeds)
    run = RunDir(args.run_dir) if Path(args.run_dir).is_dir() else None
    if run is not None:
        run.check_code()  # the run's own model code is allowed (--allow-import), before any work
    protocol = run.cfg.landscape if run is not None else None
    given = {
        key: value
        for key, value in (
            ("grid", args.grid),
            ("line_points", args.line_points),
            ("rays", args.rays),
            ("ray_points", args.ray_points),
            ("rise", args.rise),
            ("ray_tails", args.ray_tails),
            ("curvature_samples", args.curvature_samples),
            ("curvature_iterations", args.curvature_iterations),
            ("curvature_probes", args.curvature_probes),
            (
                "directions",
                tuple(d.strip() for d in args.directions.split(",") if d.strip())
                if args.directions is not None
                else None,
            ),
        )
        if value is not None
    }
    with _writing(args.run_dir):
        for seed in seeds:
            base = LandscapeOptions() if protocol is None else LandscapeOptions.of_config(protocol)
            options = base.replace(
                seed=seed,
                sgd=args.sgd,
                swa=args.swa,
                what=what,
                margin=args.margin,
                ray_distance=args.ray_distance,
                device=args.device,
                threads=args.threads,
                stack=args.stack,
                **given,
            )
            compute_landscape(args.run_dir, options, progress=sys.stderr.isatty())
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from .lab.status import format_status, run_status

    print(format_status(args.run_dir, run_status(args.run_dir)))
    return 0


def _cmd_claims(args: argparse.Namespace) -> int:
    from .report.claims import evaluate_claims, format_claims

    print(format_claims(evaluate_claims(args.run_dir)))
    return 0


def _cmd_posthoc(args: argparse.Namespace) -> int:
    from .report.windows import evaluate_windows

    with _writing(args.run_dir):
        path = evaluate_windows(args.run_dir, args.start, args.end, device=args.device)
    print(f"window map: {path}; rows in {Path(args.run_dir) / 'posthoc.csv'}")
    return 0


def _writing(run_dir: str) -> contextlib.AbstractContextManager:
    """Writes of ``swalab landscape``/``report`` stay inside the run directory (no lock: they only
    add their own files); a missing directory is reported by the command itself."""
    from .lab.files import run_directory

    return (
        run_directory(run_dir, lock=False) if Path(run_dir).is_dir() else contextlib.nullcontext()
    )


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report

    formats = [f.strip().lower() for f in args.format.split(",") if f.strip()]
    with _writing(args.run_dir):
        build_report(args.run_dir, html_page=args.html, formats=formats)
    return 0


def _experiment_arguments(p: argparse.ArgumentParser, variants: str) -> None:
    """The experiment of ``run`` and ``plan``: a preset or YAML file, its variant, overrides."""
    p.add_argument("config", help="preset name (see `swalab list`) or path to a YAML config")
    p.add_argument("--variant", help=f"a preset variant, e.g. {variants}")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. train.lr=0.05 or methods.swa.options.swa_lr=0.02",
    )


def _jobs(text: str) -> int | str:
    """``--jobs``: an integer (checked against the runs later) or ``auto``."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer >= 1 or auto, got {text!r}"
        ) from None


def _version() -> str:
    from . import __version__

    return __version__


def _allow_import(p: argparse.ArgumentParser) -> None:
    """Commands that read a run directory import no code it names, unless allowed here."""
    p.add_argument(
        "--allow-import",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE if the run's config.yaml names it (model: MODULE:callable); "
        "without it, reading a run never imports code it names; repeatable",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swalab", description="Stochastic Weight Averaging laboratory"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"swalab {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="presets, datasets, models and methods")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser(
        "run", help="run an experiment (a preset name or a YAML file); re-run to resume"
    )
    _experiment_arguments(p, "cpu or full")
    p.add_argument("--out", help="run directory (default: runs/<name>)")
    p.add_argument("--seeds", type=int, help="run seeds 0..N-1 (default: the preset's)")
    p.add_argument("--download", action="store_true", help="download datasets that are missing")
    p.add_argument(
        "--restart-run",
        action="append",
        default=[],
        metavar="LABEL",
        help="delete the runs of method LABEL (every seed) in --out and train them again, "
        "e.g. after an unreadable file; repeatable",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument(
        "--jobs",
        type=_jobs,
        default=None,
        metavar="N",
        help="train N trajectories (a seed's runs that share epochs) at once, in N processes, "
        "then N seeds' landscape pieces; auto (default): the CPU cores divided by "
        "train.threads (1 if unset), or one per GPU",
    )
    p.add_argument(
        "--executor",
        default="local",
        metavar="local|submitit|ray",
        help="where the seed trees train: local (default: --jobs processes here), submitit "
        "(one Slurm job per seed tree; pip install 'swalab[slurm]') or ray (one task per seed "
        "tree on RAY_ADDRESS or a local cluster; pip install 'swalab[ray]'); see docs/distributed.md",
    )
    p.add_argument(
        "--executor-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of --executor: submitit: partition, time (minutes), gpus_per_node, "
        "cpus_per_task, mem_gb, array_parallelism, account, qos, constraint, max_requeue, "
        "cluster (slurm|local), folder; ray: address, num_gpus (a fraction packs trees on a "
        "GPU), num_cpus; repeatable",
    )
    p.add_argument(
        "--no-share",
        action="store_true",
        help="train every (method, seed) run separately, even where one run's epochs are the "
        "first epochs of another's (e.g. SWA at 1B inside SWA at 1.5B)",
    )
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="under torchrun: how long a process waits for the others to join (default: 60)",
    )
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "plan",
        help="the epochs an experiment will train per seed, with and without shared trajectories, "
        "and its wall time here from a few timed training steps (no data is read)",
    )
    _experiment_arguments(p, "cpu or gpu")
    p.add_argument("--device", help="where to time the steps (default: the config's train.device)")
    p.add_argument(
        "--out", help="the run directory whose runs resume (default: runs/<name>, as swalab run)"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed steps at most, after one warm-up step (default: 5; fewer past 20 s)",
    )
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser(
        "landscape", help="loss-landscape geometry of a run: line, rays, planes, ensemble view"
    )
    p.add_argument("run_dir", help="a run directory written by `swalab run`")
    p.add_argument(
        "--seed",
        help="which seed's runs, or 'all' (default: the first; seeds other than the "
        "first are written to RUN_DIR/landscape/seed<k>/)",
    )
    p.add_argument("--sgd", help="label of the SGD run (default: the sgd method at budget 1)")
    p.add_argument("--swa", help="label of the SWA run (default: the swa method at budget 1)")
    p.add_argument(
        "--what",
        help="comma-separated pieces: line,rays,plane,plane_init,snapshots,ensemble,predictions,"
        "bn,curvature (plane: the paper's Fig. 1, SGD and SWA from the same point; plane_init: "
        "through SGD's initialisation; default: all the run directory allows)",
    )
    p.add_argument(
        "--grid", type=int, help="points per side of the planes (default: the run's landscape.grid)"
    )
    p.add_argument(
        "--margin", type=float, default=0.2, help="plane margin beyond [0, 1] (default: 0.2)"
    )
    p.add_argument(
        "--line-points",
        type=int,
        help="points on the line, t in [-0.5, 1.5] (default: the run's landscape.line_points)",
    )
    p.add_argument("--rays", type=int, help="random directions (default: the run's landscape.rays)")
    p.add_argument(
        "--ray-points",
        type=int,
        help="points along each ray (default: the run's landscape.ray_points)",
    )
    p.add_argument(
        "--ray-distance",
        type=float,
        help="largest distance along a ray (raw directions: default ||w_SWA|| / 2; filter and "
        "layer: in units of the normalised direction, default 0.25)",
    )
    p.add_argument(
        "--directions",
        help="comma-separated scalings of the rays' random directions, the first the primary: "
        "filter (per output filter, Li et al. 2018), layer (per tensor), raw (unit Gaussian, the "
        "SWA paper's); default: the run's landscape.directions",
    )
    p.add_argument(
        "--rise",
        type=float,
        help="train-loss rise that defines the width (default: the run's landscape.rise)",
    )
    p.add_argument(
        "--ray-tails",
        action=argparse.BooleanOptionalAction,
        help="evaluate each ray beyond its width, for the figure (--no-ray-tails: stop there; "
        "the same widths; default: the run's landscape.ray_tails)",
    )
    for key, text in (
        ("samples", "training samples the Hessian of the curvature piece is taken over"),
        ("iterations", "power iterations for the Hessian's top eigenvalue"),
        ("probes", "Rademacher probes of Hutchinson's trace estimate"),
    ):
        p.add_argument(
            f"--curvature-{key}",
            type=int,
            help=f"{text} (default: the run's landscape.curvature_{key})",
        )
    p.add_argument("--device", help="cpu, cuda, ... (default: the run's train.device)")
    p.add_argument(
        "--threads", type=int, help="CPU threads for torch (default: the run's train.threads)"
    )
    p.add_argument(
        "--stack",
        type=int,
        default=1,
        help="points evaluated at once with stacked weights, torch.vmap (default: 1, one by one)",
    )
    _allow_import(p)
    p.set_defaults(func=_cmd_landscape)

    p = sub.add_parser(
        "status",
        help="every run of a run directory: done, running (where, since when, epoch), failed "
        "(why), stopped or waiting; works while processes on several machines share it",
    )
    p.add_argument("run_dir", help="a run directory written by `swalab run`")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser(
        "claims",
        help="the SWA paper's six claims checked on a run: statistic, paired 95%% "
        "interval over seeds, verdict, seeds needed to decide",
    )
    p.add_argument("run_dir", help="a run directory written by `swalab run`")
    _allow_import(p)
    p.set_defaults(func=_cmd_claims)

    p = sub.add_parser(
        "posthoc",
        help="SWA over a grid of (start, end) epoch windows from one run's snapshots "
        "(posthoc.run), BN recomputed: posthoc.csv and the window map",
    )
    p.add_argument("run_dir", help="a run directory written by `swalab run` with posthoc.run set")
    p.add_argument("--start", type=int, nargs="+", help="first averaged epochs (1-based)")
    p.add_argument("--end", type=int, nargs="+", help="last averaged epochs (1-based)")
    p.add_argument("--device", default="cpu", help="device for BN recomputation and evaluation")
    _allow_import(p)
    p.set_defaults(func=_cmd_posthoc)

    p = sub.add_parser(
        "report", help="report of a run (Markdown + PNGs; --html: one self-contained page)"
    )
    p.add_argument("run_dir", help="a run directory written by `swalab run`")
    p.add_argument(
        "--html", action="store_true", help="also write report/report.html with embedded images"
    )
    p.add_argument(
        "--format",
        default="png",
        metavar="png,svg,pdf",
        help="figure files, e.g. png,svg,pdf (default: png; PNG always)",
    )
    _allow_import(p)
    p.set_defaults(func=_cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or "--debug" in argv
    try:
        if hasattr(args, "allow_import"):  # a command that reads a run directory
            from .registry import imports_limited_to

            with imports_limited_to(args.allow_import):
                return args.func(args)
        return args.func(args)
    except KeyboardInterrupt:
        print(
            "interrupted: run the same command again to continue where it stopped", file=sys.stderr
        )
        return 130
    except RuntimeError as err:
        from .lab.jobs import RunsFailed

        if debug or not isinstance(err, RunsFailed):  # some runs failed, the others finished
            raise
        print(f"swalab: error: {err}", file=sys.stderr)
        return 1
    except (ValueError, OSError, KeyError) as err:
        if debug:
            raise
        from .lab.distributed import reported_by_rank0

        if reported_by_rank0(err):  # under torchrun: the same error is printed once, by rank 0
            return 2
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        if isinstance(err, OSError) and err.filename and not isinstance(err, FileNotFoundError):
            message = f"{err.filename}: {err.strerror or err}"  # e.g. an unreadable data file
        print(
            f"swalab: error: {message.splitlines()[0] if message else type(err).__name__}",
            file=sys.stderr,
        )
        return 2
