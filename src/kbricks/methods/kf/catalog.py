"""The brick catalog: find bricks by what they know, over any set of run directories and brick folders, and assemble
one network from the bricks that cover a list of classes.

:func:`scan` walks directories for brick manifests and verifies each one exactly as :func:`bricks.load_brick` does
(weights fingerprint, signed fields, task ids). A manifest that fails is *listed* as refused with its one-line reason;
one bad file never stops a listing. JSON files that are not bricks (``model.json``, ``results.json`` ...) are ignored,
unless they sit where a brick would (a ``bricks/`` folder, or named ``ckn.json`` / ``tsn-*.json``).

Bricks are grouped by the CKN they bind to (a CKN's own fingerprint, a TSN's ``ckn_fingerprint``). A class is asked for
by name or by id, resolved in the label space of each group: a token that is one of the group's class names means that
class, else ``id:name`` means that id under that name, else a whole number means the class id. Bricks added to a CKN
later (``kf_extend``, e.g. a FashionMNIST teacher on a digits CKN) may give one id another meaning: a class asked by
name only takes bricks that give its id that name, and an id the group's bricks name differently is refused in one
line (ask by name). :func:`choose` picks, for the requested classes, one CKN and the fewest
of its TSN bricks that cover them without overlapping (assembly refuses overlapping bricks); ties go to the higher mean
accuracy recorded at training, then to the lexically first paths, so the choice is deterministic.
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from ...core.io import first_line
from ...errors import CheckpointError, KbricksError
from ...models.deploy import input_shape_of
from .bricks import BRICK_FORMAT, BrickMismatchError, load_brick
from .bricks import assemble as assemble_bricks

PathLike = Union[str, os.PathLike]
MAX_MANIFEST_BYTES = 8 << 20  # a manifest is a few kB; a larger JSON file is something else
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")  # state, not learned parameters


@dataclass(frozen=True)
class BrickInfo:
    """What one verified brick is, read from its manifest and weights."""

    path: Path  # the manifest
    kind: str  # "ckn" | "tsn"
    fingerprint: str
    ckn: str  # fingerprint of the CKN it binds to (a CKN's own)
    task: Optional[str]
    latent: Optional[int]
    classes: Tuple[int, ...]  # global class ids (none for a CKN or a latent-factor TSN)
    class_names: Tuple[Optional[str], ...]
    architecture: Dict[str, Any]
    ckn_architecture: Dict[str, Any]
    parameters: int
    accuracy: Optional[float]  # recorded at training: a TSN's accuracy on its task, a CKN's over all tasks
    normalize: Optional[Dict[str, Any]]
    num_classes_total: int
    temperature: Optional[float]
    input_shape: Optional[List[int]]
    provenance: Dict[str, Any] = field(default_factory=dict, repr=False)
    kbricks_version: Optional[str] = None

    @property
    def labels(self) -> List[str]:
        """Classes as ``id`` (when the name is the id) or ``id:name``."""
        return [str(c) if n is None or str(n) == str(c) else f"{c}:{n}" for c, n in zip(self.classes, self.class_names)]

    def to_dict(self) -> Dict[str, Any]:
        return {
            "path": str(self.path), "kind": self.kind, "fingerprint": self.fingerprint, "ckn_fingerprint": self.ckn,
            "task": self.task, "latent": self.latent,
            "classes": [{"id": c, "name": n} for c, n in zip(self.classes, self.class_names)],
            "architecture": self.architecture, "ckn_architecture": self.ckn_architecture, "parameters": self.parameters,
            "accuracy": self.accuracy, "normalize": self.normalize, "num_classes_total": self.num_classes_total,
            "temperature": self.temperature, "input_shape": self.input_shape, "kbricks": self.kbricks_version,
            "provenance": {**{k: self.provenance.get(k) for k in ("method", "teacher", "teacher_fingerprint", "seed", "run_dir")
                              if k in self.provenance}, **_data_name(self.provenance)},
        }


@dataclass(frozen=True)
class Refusal:
    """A file that looks like a brick manifest but cannot be used, and why (one line)."""

    path: Path
    reason: str

    def to_dict(self) -> Dict[str, str]:
        return {"path": str(self.path), "reason": self.reason}


def _data_name(provenance: Dict[str, Any]) -> Dict[str, Any]:
    data = provenance.get("data")
    return {"data": data.get("name")} if isinstance(data, dict) and "name" in data else {}


# ---- reading one brick ------------------------------------------------------------------------------------------


def describe(path: PathLike) -> BrickInfo:
    """Verify the brick at ``path`` (its manifest, with or without ``.json``) and describe it; a brick that does not
    verify raises :class:`~kbricks.errors.CheckpointError` with a one-line reason."""
    try:
        manifest, tensors = load_brick(path)
        return _info(_manifest_path(Path(path)), manifest, tensors)
    except KbricksError:
        raise
    except Exception as exc:  # a signed but malformed manifest (wrong types): still one line, never a traceback
        raise CheckpointError(f"brick {Path(path).name}: malformed manifest ({first_line(exc, with_type=True)})") from None


def _manifest_path(path: Path) -> Path:
    """The manifest file ``load_brick`` reads for ``path`` (given with or without ``.json``)."""
    if path.suffix == ".json":
        return path
    return path.with_suffix(".json") if path.with_suffix(".json").exists() else Path(str(path) + ".json")


def _info(path: Path, m: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> BrickInfo:
    is_tsn = m["kind"] == "tsn"
    task = m["task"] if is_tsn else {}
    classes = tuple(int(c) for c in task.get("classes") or ())
    names = list(m.get("class_names") or [])
    names = tuple(str(n) if n is not None else None for n in names) + (None,) * (len(classes) - len(names))
    metrics = m.get("metrics") if isinstance(m.get("metrics"), dict) else {}
    acc = metrics.get("acc" if is_tsn else "acc_all_tasks")
    ckn_arch = m["ckn_architecture"] if is_tsn else m["architecture"]
    return BrickInfo(
        path=path, kind=m["kind"], fingerprint=m["fingerprint"], ckn=m["ckn_fingerprint"] if is_tsn else m["fingerprint"],
        task=task.get("name"), latent=task.get("latent"), classes=classes, class_names=names[:len(classes)],
        architecture=m["architecture"], ckn_architecture=ckn_arch,
        parameters=sum(t.numel() for k, t in tensors.items() if not k.endswith(BUFFER_SUFFIXES)),
        accuracy=float(acc) if isinstance(acc, (int, float)) else None, normalize=m.get("normalize"),
        num_classes_total=int(m["num_classes_total"]), temperature=m.get("temperature"),
        input_shape=input_shape_of(ckn_arch) if isinstance(ckn_arch, dict) else None,
        provenance=m.get("provenance") if isinstance(m.get("provenance"), dict) else {}, kbricks_version=m.get("kbricks"),
    )


# ---- scanning a store -------------------------------------------------------------------------------------------


def _looks_like_brick_place(path: Path) -> bool:
    return path.parent.name == "bricks" or path.name == "ckn.json" or path.name.startswith("tsn-")


def _manifest_files(roots: Sequence[Path]) -> Iterable[Path]:
    seen = set()
    for root in roots:
        if root.is_file():
            files = [root]
        else:
            files = []
            for d, subdirs, names in os.walk(root):
                subdirs[:] = sorted(s for s in subdirs if not s.startswith("."))  # hidden: staging of unfinished saves
                files += [Path(d) / n for n in sorted(names) if n.endswith(".json") and not n.startswith(".")]
        for f in files:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                yield f


def _classify(path: Path) -> Optional[str]:
    """None when ``path`` is not meant as a brick; "" for a brick manifest to verify; else why it is refused."""
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            return f"{path.name} is too large for a brick manifest" if _looks_like_brick_place(path) else None
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        if not _looks_like_brick_place(path):
            return None
        return f"{path.name} is not a readable JSON document ({first_line(exc, with_type=True)})"
    fmt = doc.get("format") if isinstance(doc, dict) else None
    if isinstance(fmt, str) and fmt.startswith("kbricks-brick"):
        return ""
    if _looks_like_brick_place(path):
        return f"{path.name} is not a kbricks brick manifest (format {BRICK_FORMAT!r} expected, found {fmt!r})"
    return None


@dataclass
class Catalog:
    """The verified bricks found under some directories, and the manifests refused there."""

    bricks: List[BrickInfo]
    refused: List[Refusal]
    roots: List[Path] = field(default_factory=list)

    @property
    def ckns(self) -> List[BrickInfo]:
        return [b for b in self.bricks if b.kind == "ckn"]

    def tsns_of(self, ckn: str) -> List[BrickInfo]:
        return [b for b in self.bricks if b.kind == "tsn" and b.ckn == ckn]

    def groups(self) -> Dict[str, List[BrickInfo]]:
        """Bricks by the CKN fingerprint they bind to, in order of first appearance (a CKN before its TSNs)."""
        out: Dict[str, List[BrickInfo]] = {}
        for b in sorted(self.bricks, key=lambda b: (b.kind != "ckn", str(b.path))):
            out.setdefault(b.ckn, []).append(b)
        return out

    def search(self, classes: Optional[Sequence[Any]] = None, ckn: Optional[str] = None, task: Optional[str] = None) -> List["Match"]:
        """Bricks that hold any of ``classes`` (names or ids), bind to a CKN whose fingerprint starts with ``ckn``, and
        whose task name (or latent) matches the wildcard ``task``; every given criterion must hold. A CKN brick
        matches ``ckn`` alone (it has no classes or task)."""
        tokens = parse_classes(classes) if classes is not None else None
        if tokens is None and ckn is None and task is None:
            raise KbricksError("search needs --classes, --ckn or --task")
        out = []
        for fp, members in self.groups().items():
            if ckn is not None and not fp.startswith(ckn):
                continue
            meanings = resolve_meanings(tokens, members) if tokens is not None else {}
            for b in members:
                if b.kind == "ckn":
                    if tokens is None and task is None:
                        out.append(Match(b, []))
                    continue
                if task is not None and not (fnmatch.fnmatchcase(str(b.task), task) or fnmatch.fnmatchcase(str(b.latent), task)):
                    continue
                held = [t for t in tokens if _gives(b, meanings.get(t))] if tokens is not None else []
                if tokens is None or held:
                    out.append(Match(b, held))
        return out


@dataclass(frozen=True)
class Match:
    brick: BrickInfo
    classes: List[str]  # the requested classes it holds (as asked)

    def to_dict(self) -> Dict[str, Any]:
        return {**self.brick.to_dict(), "matched_classes": self.classes}


def scan(dirs: Union[PathLike, Sequence[PathLike]]) -> Catalog:
    """Every brick manifest under ``dirs`` (directories, searched recursively, or manifest files), verified."""
    roots = [Path(d) for d in ([dirs] if isinstance(dirs, (str, os.PathLike)) else list(dirs))]
    if not roots:
        raise KbricksError("give at least one directory of bricks or runs")
    missing = [str(r) for r in roots if not r.exists()]
    if missing:
        raise KbricksError(f"no such directory or file: {', '.join(missing)}")
    bricks, refused = [], []
    for path in _manifest_files(roots):
        why = _classify(path)
        if why is None:
            continue
        if why:
            refused.append(Refusal(path, why))
            continue
        try:
            bricks.append(describe(path))
        except KbricksError as exc:
            refused.append(Refusal(path, first_line(exc)))
    return Catalog(bricks, refused, roots)


def _catalog(store: Union["Catalog", PathLike, Sequence[PathLike]]) -> Catalog:
    return store if isinstance(store, Catalog) else scan(store)


# ---- classes by name or id --------------------------------------------------------------------------------------


def parse_classes(classes: Union[str, int, Sequence[Any]]) -> List[str]:
    """``"cat,dog,7"`` or ``["cat", "dog", 7]`` -> ``["cat", "dog", "7"]`` (stripped, empty entries dropped)."""
    items = classes.split(",") if isinstance(classes, str) else [classes] if isinstance(classes, int) else list(classes)
    tokens = [str(c).strip() for c in items if str(c).strip()]
    if not tokens:
        raise KbricksError("give at least one class (a name or an id), e.g. --classes cat,dog,7")
    return list(dict.fromkeys(tokens))


def resolve_classes(tokens: Sequence[str], members: Sequence[BrickInfo]) -> Dict[str, Optional[int]]:
    """Each token's class id in the label space of one CKN's bricks (see :func:`resolve_meanings`); None when it names
    no class there."""
    return {t: m[0] if m else None for t, m in resolve_meanings(tokens, members).items()}


ClassMeaning = Tuple[int, Optional[str]]  # a class id and the name a brick must give it (None: any name)


def resolve_meanings(tokens: Sequence[str], members: Sequence[BrickInfo]) -> Dict[str, Optional[ClassMeaning]]:
    """Each token's class in the label space of one CKN's bricks, as (id, the name a brick must give that id): a class
    name of those bricks, else ``id:name``, else a whole number read as an id. Bricks added later (``kf_extend``, a
    teacher on other data of the same input shape) may give one id another meaning, so a class asked by name only
    matches bricks that give its id that name, and an id that the bricks name differently is refused in one line (ask by
    name). None when a token is none of these."""
    by_name: Dict[str, set] = {}
    names_of_id: Dict[int, set] = {}
    for b in members:
        for c, n in zip(b.classes, b.class_names):
            if n is not None:
                by_name.setdefault(n, set()).add(c)
                names_of_id.setdefault(c, set()).add(n)
    total = max((b.num_classes_total for b in members), default=0)
    ckn = members[0].ckn if members else "?"
    out: Dict[str, Optional[ClassMeaning]] = {}
    for t in tokens:
        if t in by_name:
            ids = sorted(by_name[t])
            if len(ids) > 1:  # bricks made later (kf_extend) with other class names for the data
                raise BrickMismatchError(f"class name {t!r} names classes {ids} in the bricks of CKN {ckn}; ask for it by id "
                                         f"({', '.join(map(str, ids))}) or as id:name ({', '.join(f'{c}:{t}' for c in ids)})")
            out[t] = (ids[0], t)
            continue
        head, sep, name = t.partition(":")
        if sep and head.isdigit() and int(head) < total and name in names_of_id.get(int(head), ()):
            out[t] = (int(head), name)
        elif t.isdigit() and int(t) < total:
            names = sorted(names_of_id.get(int(t), ()))
            if len(names) > 1:
                raise BrickMismatchError(f"class id {t} is named {' and '.join(map(repr, names))} by the bricks of CKN {ckn}; "
                                         f"ask for it by name or as id:name ({', '.join(f'{t}:{n}' for n in names)})")
            out[t] = (int(t), None)
        else:
            out[t] = None
    return out


def _gives(brick: BrickInfo, meaning: Optional[ClassMeaning]) -> bool:
    """Whether ``brick`` holds the class ``meaning`` (its id, under the required name if any)."""
    if meaning is None or meaning[0] not in brick.classes:
        return False
    return meaning[1] is None or brick.class_names[brick.classes.index(meaning[0])] == meaning[1]


def _contradicts(brick: BrickInfo, wanted: Sequence[ClassMeaning]) -> bool:
    """Whether ``brick`` holds one of the ``wanted`` ids under another name than required (it would answer for it)."""
    return any(c in brick.classes and not _gives(brick, (c, n)) for c, n in wanted)


# ---- choosing and assembling ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """The CKN and TSN bricks :func:`choose` picked for the requested classes."""

    ckn: BrickInfo
    tsns: Tuple[BrickInfo, ...]
    requested: Dict[str, int]  # each requested class (as asked) -> its id

    def to_dict(self) -> Dict[str, Any]:
        return {"ckn": {"path": str(self.ckn.path), "fingerprint": self.ckn.fingerprint},
                "tsns": [{"path": str(t.path), "task": t.task, "fingerprint": t.fingerprint, "classes": t.labels, "accuracy": t.accuracy}
                         for t in self.tsns],
                "requested": self.requested}

    def line(self) -> str:
        tsns = "; ".join(f"{t.path} ({', '.join(t.labels)})" for t in self.tsns)
        return f"CKN {self.ckn.fingerprint} ({self.ckn.path}) with {len(self.tsns)} TSN brick{'s' * (len(self.tsns) != 1)}: {tsns}"


def _compatible_tsns(ckn: BrickInfo, catalog: Catalog) -> List[BrickInfo]:
    """Class-partition TSNs that assembly would accept with ``ckn``, one per fingerprint (copies: the first path). The
    label space may differ: a brick made later (``kf_extend``) may add classes, and assembly covers the largest."""
    out: Dict[str, BrickInfo] = {}
    for t in sorted(catalog.tsns_of(ckn.fingerprint), key=lambda b: str(b.path)):
        if t.classes and t.ckn_architecture == ckn.architecture and t.normalize == ckn.normalize:
            out.setdefault(t.fingerprint, t)
    return list(out.values())


def _covers(wanted: Sequence[ClassMeaning], tsns: List[BrickInfo]) -> List[Tuple[BrickInfo, ...]]:
    """Every smallest set of pairwise disjoint TSNs (distinct tasks) that give all ``wanted`` classes (ids, under the
    required names); a brick that holds a wanted id under another name is never used."""
    useful = [t for t in tsns if any(_gives(t, w) for w in wanted) and not _contradicts(t, wanted)]
    best: List[Tuple[BrickInfo, ...]] = []
    limit = [len(wanted) + 1]

    def extend(uncovered: set, chosen: List[BrickInfo], used: set, names: set) -> None:
        if not uncovered:
            if len(chosen) < limit[0]:
                limit[0], best[:] = len(chosen), []
            best.append(tuple(chosen))
            return
        if len(chosen) + 1 > limit[0]:
            return
        c = min(uncovered)  # branch on one class: each cover is found once
        for t in useful:
            if c in t.classes and not used & set(t.classes) and t.task not in names:
                extend(uncovered - set(t.classes), chosen + [t], used | set(t.classes), names | {t.task})

    extend({c for c, _ in wanted}, [], set(), set())
    return best


def _mean_accuracy(tsns: Sequence[BrickInfo]) -> float:
    return sum(t.accuracy or 0.0 for t in tsns) / max(1, len(tsns))


def choose(store: Union[Catalog, PathLike, Sequence[PathLike]], classes: Union[str, Sequence[Any]]) -> Selection:
    """One CKN and the fewest of its TSN bricks that together cover ``classes`` (names or ids), without overlap.
    Ties: higher mean recorded accuracy, then the first paths. Raises :class:`BrickMismatchError` naming the classes
    no compatible brick covers (and the CKN that came closest) when no single CKN's bricks cover them all."""
    catalog = _catalog(store)
    tokens = parse_classes(classes)
    groups = catalog.groups()
    candidates, closest = [], None
    ckns: Dict[str, BrickInfo] = {}
    for ckn in sorted(catalog.ckns, key=lambda b: str(b.path)):
        ckns.setdefault(ckn.fingerprint, ckn)  # copies of one CKN: the first path
    for ckn in ckns.values():
        meanings = resolve_meanings(tokens, groups.get(ckn.fingerprint, []))
        tsns = _compatible_tsns(ckn, catalog)
        covered = [t for t in tokens if any(_gives(b, meanings[t]) for b in tsns)]
        if len(covered) == len(tokens):
            covers = _covers(list(dict.fromkeys(meanings[t] for t in tokens)), tsns)
            if covers:
                best = min(covers, key=lambda s: (-_mean_accuracy(s), sorted(str(t.path) for t in s)))
                candidates.append((ckn, best, {t: meanings[t][0] for t in tokens}))
                continue
        score = (len(covered), len(covered) == len(tokens))
        if closest is None or score > closest[0]:
            closest = (score, ckn, covered)
    if candidates:
        ckn, tsns, ids = min(candidates, key=lambda c: (len(c[1]), -_mean_accuracy(c[1]), str(c[0].path)))
        return Selection(ckn, tuple(sorted(tsns, key=lambda t: min(t.classes))), ids)
    raise BrickMismatchError(_uncovered_message(catalog, tokens, closest))


