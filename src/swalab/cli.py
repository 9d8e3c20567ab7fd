"""``swalab`` command line: list presets and registries, run experiments.

    swalab list
    swalab run mnist1d
    swalab run cifar100-vgg16 --download --seeds 3 --set train.batch_size=256
    swalab run my_experiment.yaml --out runs/x
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]


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
    for title, registry in (("datasets", DATASETS), ("models", MODELS), ("methods", METHODS)):
        print(f"{title}:")
        for name in registry.names():
            print(f"  {name:<26} {registry.describe(name)}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .lab.config import load_config
    from .lab.runner import run_experiment

    overrides = list(args.set)
    if args.seeds is not None:
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
        overrides.append(f"seeds={list(range(args.seeds))}")
    if args.device:
        overrides.append(f"train.device={args.device}")
    cfg = load_config(args.config, overrides, args.variant)
    out = Path(args.out) if args.out else Path("runs") / (cfg.name + (f"-{args.variant}" if args.variant else ""))
    run_experiment(cfg, out, download=args.download, argv=sys.argv, progress=sys.stderr.isatty())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swalab", description="Stochastic Weight Averaging laboratory")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="presets, datasets, models and methods")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("run", help="run an experiment (a preset name or a YAML file); re-run to resume")
    p.add_argument("config", help="preset name (see `swalab list`) or path to a YAML config")
    p.add_argument("--out", help="run directory (default: runs/<name>)")
    p.add_argument("--seeds", type=int, help="run seeds 0..N-1 (default: the preset's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. train.lr=0.05 or methods.swa.options.swa_lr=0.02")
    p.add_argument("--variant", help="a preset variant, e.g. cpu or full")
    p.add_argument("--download", action="store_true", help="download datasets that are missing")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.set_defaults(func=_cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or "--debug" in argv
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue where it stopped", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, KeyError) as err:
        if debug:
            raise
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        print(f"swalab: error: {message.splitlines()[0] if message else type(err).__name__}", file=sys.stderr)
        return 2
