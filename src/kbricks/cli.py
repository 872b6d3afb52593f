"""``kbricks`` command line: train, evaluate, list. Errors caused by input print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from .errors import KbricksError


def config_path_of(args: argparse.Namespace) -> Path:
    """The config file given, or the run's own config.yaml when resuming without one."""
    if args.config is not None:
        return Path(args.config)
    if not (args.resume and args.run_dir):
        raise KbricksError("give a config file, or --resume with --run-dir to continue a run")
    return Path(args.run_dir) / "config.yaml"


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .trainer import run_training

    cfg = load_config(config_path_of(args), args.override)
    summary = run_training(cfg, Path(args.run_dir) if args.run_dir else None, resume=args.resume)
    from . import dist

    if dist.is_main_process():
        print(json.dumps(summary, indent=2))
    dist.shutdown()
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_run

    result = evaluate_run(Path(args.run_dir), checkpoint=args.checkpoint, baseline=args.baseline)
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


def _cmd_assemble(args: argparse.Namespace) -> int:
    from .bricks import assemble, save_assembled

    net = assemble(args.ckn, args.tsn)
    path = save_assembled(net, Path(args.out))
    result: dict = {"assembled": str(path), "tasks": [t.name for t in net.tasks], "classes": net.classes or None}
    if args.evaluate:
        result.update(evaluate_assembled(net))
    print(json.dumps(result, indent=2))
    return 0


def evaluate_assembled(net) -> dict:
    """Accuracy of an assembled network (and of its teacher) on the test split its CKN was trained on."""
    import torch

    from .config import DataConfig
    from .data import build_tasks
    from .kf_report import Predictor, teacher_predictor
    from .metrics import evaluate
    from .teachers import load_frozen
    from .trainer import build_transform, load_data

    prov = net.manifests[0]["provenance"]
    data_cfg = DataConfig.model_validate(prov["data"])
    data = load_data(data_cfg)
    transform = build_transform(data_cfg, data.train)
    test = data.test
    if net.is_class_union:
        test = test.subset(torch.isin(test.y, torch.tensor(net.classes)).nonzero().squeeze(1))
    out = {f"assembled/{k}": v for k, v in evaluate(Predictor(net), test, net.tasks, transform, torch.device("cpu")).items()}
    teacher = load_frozen(prov["teacher"], {"mean": transform.mean, "std": transform.std} if transform.mean else None)
    if net.is_class_union:  # the teacher restricted to the same classes
        cls = torch.tensor(net.classes)
        full = teacher_predictor(teacher, build_tasks(None, data.train))

        def restricted(x):
            s = full.predict(x)
            masked = torch.full_like(s, float("-inf"))
            masked[:, cls] = s[:, cls]
            return masked

        out["teacher/acc"] = evaluate(Predictor(restricted), test, net.tasks, transform, torch.device("cpu"))["acc"]
    else:
        out.update({f"teacher/{k}": v for k, v in evaluate(teacher_predictor(teacher, net.tasks), test, net.tasks, transform, torch.device("cpu")).items()})
    return out


