"""``kbricks`` command line: parse the arguments and dispatch to the library. Errors caused by input print one line
and exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from .engine.launch import add_launcher_arguments, launcher_from_args, submit_command
from .engine.parallel import launching
from .errors import KbricksError


def config_path_of(args: argparse.Namespace) -> Path:
    """The config file given, or the run's own config.yaml when resuming without one."""
    if args.config is not None:
        return Path(args.config)
    if not (args.resume and args.run_dir):
        raise KbricksError("give a config file, or --resume with --run-dir to continue a run")
    return Path(args.run_dir) / "config.yaml"


def _print(obj) -> None:
    print(json.dumps(obj, indent=2))


def _cmd_train(args: argparse.Namespace) -> int:
    from .core import dist
    from .engine.experiment import load_config
    from .engine.run import run_training

    launcher = launcher_from_args(args)
    if launcher is not None:  # the same command, as a cluster job (under torchrun when it has several GPUs)
        return submit_command(launcher, args.argv)
    cfg = load_config(config_path_of(args), args.override)
    summary = run_training(cfg, Path(args.run_dir) if args.run_dir else None, resume=args.resume, overwrite=args.overwrite)
    if dist.is_main_process():
        _print({k: v for k, v in summary.items() if k != "accuracy_matrix"})
    dist.shutdown()
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .engine.evaluate import evaluate_run

    _print(evaluate_run(Path(args.run_dir), checkpoint=args.checkpoint, baseline=args.baseline))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from .data import DATASETS, SCENARIOS
    from .engine import experiment  # noqa: F401  (registers every method and model)
    from .methods.base import METHODS
    from .models import MODELS
    from .studies.common import configs_root

    def tagged(reg):
        return lambda: [f"{n}  [{', '.join(reg.tags(n))}]" if reg.tags(n) else n for n in reg.names(args.pattern, args.tag)]

    def configs():
        root = configs_root(Path(args.configs_dir) if args.configs_dir else None)
        return sorted(str(p.relative_to(root)) for p in root.rglob("*.yaml"))

    what = {"models": tagged(MODELS), "datasets": tagged(DATASETS), "scenarios": tagged(SCENARIOS), "methods": tagged(METHODS), "configs": configs}
    for kind in [args.kind] if args.kind != "all" else list(what):
        print(f"{kind}:")
        for name in what[kind]():
            print(f"  {name}")
    return 0


def _cmd_assemble(args: argparse.Namespace) -> int:
    from .methods.kf.bricks import assemble, save_assembled

    if args.store or args.classes:
        net, selection = _assemble_from_store(args)
    else:
        if not args.ckn or not args.tsn:
            raise KbricksError("assemble needs a CKN brick and TSN bricks (kbricks assemble CKN TSN... --out DIR), "
                               "or --store DIR --classes A,B to find them")
        if not args.out:
            raise KbricksError("assemble needs --out DIR (where to write the assembled network)")
        net, selection = assemble(args.ckn, args.tsn), None
    path = save_assembled(net, Path(args.out), overwrite=args.overwrite) if args.out else None
    result: dict = {"assembled": str(path) if path else None, "tasks": [t.name for t in net.tasks], "classes": net.classes or None}
    if selection is not None:
        result.update(class_names=net.info.get("class_names"), chosen=selection.to_dict())
        print(f"kbricks: chose {selection.line()}", file=sys.stderr)
    if args.evaluate:
        from .config import DataConfig
        from .engine.experiment import build_transform, load_data
        from .methods.kf.report import assembled_report

        data_cfg = DataConfig.model_validate(net.manifests[0]["provenance"]["data"])  # the CKN's own data and split
        data = load_data(data_cfg)
        result.update(assembled_report(net, data, build_transform(data_cfg, data.train)))
    _print(result)
    return 0


def _assemble_from_store(args: argparse.Namespace):
    from .methods.kf.catalog import assemble_selection, choose

    if args.ckn or args.tsn:
        raise KbricksError("give either brick paths or --store with --classes, not both")
    if not (args.store and args.classes):
        raise KbricksError("assembling by classes needs both --store DIR... and --classes A,B,...")
    selection = choose(args.store, args.classes)
    return assemble_selection(selection), selection


