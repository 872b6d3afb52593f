"""The brick store: CKNs and TSNs saved as ``.safetensors`` + a JSON manifest, and assembly without fine-tuning.

A manifest records what a brick is (kind, task, classes, architecture, input normalisation, distillation
temperature), the fingerprint and architecture of the CKN it was trained with, metrics and provenance. Its
``fingerprint`` signs the weights *and* every manifest field that decides behaviour, so an edited class list is
caught as surely as edited weights. Assembly refuses bricks that were not trained against the same CKN. The
assembled network takes raw inputs (it applies the bricks' normalisation); ``save_assembled`` writes it as one
safetensors file and an ``assembled.json`` that embeds every brick's manifest, and ``load_assembled`` rebuilds it from
those two files alone, checking every fingerprint. Loading never unpickles anything.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple, Union

import torch
from torch import nn

from ..._version import __version__
from ...core.checkpoint import (
    claim_digests,
    edited_claims,
    fingerprint,
    load_safetensors,
    load_state_into,
    quote_fields,
    read_json,
    save_safetensors,
    sign_claims,
)
from ...core.io import atomic_write_text, storage_error
from ...data import Task
from ...errors import CheckpointError, KbricksError
from ...models import create_model
from ...models.deploy import RAW_INPUT, input_shape_of
from ...models.factorized import AssembledClassifier, AssembledMultiTask, AssembledNetwork, FactorNetworks, TaskSpecificNetwork
from ...registry import NETWORK_FILES

BRICK_FORMAT = "kbricks-brick-v2"
# manifest fields that change what an assembled network computes: signed together with the weights
SIGNED_FIELDS = ("kind", "task", "class_names", "num_outputs", "architecture", "ckn_fingerprint", "ckn_architecture",
                 "normalize", "num_classes_total", "temperature")
REQUIRED_FIELDS = {"ckn": ("kind", "architecture", "num_classes_total", "weights", "fingerprint", "weights_fingerprint"),
                   "tsn": ("kind", "task", "num_outputs", "architecture", "ckn_fingerprint", "ckn_architecture", "num_classes_total",
                           "temperature", "weights", "fingerprint", "weights_fingerprint")}


class BrickMismatchError(KbricksError):
    """Bricks that cannot be assembled together (different CKN, architecture, overlapping tasks...)."""


def _task_from_dict(d: Dict[str, Any]) -> Task:
    classes = tuple(d["classes"]) if d.get("classes") is not None else None
    return Task(name=d["name"], num_classes=d["num_classes"], classes=classes, latent=d.get("latent"))


def signed_fields(manifest: Dict[str, Any]) -> Dict[str, Any]:
    """The manifest's claims that decide behaviour (``SIGNED_FIELDS``), as its fingerprint signs them."""
    return {k: manifest.get(k) for k in SIGNED_FIELDS}


def signature(weights_fingerprint: str, manifest: Dict[str, Any]) -> str:
    """The brick's fingerprint: the behaviour-deciding manifest fields signed with the weights' fingerprint
    (:func:`kbricks.core.checkpoint.sign_claims`, the one signing function of model cards and manifests)."""
    return sign_claims(signed_fields(manifest), weights_fingerprint)