def _uncovered_message(catalog: Catalog, tokens: List[str], closest) -> str:
    refused = f"; {len(catalog.refused)} manifest(s) in the store were refused (kbricks bricks list shows why)" if catalog.refused else ""
    if closest is None:
        orphans = f" ({len(catalog.bricks)} TSN brick(s) whose CKN is not there)" if catalog.bricks else ""
        return f"no CKN brick in {', '.join(map(str, catalog.roots)) or 'the store'}{orphans}; nothing covers {', '.join(tokens)}{refused}"
    (n, all_held), ckn, covered = closest
    if all_held:
        return (f"the bricks of CKN {ckn.fingerprint} ({ckn.path}) hold {', '.join(tokens)} only in overlapping class sets, "
                f"which do not assemble together{refused}")
    missing = [t for t in tokens if t not in covered]
    near = f"closest: CKN {ckn.fingerprint} ({ckn.path}), whose bricks cover {', '.join(covered)}" if covered else \
        "no CKN's bricks cover any of them"
    return f"no compatible brick covers {', '.join(missing)} ({near}){refused}"


def assemble(ckn_path: Optional[PathLike] = None, tsn_paths: Optional[Sequence[PathLike]] = None, *,
             store: Union[Catalog, PathLike, Sequence[PathLike], None] = None, classes: Union[str, Sequence[Any], None] = None):
    """Bricks -> one network, without fine-tuning: either named (``assemble(ckn, [tsn, ...])``) or found in a store
    by the classes they must cover (``assemble(store="runs", classes=["cat", "dog", 7])``). The network records what
    was chosen in ``net.selection``."""
    if store is None and classes is None:
        if ckn_path is None:
            raise KbricksError("assemble needs a CKN brick and TSN bricks, or store=... and classes=[...]")
        return assemble_bricks(ckn_path, tsn_paths or [])
    if ckn_path is not None or tsn_paths is not None:
        raise KbricksError("assemble takes either brick paths or store=... with classes=..., not both")
    if store is None or classes is None:
        raise KbricksError("assemble by classes needs both store=... (directories of bricks or runs) and classes=[...]")
    return assemble_selection(choose(store, classes))


