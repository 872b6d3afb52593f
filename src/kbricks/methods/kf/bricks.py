"""The brick store: CKNs and TSNs saved as ``.safetensors`` + a JSON manifest, and assembly without fine-tuning.

A manifest records what a brick is (kind, task, classes, architecture, input normalisation, distillation
temperature), the fingerprint and architecture of the CKN it was trained with, metrics and provenance. Its
``fingerprint`` signs the weights *and* every manifest field that decides behaviour, so an edited class list is
caught as surely as edited weights. Assembly refuses bricks that were not trained against the same CKN. Loading
never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple, Union

import torch
from torch import nn

from ..._version import __version__
from ...core.checkpoint import fingerprint, load_safetensors, load_state_into, read_json, save_safetensors
from ...data import Task
from ...errors import CheckpointError, KbricksError
from ...models import create_model
from ...models.factorized import AssembledNetwork, FactorNetworks, TaskSpecificNetwork

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


def signature(weights_fingerprint: str, manifest: Dict[str, Any]) -> str:
    """The brick's fingerprint: a hash of the weights' fingerprint and the behaviour-deciding manifest fields."""
    signed = {k: manifest.get(k) for k in SIGNED_FIELDS}
    h = hashlib.sha256(weights_fingerprint.encode())
    h.update(json.dumps(signed, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()[:16]


def _write(path: Path, manifest: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> Path:
    wfp = fingerprint(tensors)
    manifest = dict(manifest, format=BRICK_FORMAT, weights_fingerprint=wfp, weights=path.name + ".safetensors")
    manifest["fingerprint"] = signature(wfp, manifest)
    save_safetensors(tensors, path.parent / manifest["weights"], {"format": BRICK_FORMAT, "kind": manifest["kind"]})
    json_path = path.parent / (path.name + ".json")
    json_path.write_text(json.dumps(manifest, indent=2))
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
    if not isinstance(manifest, dict) or manifest.get("format") != BRICK_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(f"{path} is not a kbricks brick manifest (format {BRICK_FORMAT!r} expected, found {found!r})")
    kind = manifest.get("kind")
    if kind not in REQUIRED_FIELDS:
        raise CheckpointError(f"brick {path.name}: unknown kind {kind!r} (expected 'ckn' or 'tsn')")
    missing = [k for k in REQUIRED_FIELDS[kind] if k not in manifest]
    if missing:
        raise CheckpointError(f"brick {path.name}: the manifest lacks {missing}")
    if not isinstance(manifest["weights"], str) or Path(manifest["weights"]).name != manifest["weights"]:
        raise CheckpointError(f"brick {path.name}: 'weights' must name a file next to the manifest, got {manifest['weights']!r}")
    tensors = load_safetensors(path.parent / manifest["weights"])
    wfp = fingerprint(tensors)
    if wfp != manifest["weights_fingerprint"]:
        raise CheckpointError(f"brick {path.name}: weights do not match the manifest fingerprint (modified or corrupt file)")
    if signature(wfp, manifest) != manifest["fingerprint"]:
        raise CheckpointError(f"brick {path.name}: the manifest's signed fields ({', '.join(SIGNED_FIELDS)}) were modified "
                              "after export; re-export the bricks instead of editing them")
    if kind == "tsn":
        _check_task(path, manifest)
    return manifest, tensors


def _check_task(path: Path, m: Dict[str, Any]) -> None:
    task, total = m["task"], m["num_classes_total"]
    if not isinstance(task, dict) or "name" not in task or "num_classes" not in task:
        raise CheckpointError(f"brick {path.name}: 'task' must hold name and num_classes")
    classes = task.get("classes")
    if classes is not None:
        bad = [c for c in classes if not isinstance(c, int) or not 0 <= c < total]
        if bad or len(set(classes)) != len(classes) or len(classes) != task["num_classes"]:
            raise CheckpointError(f"brick {path.name}: task classes {classes} are not {task['num_classes']} distinct ids in 0..{total - 1}")


def build_ckn(arch: Dict[str, Any]) -> nn.Module:
    return create_model(arch["name"], num_classes=0, in_channels=arch["in_channels"], image_size=arch["image_size"], **arch.get("kwargs", {}))


def build_tsn(manifest: Dict[str, Any]) -> TaskSpecificNetwork:
    a, ckn = manifest["architecture"], manifest["ckn_architecture"]
    backbone = create_model(a["name"], num_classes=0, in_channels=ckn["in_channels"], image_size=ckn["image_size"], **a.get("kwargs", {}))
    return TaskSpecificNetwork(backbone, a["dim"], ckn["feature_dim"], manifest["num_outputs"], a["combine"])


def assemble(ckn_path: Union[str, Path], tsn_paths: Sequence[Union[str, Path]]) -> AssembledNetwork:
    """Combine one CKN brick and any subset of TSN bricks trained with it, without fine-tuning."""
    ckn_manifest, ckn_tensors = load_brick(ckn_path)
    if ckn_manifest["kind"] != "ckn":
        raise BrickMismatchError(f"{ckn_path} is a {ckn_manifest['kind']} brick, not a CKN")
    if not tsn_paths:
        raise BrickMismatchError("give at least one TSN brick to assemble")
    ckn = build_ckn(ckn_manifest["architecture"])
    load_state_into(ckn, ckn_tensors, f"CKN architecture in {ckn_path}")
    tsns, tasks, manifests, seen = [], [], [ckn_manifest], set()
    for p in tsn_paths:
        m, tensors = load_brick(p)
        if m["kind"] != "tsn":
            raise BrickMismatchError(f"{p} is a {m['kind']} brick, not a TSN")
        if m["ckn_architecture"] != ckn_manifest["architecture"]:
            raise BrickMismatchError(f"TSN {Path(p).name} was trained with a CKN of another architecture ({m['ckn_architecture']['name']} vs {ckn_manifest['architecture']['name']})")
        if m["ckn_fingerprint"] != ckn_manifest["fingerprint"]:
            raise BrickMismatchError(
                f"TSN {Path(p).name} was trained with CKN {m['ckn_fingerprint']}, not with the given CKN {ckn_manifest['fingerprint']}; "
                "bricks only assemble with the CKN they were factorized with"
            )
        task = _task_from_dict(m["task"])
        overlap = seen.intersection(task.classes or ())
        if overlap or any(t.name == task.name for t in tasks):
            raise BrickMismatchError(f"TSN {Path(p).name} repeats task {task.name!r} or classes {sorted(overlap)}")
        seen.update(task.classes or ())
        tsn = build_tsn(m)
        load_state_into(tsn, tensors, f"TSN architecture in {p}")
        tsns.append(tsn), tasks.append(task), manifests.append(m)
    if len({t.classes is None for t in tasks}) > 1:
        raise BrickMismatchError("cannot mix class-partition TSNs and latent-factor TSNs in one network")
    net = AssembledNetwork(FactorNetworks(ckn, tsns), tasks, ckn_manifest["num_classes_total"], manifests,
                           [m["temperature"] for m in manifests[1:]])
    return net.eval()


def save_assembled(net: AssembledNetwork, out_dir: Union[str, Path], overwrite: bool = False) -> Path:
    """The assembled network as one safetensors file plus a manifest naming its bricks. An existing assembly in
    ``out_dir`` is only replaced with ``overwrite``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise KbricksError(f"--out {str(out)!r} is a file, not a directory")
    if (out / "assembled.json").exists() and not overwrite:
        raise KbricksError(f"{out} already holds an assembled network; pass --overwrite to replace it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    tensors = net.factors.state_dict()
    save_safetensors(tensors, out / "assembled.safetensors", {"format": "kbricks-assembled-v1"})
    manifest = {
        "format": "kbricks-assembled-v1",
        "ckn": net.manifests[0]["fingerprint"],
        "tsns": [{"task": m["task"]["name"], "fingerprint": m["fingerprint"], "temperature": m["temperature"]} for m in net.manifests[1:]],
        "classes": net.classes if net.is_class_union else None,
        "fingerprint": fingerprint(tensors),
        "provenance": net.manifests[0]["provenance"],
    }
    (out / "assembled.json").write_text(json.dumps(manifest, indent=2))
    return out / "assembled.json"
