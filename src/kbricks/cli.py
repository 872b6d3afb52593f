"""``kbricks`` command line: train, evaluate, list. Errors caused by input print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from .errors import KbricksError


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .trainer import run_training

    if args.config is None:
        if not (args.resume and args.run_dir):
            raise KbricksError("give a config file, or --resume with --run-dir to continue a run")
        config_path = Path(args.run_dir) / "config.yaml"
    else:
        config_path = Path(args.config)
    cfg = load_config(config_path, args.override)
    summary = run_training(cfg, Path(args.run_dir) if args.run_dir else None, resume=args.resume)
    from . import dist

    if dist.is_main_process():
        print(json.dumps(summary, indent=2))
    dist.shutdown()
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_run

    result = evaluate_run(Path(args.run_dir), checkpoint=args.checkpoint)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from .data import list_datasets
    from .methods import list_methods
    from .models import list_models

    what = {
        "models": lambda: list_models(args.pattern),
        "datasets": lambda: list_datasets(args.pattern),
        "methods": lambda: list_methods(args.pattern),
        "configs": lambda: sorted(str(p) for p in Path(args.configs_dir).rglob("*.yaml")),
    }
    for kind in [args.kind] if args.kind != "all" else ["models", "datasets", "methods", "configs"]:
        print(f"{kind}:")
        for name in what[kind]():
            print(f"  {name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kbricks", description="Modular knowledge transfer between neural networks.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a YAML config (also under torchrun for DDP)")
    t.add_argument("config", nargs="?", help="YAML config (omit with --resume --run-dir to reuse the run's config)")
    t.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE", help="e.g. -o optim.lr=0.1")
    t.add_argument("--run-dir", help="where to write the run (default: <out_dir>/<name>/<time>-seed<seed>)")
    t.add_argument("--resume", action="store_true", help="continue from <run-dir>/ckpt/last.pt")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("evaluate", help="evaluate a finished or running run directory")
    e.add_argument("run_dir")
    e.add_argument("--checkpoint", choices=["last", "best"], default="last")
    e.set_defaults(func=_cmd_evaluate)

    ls = sub.add_parser("list", help="list registered models, datasets, methods, or shipped configs")
    ls.add_argument("kind", nargs="?", default="all", choices=["all", "models", "datasets", "methods", "configs"])
    ls.add_argument("--pattern", default="*", help="shell wildcard, e.g. 'resnet*'")
    ls.add_argument("--configs-dir", default="configs")
    ls.set_defaults(func=_cmd_list)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KbricksError as exc:
        print(f"kbricks: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kbricks: interrupted; resume with --resume --run-dir <run dir>", file=sys.stderr)
        return 130