def _cmd_bricks(args: argparse.Namespace) -> int:
    """The brick catalog: list, show, search (exit 1 when a search finds nothing, like grep)."""
    from .methods.kf import catalog

    if args.action == "show":
        brick = catalog.describe(args.brick)
        print(json.dumps(brick.to_dict(), indent=2) if args.json else catalog.show_text(brick))
        return 0
    found = catalog.scan(args.dirs)
    if args.action == "list":
        print(json.dumps({"bricks": [b.to_dict() for b in found.bricks], "refused": [r.to_dict() for r in found.refused]}, indent=2)
              if args.json else catalog.catalog_text(found))
        return 0
    matches = found.search(classes=args.classes, ckn=args.ckn, task=args.task)
    refused = f" ({len(found.refused)} manifest(s) refused; kbricks bricks list shows why)" if found.refused else ""
    if args.json:
        print(json.dumps({"matches": [m.to_dict() for m in matches], "refused": [r.to_dict() for r in found.refused]}, indent=2))
    else:
        for m in matches:
            held = f"  holds {', '.join(m.classes)}" if m.classes else ""
            print(catalog.brick_line(m.brick) + held)
    if not matches:
        asked = ", ".join(f"{k} {v}" for k, v in (("classes", args.classes), ("ckn", args.ckn), ("task", args.task)) if v)
        print(f"kbricks: no brick under {', '.join(args.dirs)} matches {asked}{refused}", file=sys.stderr)
        return 1
    if refused:
        print(f"kbricks:{refused}", file=sys.stderr)
    return 0