def _write(path: Path, manifest: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> Path:
    wfp = fingerprint(tensors)
    manifest = dict(manifest, format=BRICK_FORMAT, weights_fingerprint=wfp, weights=path.name + ".safetensors")
    manifest["fingerprint"] = signature(wfp, manifest)
    manifest["claim_digests"] = claim_digests(json.loads(json.dumps(signed_fields(manifest))))  # names an edited field
    save_safetensors(tensors, path.parent / manifest["weights"], {"format": BRICK_FORMAT, "kind": manifest["kind"]})
    json_path = path.parent / (path.name + ".json")
    atomic_write_text(json_path, json.dumps(manifest, indent=2), what="the brick manifest")
    return json_path


def export_bricks(
    factors: FactorNetworks,
    tasks: Sequence[Task],
    out_dir: Union[str, Path],
    ckn_arch: Dict[str, Any],
    tsn_arch: Dict[str, Any],
    num_classes: int,
    class_names: Sequence[str],
    normalize: Dict[str, Any],
    provenance: Dict[str, Any],
    metrics: Dict[str, float],
    temperature: float,
) -> List[Path]:
    """Write ``ckn`` and one ``tsn-<task>`` brick per task into ``out_dir``; returns the manifest paths.
    ``temperature`` is the distillation temperature: assembly reads class factors at that temperature."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    common = {"kbricks": __version__, "normalize": normalize, "provenance": provenance, "num_classes_total": num_classes}
    ckn_path = _write(out / "ckn", {"kind": "ckn", "architecture": ckn_arch, **common, "metrics": {"acc_all_tasks": metrics.get("acc")}},
                      factors.ckn.state_dict())
    ckn_fp = json.loads(ckn_path.read_text())["fingerprint"]
    paths = [ckn_path]
    for task, tsn in zip(tasks, factors.tsns):
        names = [class_names[c] for c in task.classes] if task.classes is not None else None
        manifest = {
            "kind": "tsn",
            "task": task.to_dict(),
            "class_names": names,
            "num_outputs": tsn.head.out_features,
            "architecture": tsn_arch,
            "ckn_fingerprint": ckn_fp,
            "ckn_architecture": ckn_arch,
            "temperature": temperature,
            **common,
            "metrics": {"acc": metrics.get(f"acc_{task.name}")},
        }
        paths.append(_write(out / f"tsn-{task.name}", manifest, tsn.state_dict()))
    return paths


def load_brick(path: Union[str, Path]) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """Read a brick manifest and its weights; the weights must hash to the manifest's fingerprint."""
    path = Path(path)
    if path.suffix != ".json":
        path = path.with_suffix(".json") if path.with_suffix(".json").exists() else Path(str(path) + ".json")
    manifest = read_json(path, f"brick manifest {str(path)!r} does not exist")
    _check_manifest(path.name, manifest)
    if not isinstance(manifest["weights"], str) or Path(manifest["weights"]).name != manifest["weights"]:
        raise CheckpointError(f"brick {path.name}: 'weights' must name a file next to the manifest, got {manifest['weights']!r}")
    tensors = load_safetensors(path.parent / manifest["weights"])
    _verify_brick(path.name, manifest, tensors)
    return manifest, tensors


def _check_manifest(name: str, manifest: Any) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != BRICK_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(f"{name} is not a kbricks brick manifest (format {BRICK_FORMAT!r} expected, found {found!r})")
    kind = manifest.get("kind")
    if kind not in REQUIRED_FIELDS:
        raise CheckpointError(f"brick {name}: unknown kind {kind!r} (expected 'ckn' or 'tsn')")
    missing = [k for k in REQUIRED_FIELDS[kind] if k not in manifest]
    if missing:
        raise CheckpointError(f"brick {name}: the manifest lacks {missing}")


def _verify_brick(name: str, manifest: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> None:
    """The weights hash to the manifest's weights fingerprint, and the signed fields to its fingerprint."""
    wfp = fingerprint(tensors)
    if wfp != manifest["weights_fingerprint"]:
        raise CheckpointError(f"brick {name}: weights do not match the manifest fingerprint (modified or corrupt file)")
    edited = edited_claims(signed_fields(manifest), wfp, manifest["fingerprint"], manifest.get("claim_digests"))
    if edited is not None:
        raise CheckpointError(f"brick {name}: the manifest's signed fields ({quote_fields(edited) if edited else ', '.join(SIGNED_FIELDS)}) "
                              "were modified after export; re-export the bricks instead of editing them")
    if manifest["kind"] == "tsn":
        _check_task(name, manifest)


def _check_task(name: str, m: Dict[str, Any]) -> None:
    task, total = m["task"], m["num_classes_total"]
    if not isinstance(task, dict) or "name" not in task or "num_classes" not in task:
        raise CheckpointError(f"brick {name}: 'task' must hold name and num_classes")
    classes = task.get("classes")
    if classes is not None:
        bad = [c for c in classes if not isinstance(c, int) or not 0 <= c < total]
        if bad or len(set(classes)) != len(classes) or len(classes) != task["num_classes"]:
            raise CheckpointError(f"brick {name}: task classes {classes} are not {task['num_classes']} distinct ids in 0..{total - 1}")


def build_ckn(arch: Dict[str, Any]) -> nn.Module:
    return create_model(arch["name"], num_classes=0, in_channels=arch["in_channels"], image_size=arch["image_size"], **arch.get("kwargs", {}))


def build_tsn(manifest: Dict[str, Any]) -> TaskSpecificNetwork:
    a, ckn = manifest["architecture"], manifest["ckn_architecture"]
    backbone = create_model(a["name"], num_classes=0, in_channels=ckn["in_channels"], image_size=ckn["image_size"], **a.get("kwargs", {}))
    return TaskSpecificNetwork(backbone, a["dim"], ckn["feature_dim"], manifest["num_outputs"], a["combine"])


Brick = Tuple[str, Dict[str, Any], Dict[str, torch.Tensor]]  # (name for messages, manifest, weights)


def assemble(ckn_path: Union[str, Path], tsn_paths: Sequence[Union[str, Path]]) -> AssembledNetwork:
    """Combine one CKN brick and any subset of TSN bricks trained with it, without fine-tuning. The network takes
    raw inputs (it applies the bricks' input normalisation itself)."""
    ckn = (str(ckn_path), *load_brick(ckn_path))
    if ckn[1]["kind"] != "ckn":
        raise BrickMismatchError(f"{ckn_path} is a {ckn[1]['kind']} brick, not a CKN")
    if not tsn_paths:
        raise BrickMismatchError("give at least one TSN brick to assemble")
    return _build(ckn, [(Path(p).name, *load_brick(p)) for p in tsn_paths])


def _build(ckn: Brick, tsn_bricks: Sequence[Brick]) -> AssembledNetwork:
    ckn_name, ckn_manifest, ckn_tensors = ckn
    ckn_net = build_ckn(ckn_manifest["architecture"])
    load_state_into(ckn_net, ckn_tensors, f"CKN architecture in {ckn_name}")
    tsns, tasks, manifests, seen = [], [], [ckn_manifest], set()
    named: Dict[int, Any] = {}  # class id -> the name an earlier brick gives it
    for name, m, tensors in tsn_bricks:
        if m["kind"] != "tsn":
            raise BrickMismatchError(f"{name} is a {m['kind']} brick, not a TSN")
        if m["ckn_architecture"] != ckn_manifest["architecture"]:
            raise BrickMismatchError(f"TSN {name} was trained with a CKN of another architecture ({m['ckn_architecture']['name']} vs {ckn_manifest['architecture']['name']})")
        if m["ckn_fingerprint"] != ckn_manifest["fingerprint"]:
            raise BrickMismatchError(
                f"TSN {name} was trained with CKN {m['ckn_fingerprint']}, not with the given CKN {ckn_manifest['fingerprint']}; "
                "bricks only assemble with the CKN they were factorized with"
            )
        if m.get("normalize") != ckn_manifest.get("normalize"):
            raise BrickMismatchError(f"TSN {name} expects another input normalisation ({m.get('normalize')}) than its CKN ({ckn_manifest.get('normalize')})")
        task = _task_from_dict(m["task"])
        overlap = seen.intersection(task.classes or ())
        names = dict(zip(task.classes or (), m.get("class_names") or ()))
        if overlap or any(t.name == task.name for t in tasks):
            ids = sorted(overlap)
            differ = [c for c in ids if names.get(c) != named.get(c)]
            meanings = (f" (named {', '.join(repr(names.get(c)) for c in differ)} there, {', '.join(repr(named.get(c)) for c in differ)} "
                        "in an earlier brick: two meanings of one id never assemble together)") if differ else ""
            raise BrickMismatchError(f"TSN {name} repeats task {task.name!r} or classes {ids}{meanings}")
        seen.update(task.classes or ())
        named.update(names)
        tsn = build_tsn(m)
        load_state_into(tsn, tensors, f"TSN architecture in {name}")
        tsns.append(tsn), tasks.append(task), manifests.append(m)
    if len({t.classes is None for t in tasks}) > 1:
        raise BrickMismatchError("cannot mix class-partition TSNs and latent-factor TSNs in one network")
    kind = AssembledClassifier if tasks[0].classes is not None else AssembledMultiTask
    total = max(m["num_classes_total"] for m in manifests)  # bricks made later (kf_extend) may add classes to the label space
    net = kind(FactorNetworks(ckn_net, tsns), tasks, total, manifests,
               [m["temperature"] for m in manifests[1:]], ckn_manifest.get("normalize"))
    net.info = _describe(net)
    return net.eval()


def _describe(net: AssembledNetwork) -> Dict[str, Any]:
    """What the assembled network takes and gives (recorded in assembled.json and in exported files)."""
    ckn = net.manifests[0]
    names: List[Any] = [None] * net.num_classes
    for m in net.manifests[1:]:
        for c, n in zip(m["task"].get("classes") or (), m.get("class_names") or ()):
            names[c] = n
    return {
        "kind": "assembled",
        "input": {"shape": input_shape_of(ckn["architecture"]), "normalize": ckn.get("normalize"), "convention": RAW_INPUT},
        "outputs": net.output_names,
        "output_kind": "log-probabilities over the classes (-inf: no chosen brick covers it)" if net.is_class_union else "logits per task",
        "classes": net.classes if net.is_class_union else None,
        "class_names": names if net.is_class_union else None,
        "tasks": [t.to_dict() for t in net.tasks],
    }


ASSEMBLED_FORMAT = "kbricks-assembled-v2"
ASSEMBLED_WEIGHTS = "assembled.safetensors"


ASSEMBLED_UNSIGNED = ("fingerprint", "claim_digests")


def _assembled_claims(manifest: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in manifest.items() if k not in ASSEMBLED_UNSIGNED}


def _assembled_signature(manifest: Dict[str, Any]) -> str:
    """Signs every field of assembled.json but the signature and its digests: the file is written once, never edited.
    (The weights' fingerprint is one of those fields.)"""
    return sign_claims(_assembled_claims(manifest))


STAGING = ".assembling-"  # <out's parent>/.<out name>.assembling-<pid>-<random>: a save in progress


def _remove_stale_staging(out: Path) -> None:
    """Remove what a save killed mid-write (``kill -9``, power loss) left: staging directories of dead processes, and
    the temporary files of the atomic writes of earlier kbricks versions."""
    parent = out.parent
    if parent.is_dir():
        for d in parent.glob(f".{out.name}{STAGING}*"):
            pid = d.name[len(f".{out.name}{STAGING}"):].split("-")[0]
            if d.is_dir() and pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(d, ignore_errors=True)
    if out.is_dir():
        for name in ("assembled.json", ASSEMBLED_WEIGHTS):
            for f in out.glob(f".{name}.*.tmp"):
                f.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process
    return True


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_assembled(net: AssembledNetwork, out_dir: Union[str, Path], overwrite: bool = False) -> Path:
    """The assembled network as one safetensors file plus ``assembled.json``, which holds every brick's manifest:
    :func:`load_assembled` rebuilds the network from these two files alone. An existing assembly in ``out_dir`` is
    only replaced with ``overwrite``.

    Both files are written into a hidden staging directory beside ``out_dir``, which is then renamed to ``out_dir``
    (or, when ``out_dir`` exists, whose files are renamed into it): an error or Ctrl-C leaves nothing behind, and what
    ``kill -9`` leaves (the hidden staging directory) is removed by the next save to the same place."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise KbricksError(f"--out {str(out)!r} is a file, not a directory")
    if (out / "assembled.json").exists() and not overwrite:
        raise KbricksError(f"{out} already holds an assembled network; pass --overwrite to replace it or choose another --out")
    tensors = net.factors.state_dict()
    manifest = {
        "format": ASSEMBLED_FORMAT,
        "kbricks": __version__,
        **{k: v for k, v in net.info.items() if k not in ("fingerprint", "source")},
        "ckn": net.manifests[0]["fingerprint"],
        "tsns": [{"task": m["task"]["name"], "fingerprint": m["fingerprint"], "temperature": m["temperature"]} for m in net.manifests[1:]],
        "bricks": net.manifests,
        "weights": ASSEMBLED_WEIGHTS,
        "weights_fingerprint": fingerprint(tensors),
        "provenance": net.manifests[0]["provenance"],
    }
    manifest = json.loads(json.dumps(manifest))  # signed as it reads back
    manifest["fingerprint"] = _assembled_signature(manifest)
    manifest["claim_digests"] = claim_digests(_assembled_claims(manifest))  # names an edited field
    from safetensors.torch import save

    weights = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata={"format": ASSEMBLED_FORMAT})
    stage = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(out)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}{STAGING}{os.getpid()}-", dir=out.parent))
        _write_file(stage / ASSEMBLED_WEIGHTS, weights)
        _write_file(stage / "assembled.json", json.dumps(manifest, indent=2).encode())
        if out.exists():  # weights first: until the manifest follows, a load refuses the pair (fingerprint mismatch)
            for name in (ASSEMBLED_WEIGHTS, "assembled.json"):
                os.replace(stage / name, out / name)
        else:
            os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes it private; an assembly is an ordinary directory
            os.rename(stage, out)
            stage = None
    except OSError as exc:
        raise storage_error(exc, out, "the assembled network") from None
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
    net.info.update(fingerprint=manifest["fingerprint"], source=str(out))
    return out / "assembled.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@NETWORK_FILES.register("assembled.json", "kbricks-assembled")  # kbricks export opens it without knowing KF
def load_assembled(path: Union[str, Path]) -> AssembledNetwork:
    """Rebuild an assembled network from ``assembled.json`` + ``assembled.safetensors`` alone (a directory or the
    JSON file), in eval mode, taking raw inputs. The weights must hash to the manifest's fingerprint, the manifest
    must be unedited, and each brick's slice of the weights must match that brick's own fingerprint."""
    p = Path(path)
    json_path = p / "assembled.json" if p.is_dir() else p
    m = read_json(json_path, f"no assembled network at {str(path)!r} (expected a directory with assembled.json)")
    where = f"assembled network {json_path}"
    if not isinstance(m, dict) or m.get("format") != ASSEMBLED_FORMAT:
        found = m.get("format") if isinstance(m, dict) else type(m).__name__
        if found == "kbricks-assembled-v1":
            raise CheckpointError(f"{where} was written by kbricks 0.2 without its bricks' manifests; assemble the bricks again (kbricks assemble)")
        raise CheckpointError(f"{json_path} is not a kbricks assembled network (format {ASSEMBLED_FORMAT!r} expected, found {found!r})")
    missing = [k for k in ("bricks", "weights_fingerprint", "fingerprint") if k not in m]
    if missing:
        raise CheckpointError(f"{where}: the manifest lacks {missing}")
    tensors = load_safetensors(json_path.parent / ASSEMBLED_WEIGHTS)
    if fingerprint(tensors) != m["weights_fingerprint"]:
        raise CheckpointError(f"{where}: {ASSEMBLED_WEIGHTS} does not match the manifest fingerprint (modified or corrupt file)")
    edited = edited_claims(_assembled_claims(m), "", m["fingerprint"], m.get("claim_digests"))
    if edited is not None:
        which = f" ({quote_fields(edited)} {'differs' if len(edited) == 1 else 'differ'} from what was signed)" if edited else ""
        raise CheckpointError(f"{where}: the manifest was modified after it was written{which}; assemble the bricks again instead of editing it")
    bricks = m["bricks"]
    if not isinstance(bricks, list) or len(bricks) < 2:
        raise CheckpointError(f"{where}: 'bricks' must list the CKN's manifest and at least one TSN's")
    pieces: List[Brick] = []
    for i, bm in enumerate(bricks):
        prefix = "ckn." if i == 0 else f"tsns.{i - 1}."
        name = f"{bm.get('kind', 'brick') if isinstance(bm, dict) else 'brick'} #{i} of {json_path.name}"
        _check_manifest(name, bm)
        part = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        _verify_brick(name, bm, part)
        pieces.append((name, bm, part))
    if pieces[0][1]["kind"] != "ckn":
        raise CheckpointError(f"{where}: its first brick is a {pieces[0][1]['kind']}, not the CKN")
    net = _build(pieces[0], pieces[1:])
    net.info.update(fingerprint=m["fingerprint"], source=str(json_path.parent))
    return net