def assemble_selection(selection: Selection):
    """The network of a :func:`choose` result (bricks verified again as they load), with ``net.selection`` set."""
    net = assemble_bricks(selection.ckn.path, [t.path for t in selection.tsns])
    net.selection = selection
    return net


# ---- text for the command line ----------------------------------------------------------------------------------


def architecture_text(arch: Dict[str, Any]) -> str:
    kwargs = arch.get("kwargs") or {}
    args = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    extra = f" dim {arch['dim']}" if "dim" in arch else ""
    return f"{arch.get('name', '?')}({args}){extra}"


def normalize_text(norm: Optional[Dict[str, Any]]) -> str:
    if not norm or norm.get("mean") is None:
        return "none"
    return f"mean {[round(float(v), 3) for v in norm['mean']]} std {[round(float(v), 3) for v in norm.get('std') or []]}"


def brick_line(b: BrickInfo) -> str:
    acc = f"acc {b.accuracy:.3f}" if b.accuracy is not None else "acc -"
    what = f"task {b.task}  classes {' '.join(b.labels)}" if b.classes else f"task {b.task} (latent {b.latent})" if b.kind == "tsn" \
        else f"{b.num_classes_total} classes  input {'x'.join(map(str, b.input_shape or ['?']))}  normalize {normalize_text(b.normalize)}"
    return f"{b.kind.upper()} {b.fingerprint}  {what}  {architecture_text(b.architecture)}  {b.parameters:,} params  {acc}  {b.path}"