def _cmd_options(args: argparse.Namespace) -> int:
    """A method's options (``method.*`` in a config): type, default, bounds and description from its Config."""
    from .engine import experiment  # noqa: F401  (registers every method)
    from .methods.base import METHODS, describe_options

    cls = METHODS.get(args.method)
    tags = METHODS.tags(args.method)
    print(f"method {args.method} ({cls.__module__}.{cls.__qualname__}{'; ' + ', '.join(tags) if tags else ''})")
    doc = (cls.__doc__ or "").strip().splitlines()
    if doc:
        print(f"  {doc[0]}")
    options = describe_options(cls.Config, "method.")
    if not options:
        print("  no options")
    for o in options:
        bounds = f", {o['constraints']}" if o["constraints"] else ""
        default = "required" if o["default"] == "required" else f"default {o['default']}"
        print(f"  {o['name']}: {o['type']} ({default}{bounds})")
        if o["description"]:
            print(f"      {o['description']}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .engine.export import check_export_target, export, format_for, load_network, random_input

    check_export_target(Path(args.out), args.overwrite)  # an existing file or a bad name fails before the network is loaded
    format_for(args.out, args.format)
    net = load_network(args.source)
    x = random_input(net, batch=args.batch, shape=args.input_shape)
    _print(export(net, Path(args.out), format=args.format, example_input=x, atol=args.atol, torchscript=args.torchscript,
                  overwrite=args.overwrite))
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    with launching(launcher_from_args(args)):
        return _study(args)


def _study(args: argparse.Namespace) -> int:
    from .studies import run_cl_study, run_kf_study, run_sskt_study

    common = dict(quick=args.quick, configs=Path(args.configs) if args.configs else None)
    if args.kind == "sskt":
        summary = run_sskt_study(args.seeds, Path(args.out), **common)
    elif args.kind == "cl" and args.baselines:
        from .studies.cl_baselines import run_cl_baselines_study

        summary = run_cl_baselines_study(args.seeds, Path(args.out), scenario=args.scenario, **common)
    elif args.kind == "cl":
        summary = run_cl_study(args.seeds, Path(args.out), scenario=args.scenario, **common)
    elif args.kind == "library":
        from .studies.library import run_library_study

        summary = run_library_study(args.dataset or "digits", args.seeds, Path(args.out), **common)
    else:
        if args.dataset is None:
            raise KbricksError("study kf needs --dataset")
        summary = run_kf_study(args.dataset, args.seeds, Path(args.out), **common)
    _print(summary)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .engine.sweep import run_sweep

    with launching(launcher_from_args(args)):
        summary = run_sweep(Path(args.config), args.seeds, Path(args.out), args.override, paired_split=not args.fixed_split,
                            workers=args.workers)
    _print({k: v for k, v in summary.items() if k != "runs"})
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    """Every table from the raw results, no training: RESULTS.md (+ plots) and REPRODUCTION.md."""
    from .studies import write_reproduction, write_results

    runs, out = Path(args.runs), Path(args.out)
    quick = runs.name.endswith("-quick")
    if not quick:
        print(write_results(runs, out))
    print(write_reproduction(runs, out, quick, Path(getattr(args, "full_runs", "results/runs"))))
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from .studies import reproduce

    if args.scale == "paper":
        return _cmd_reproduce_paper(args)
    paper_only = [f for f, v in (("--data-root", args.data_root), ("--only", args.only), ("--seeds", args.seeds), ("--smoke", args.smoke),
                                 ("--check", args.check), ("-o", args.override)) if v]
    if paper_only:
        raise KbricksError(f"{paper_only[0]} goes with --scale paper")
    if args.tables_only:
        args.runs = str(Path(args.out) / ("runs-quick" if args.quick else "runs"))
        return _cmd_report(args)
    with launching(launcher_from_args(args)):
        path = reproduce(args.quick, Path(args.out), configs=Path(args.configs) if args.configs else None, workers=args.workers,
                         full_runs=Path(args.full_runs))
    print(path.read_text())
    return 0


def _cmd_reproduce_paper(args: argparse.Namespace) -> int:
    from .core import dist
    from .studies.paper import plan_text, run_paper_study, write_paper_table

    if args.quick:
        raise KbricksError("--quick is for --scale cpu; use --smoke to check a paper-scale set-up with 2 steps per run")
    if args.tables_only:
        print(write_paper_table(Path(args.out), args.smoke).read_text())
        return 0
    if args.data_root is None:
        raise KbricksError("--scale paper needs --data-root DIR (the folder holding cifar-10-batches-py/, cifar-100-python/, sskt-sources/)")
    if args.check:
        print(plan_text(Path(args.data_root), args.only))
        return 0
    path = run_paper_study(Path(args.data_root), Path(args.out), seeds=args.seeds or [0, 1, 2], only=args.only, smoke=args.smoke,
                           overrides=args.override, configs=Path(args.configs) if args.configs else None)
    if dist.is_main_process():
        print(path.read_text())
    dist.shutdown()
    return 0


IMPORT_HELP = "import user code first (registers its models, methods, datasets); repeatable, before or after the command"
WORKERS_HELP = "parallel single-threaded processes (default: $KBRICKS_WORKERS, else one per core)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kbricks", description="Modular knowledge transfer between neural networks.")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE", help=IMPORT_HELP)
    sub = p.add_subparsers(dest="command", required=True)

    def run_args(sp, what: str) -> None:
        sp.add_argument("config", nargs="?", help="YAML config (omit with --resume --run-dir to reuse the run's config)")
        sp.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE", help="e.g. -o optim.lr=0.1")
        sp.add_argument("--run-dir", help="where to write the run (default: <out_dir>/<name>/<time>-seed<seed>)")
        sp.add_argument("--resume", action="store_true", help=f"continue {what}")
        sp.add_argument("--overwrite", action="store_true", help="replace an existing run in --run-dir")
        add_launcher_arguments(sp)
        sp.set_defaults(func=_cmd_train)

    run_args(sub.add_parser("train", help="train from a YAML config (continual configs too; also under torchrun for DDP)"),
             "from <run-dir>/ckpt/last.pt")
    run_args(sub.add_parser("continual", help="continual learning (SupSup, ImpressLearn): the same as train"),
             "after the last finished task")

    e = sub.add_parser("evaluate", help="evaluate a finished or running run directory")
    e.add_argument("run_dir")
    e.add_argument("--checkpoint", choices=["last", "best"], default="last")
    e.add_argument("--baseline", help="KF runs: run directory of a KD student to compare with")
    e.set_defaults(func=_cmd_evaluate)

    a = sub.add_parser("assemble", help="combine a CKN brick and TSN bricks into one network, without fine-tuning; or find the "
                                        "bricks covering some classes in a store (--store DIR --classes cat,dog,7)")
    a.add_argument("ckn", nargs="?", help="the CKN brick manifest (bricks/ckn.json)")
    a.add_argument("tsn", nargs="*", help="TSN brick manifests (bricks/tsn-<task>.json)")
    a.add_argument("--store", nargs="+", metavar="DIR", help="directories of runs or bricks to choose from (with --classes)")
    a.add_argument("--classes", help="comma-separated class names, ids or id:name the network must cover (with --store)")
    a.add_argument("--out", help="directory for assembled.safetensors + assembled.json (optional with --store: "
                                 "without it the choice is only reported)")
    a.add_argument("--overwrite", action="store_true", help="replace an existing assembly in --out")
    a.add_argument("--evaluate", action="store_true", help="score it (and its teacher) on the CKN's test split")
    a.set_defaults(func=_cmd_assemble)

    br = sub.add_parser("bricks", help="the brick catalog: list, show or search the bricks under run directories / brick folders")
    brs = br.add_subparsers(dest="action", required=True)
    bl = brs.add_parser("list", help="every brick under DIR... (recursively), grouped by CKN, and the manifests refused")
    bl.add_argument("dirs", nargs="+", metavar="DIR")
    bs = brs.add_parser("show", help="everything one brick's manifest says, after verifying it")
    bs.add_argument("brick", help="a brick manifest (bricks/tsn-<task>.json)")
    bq = brs.add_parser("search", help="bricks that hold some classes (names or ids), bind to a CKN, or have a task; "
                                       "exit 1 when none does")
    bq.add_argument("dirs", nargs="+", metavar="DIR")
    bq.add_argument("--classes", help="comma-separated class names, ids or id:name: bricks holding any of them")
    bq.add_argument("--ckn", metavar="FINGERPRINT", help="bricks of this CKN (its fingerprint or a prefix)")
    bq.add_argument("--task", help="task name (or latent), shell wildcards allowed")
    for sp in (bl, bs, bq):
        sp.add_argument("--json", action="store_true", help="machine-readable output")
    br.set_defaults(func=_cmd_bricks)

    ex = sub.add_parser("export", help="export an assembled network or a trained run's network to torch.export (.pt2), ONNX or "
                                       "TorchScript (checked against PyTorch)")
    ex.add_argument("source", help="an assembled network's directory (assembled.json) or a run directory (model.json)")
    ex.add_argument("--format", choices=["export", "onnx", "torchscript"], default=None,
                    help="default: from --out's suffix (.pt2 export, .onnx, .pt torchscript); onnx needs pip install 'kbricks[onnx]'; "
                         "torchscript is deprecated by torch")
    ex.add_argument("--out", required=True, help="the file to write (e.g. net.pt2, net.onnx or net.pt)")
    ex.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    ex.add_argument("--batch", type=int, default=2, help="batch size of the example input")
    ex.add_argument("--input-shape", type=int, nargs="+", metavar="N", help="per-sample input shape, when the source does not record it (e.g. 1 8 8)")
    ex.add_argument("--atol", type=float, default=1e-5, help="largest difference from eager PyTorch accepted")
    ex.add_argument("--torchscript", choices=["auto", "script", "trace"], default="auto", help="auto: script, else trace")
    ex.set_defaults(func=_cmd_export)

    sw = sub.add_parser("sweep", help="train a config over several seeds; mean +/- std of last and best accuracy")
    sw.add_argument("config")
    sw.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    sw.add_argument("--out", required=True, help="directory for seed<k>/ runs, sweep.json and sweep.csv")
    sw.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    sw.add_argument("--fixed-split", action="store_true", help="keep data.kwargs.split_seed (default: the seed sets it too)")
    sw.add_argument("--workers", type=int, help=WORKERS_HELP)
    add_launcher_arguments(sw)
    sw.set_defaults(func=_cmd_sweep)

    st = sub.add_parser("study", help="multi-seed studies: kf (teacher -> KF -> KD -> report), cl (SupSup vs ImpressLearn), sskt")
    st.add_argument("kind", choices=["kf", "cl", "sskt", "library"], help="library: extend a frozen CKN / amalgamate two teachers (--dataset digits or mnist5k)")
    st.add_argument("--dataset", choices=["digits", "mnist5k", "dsprites", "digits-ablation", "dsprites-ablation", "selection"],
                    help="kf only: a main study, an IMB ablation, or the validation-split selection of hyper-parameters")
    st.add_argument("--scenario", choices=["permuted", "rotated", "split", "scale"], default="permuted", help="cl only")
    st.add_argument("--baselines", action="store_true", help="cl only: SupSup and ImpressLearn beside fine-tuning, EWC, LwF and "
                    "ER (task-incremental and without the task id) on --scenario permuted, rotated or split")
    st.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    st.add_argument("--out", default="results/runs")
    st.add_argument("--quick", action="store_true", help="small budgets (smoke test)")
    st.add_argument("--configs", help="directory of the configs to use (default: the shipped ones)")
    add_launcher_arguments(st)
    st.set_defaults(func=_cmd_study)

    rep = sub.add_parser("reproduce", help="run every study this project can do on CPU (results/REPRODUCTION.md), or with --scale paper "
                                           "the papers' CIFAR set-ups on your data (results/PAPER-SCALE.md)")
    rep.add_argument("--scale", choices=["cpu", "paper"], default="cpu",
                     help="cpu: the studies on embedded data (default); paper: the recipes of configs/paper/ on --data-root")
    rep.add_argument("--data-root", help="--scale paper: the folder with cifar-10-batches-py/, cifar-100-python/, sskt-sources/ "
                                         "(docs/paper-scale.md); recipes whose data are missing are skipped")
    rep.add_argument("--only", nargs="+", metavar="RECIPE", help="--scale paper: these recipes only (kf-cifar10, supsup-splitcifar100, ...)")
    rep.add_argument("--seeds", type=int, nargs="+", help="--scale paper: seeds of every non-shared run (default 0 1 2)")
    rep.add_argument("--smoke", action="store_true", help="--scale paper: 2 steps per run on small networks (checks the data and set-up)")
    rep.add_argument("--check", action="store_true", help="--scale paper: only list the recipes that can run and the data that are missing")
    rep.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE", help="--scale paper: applied to every run")
    rep.add_argument("--quick", action="store_true", help="small budgets, 3 seeds")
    rep.add_argument("--out", default="results")
    rep.add_argument("--configs", help="directory of the configs to use (default: the shipped ones)")
    rep.add_argument("--workers", type=int, help=WORKERS_HELP)
    add_launcher_arguments(rep)
    rep.add_argument("--full-runs", default="results/runs",
                     help="--quick: the full-budget raw results whose verdicts the quick table shows alongside (if present)")
    rep.add_argument("--tables-only", action="store_true", help="no training: the tables from existing study.json files (= kbricks report)")
    rep.set_defaults(func=_cmd_reproduce)

    rp = sub.add_parser("report", help="RESULTS.md (tables, plots) and REPRODUCTION.md from the studies' study.json files, no training")
    rp.add_argument("--runs", default="results/runs")
    rp.add_argument("--out", default="results")
    rp.set_defaults(func=_cmd_report)

    ls = sub.add_parser("list", help="list registered models, datasets, scenarios, methods, or shipped configs")
    ls.add_argument("kind", nargs="?", default="all", choices=["all", "models", "datasets", "scenarios", "methods", "configs"])
    ls.add_argument("--pattern", default="*", help="shell wildcard, e.g. 'resnet*'")
    ls.add_argument("--tag", help="only entries with this tag, e.g. masked or continual")
    ls.add_argument("--configs-dir", help="list the configs of this directory (default: the shipped ones)")
    ls.set_defaults(func=_cmd_list)

    op = sub.add_parser("options", help="a method's options (method.* in a config): types, defaults and descriptions")
    op.add_argument("method", help="a registered method, e.g. kd (kbricks list methods)")
    op.set_defaults(func=_cmd_options)

    for sp in sub.choices.values():  # --import after the subcommand too: kbricks train cfg.yaml --import mod
        sp.add_argument("--import", dest="imports_after", action="append", default=[], metavar="MODULE", help=IMPORT_HELP)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a cluster job runs again
    try:
        from .core.seeding import set_threads

        set_threads(None)  # every command, evaluation included: KBRICKS_THREADS, else 1 (see core.seeding)
        from .registry import forget_imported_modules, import_user_modules

        forget_imported_modules()  # a run's model card records this command's --import modules, not an earlier call's
        import_user_modules([*args.imports, *getattr(args, "imports_after", [])])
        return args.func(args)
    except KbricksError as exc:
        print(f"kbricks: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        from .core.rundir import interrupted_note
        from .core.signals import Terminated

        if isinstance(exc, Terminated):  # SIGTERM: the same checkpoint and note, the conventional status 128 + 15
            print(f"kbricks: terminated ({exc}); {interrupted_note()}", file=sys.stderr)
            return 128 + exc.signum
        print(f"kbricks: interrupted; {interrupted_note()}", file=sys.stderr)
        return 130