def _cmd_study(args: argparse.Namespace) -> int:
    from .studies import run_cl_study, run_kf_study, run_sskt_study

    if args.kind == "sskt":
        summary = run_sskt_study(args.seeds, Path(args.out), quick=args.quick)
    elif args.kind == "cl":
        summary = run_cl_study(args.seeds, Path(args.out), quick=args.quick, scenario=args.scenario)
    else:
        if args.dataset is None:
            raise KbricksError("study kf needs --dataset")
        summary = run_kf_study(args.dataset, args.seeds, Path(args.out), quick=args.quick)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_continual(args: argparse.Namespace) -> int:
    from .continual.runner import load_continual_config, run_continual
    from .trainer import default_run_dir

    cfg = load_continual_config(config_path_of(args), args.override)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(cfg)
    result = run_continual(cfg, run_dir, resume=args.resume)
    print(json.dumps({k: v for k, v in result.items() if k != "accuracy_matrix"} | {"run_dir": str(run_dir)}, indent=2))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .studies import run_sweep

    summary = run_sweep(Path(args.config), args.seeds, Path(args.out), args.override, paired_split=not args.fixed_split)
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .results_tables import write_results

    print(write_results(Path(args.runs), Path(args.out)))
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from .reproduce import reproduce, write_reproduction

    if args.tables_only:
        from .reproduce import update_readme
        from .results_tables import write_results

        runs = Path(args.out) / ("runs-quick" if args.quick else "runs")
        if not args.quick:
            write_results(runs, Path(args.out))
            if Path("README.md").exists():
                update_readme(Path("README.md"), runs)
        print(write_reproduction(runs, Path(args.out), args.quick, args.minutes, "kbricks reproduce --tables-only"))
        return 0
    path = reproduce(args.quick, Path(args.out))
    print(path.read_text())
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
    e.add_argument("--baseline", help="KF runs: run directory of a KD student to compare with")
    e.set_defaults(func=_cmd_evaluate)

    c = sub.add_parser("continual", help="continual learning with supermasks (SupSup, ImpressLearn)")
    c.add_argument("config", nargs="?", help="YAML config (omit with --resume --run-dir)")
    c.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--run-dir")
    c.add_argument("--resume", action="store_true", help="continue after the last finished task")
    c.set_defaults(func=_cmd_continual)

    a = sub.add_parser("assemble", help="combine a CKN brick and TSN bricks into one network, without fine-tuning")
    a.add_argument("ckn", help="the CKN brick manifest (bricks/ckn.json)")
    a.add_argument("tsn", nargs="+", help="TSN brick manifests (bricks/tsn-<task>.json)")
    a.add_argument("--out", required=True, help="directory for assembled.safetensors + assembled.json")
    a.add_argument("--evaluate", action="store_true", help="score it (and its teacher) on the CKN's test split")
    a.set_defaults(func=_cmd_assemble)

    sw = sub.add_parser("sweep", help="train a config over several seeds; mean +/- std of last and best accuracy")
    sw.add_argument("config")
    sw.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    sw.add_argument("--out", required=True, help="directory for seed<k>/ runs, sweep.json and sweep.csv")
    sw.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    sw.add_argument("--fixed-split", action="store_true", help="keep data.kwargs.split_seed (default: the seed sets it too)")
    sw.set_defaults(func=_cmd_sweep)

    st = sub.add_parser("study", help="multi-seed studies: kf (teacher -> KF -> KD -> report) or cl (SupSup vs ImpressLearn)")
    st.add_argument("kind", choices=["kf", "cl", "sskt"])
    st.add_argument("--dataset", choices=["digits", "mnist5k", "dsprites"], help="kf only")
    st.add_argument("--scenario", choices=["permuted", "rotated"], default="permuted", help="cl only")
    st.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    st.add_argument("--out", default="results/runs")
    st.add_argument("--quick", action="store_true", help="3 epochs per run (smoke test)")
    st.set_defaults(func=_cmd_study)

    rep = sub.add_parser("reproduce", help="run every claim this project can test on CPU; write results/REPRODUCTION.md")
    rep.add_argument("--quick", action="store_true", help="small budgets, 3 seeds, under 10 minutes on 2 cores")
    rep.add_argument("--out", default="results")
    rep.add_argument("--tables-only", action="store_true", help="only re-evaluate the claims from existing runs")
    rep.add_argument("--minutes", type=float, default=0.0, help="with --tables-only: the measured run time to record")
    rep.set_defaults(func=_cmd_reproduce)

    rp = sub.add_parser("report", help="write RESULTS.md tables and plots from the studies' study.json files")
    rp.add_argument("--runs", default="results/runs")
    rp.add_argument("--out", default="results")
    rp.set_defaults(func=_cmd_report)

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