def catalog_text(catalog: Catalog) -> str:
    lines = []
    present = {b.fingerprint for b in catalog.ckns}
    orphans = []
    for fp, members in catalog.groups().items():
        if fp not in present:
            orphans += members
            continue
        for b in members:
            lines.append(("  " if b.kind == "tsn" else "") + brick_line(b))
    if orphans:
        lines.append("TSN bricks whose CKN is not in these directories:")
        lines += [f"  {brick_line(b)}  (CKN {b.ckn})" for b in orphans]
    if catalog.refused:
        lines.append(f"refused ({len(catalog.refused)}):")
        lines += [f"  {r.path}: {r.reason}" for r in catalog.refused]
    if not catalog.bricks and not catalog.refused:
        lines.append(f"no bricks under {', '.join(map(str, catalog.roots))}")
    return "\n".join(lines)


def show_text(b: BrickInfo) -> str:
    rows = [("brick", str(b.path)), ("kind", b.kind), ("fingerprint", f"{b.fingerprint} (weights and signed fields verified)")]
    if b.kind == "tsn":
        rows += [("ckn", b.ckn), ("task", b.task if b.latent is None else f"{b.task} (latent {b.latent})")]
        if b.classes:
            rows.append(("classes", " ".join(b.labels)))
        rows += [("temperature", str(b.temperature)), ("ckn architecture", architecture_text(b.ckn_architecture))]
    rows += [("architecture", architecture_text(b.architecture)), ("parameters", f"{b.parameters:,}"),
             ("accuracy", f"{b.accuracy:.4f} (recorded at training)" if b.accuracy is not None else "not recorded"),
             ("label space", f"{b.num_classes_total} classes"), ("input", "x".join(map(str, b.input_shape or ["?"]))),
             ("normalize", normalize_text(b.normalize))]
    prov = b.to_dict()["provenance"]
    rows += [(k, str(v)) for k, v in prov.items()]
    rows.append(("kbricks", str(b.kbricks_version)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k + ':':<{width + 1}} {v}" for k, v in rows)


__all__ = ["BrickInfo", "Catalog", "Match", "Refusal", "Selection", "assemble", "assemble_selection", "choose", "describe", "parse_classes",
           "resolve_classes", "scan"]
