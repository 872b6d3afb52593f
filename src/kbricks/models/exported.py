"""torch.export programs (``.pt2`` files written by ``torch.export.save``) as networks, read without unpickling.

A ``.pt2`` archive holds JSON graphs and raw tensor bytes, but ``torch.export.load`` also unpickles some parts when
they are there (tensor subclasses, custom and opaque objects, legacy pickled state dicts, sample inputs that
``weights_only=True`` refuses), evaluates shape expressions with sympy and loads AOTInductor native libraries. Before
torch reads an archive, :func:`check_exported_archive` refuses every one of those; after it, every operation in the
graph must be a torch operator (or a builtin of ``operator`` / ``math``).
"""

from __future__ import annotations

import io
import json
import logging
import re
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Set

import torch
from torch import nn

from ..core.io import first_line
from ..errors import CheckpointError, ConfigError

_FORMAT, _VERSION, _MODELS, _WEIGHTS, _CONSTANTS, _SAMPLES, _AOTI = (
    "archive_format", "archive_version", "models/", "data/weights/", "data/constants/", "data/sample_inputs/", "data/aotinductor/")
_PICKLED_CONSTANTS = ("custom_obj_", "opaque_obj_")
# names a shape expression may use: sympy's number and relation classes and torch's integer functions
_SYMPY_NAMES = {
    "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs", "floor", "ceiling", "Eq",
    "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "Piecewise", "True", "False", "true", "false", "oo", "nan",
    "positive", "negative", "nonnegative", "integer", "real", "finite", "FloorDiv", "ModularIndexing", "Where",
    "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow",
    "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt",
    "RoundDecimal", "ToFloat", "Identity", "OpaqueUnaryFn_sqrt", "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or",
    "BitwiseFn_bitwise_xor",
}
_QUOTED = re.compile(r"""'([A-Za-z_]\w*)'|"([A-Za-z_]\w*)\"""")
_NAME = re.compile(r"(?<![\w.])[A-Za-z_]\w*")


def archive_root(path: Path) -> Optional[str]:
    """The folder a ``torch.export.save`` archive keeps its records in, or None when ``path`` is not one."""
    try:
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                root, _, leaf = name.rpartition("/")
                if leaf == _FORMAT and "/" not in root and z.read(name).strip() == b"pt2":
                    return root
    except (zipfile.BadZipFile, OSError, KeyError):
        return None
    return None


def is_exported_archive(path: Path) -> bool:
    return archive_root(Path(path)) is not None


def read_extra_file(path: Path, name: str) -> Optional[str]:
    """An extra file (``torch.export.save(..., extra_files=...)``) read from the archive itself, nothing else loaded."""
    root = archive_root(Path(path))
    if root is None:
        return None
    with zipfile.ZipFile(path) as z:
        try:
            return z.read(f"{root}/extra/{name}").decode("utf-8")
        except KeyError:
            return None


def _strings_of(doc: Any, key: str) -> Iterator[str]:
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k == key and isinstance(v, str):
                yield v
            else:
                yield from _strings_of(v, key)
    elif isinstance(doc, list):
        for v in doc:
            yield from _strings_of(v, key)


def check_exported_archive(path: Path, where: str) -> None:
    """Refuse an archive ``torch.export.load`` would unpickle or run native code from (one line naming the part)."""
    root = archive_root(path)
    if root is None:
        raise ConfigError(f"{where}: {path} is not a torch.export archive (save one with torch.export.save(torch.export.export(net, (x,)), 'net.pt2'))")
    try:
        with zipfile.ZipFile(path) as z:
            _inspect(z, root, f"{where}: {path} is refused: ", where, path)
    except (ValueError, KeyError, AttributeError, TypeError, zipfile.BadZipFile, OSError) as exc:  # records cut or edited
        raise CheckpointError(f"{where}: torch.export file {path} is corrupt or unreadable ({first_line(exc, 200)})") from None


def _inspect(z: zipfile.ZipFile, root: str, refuse: str, where: str, path: Path) -> None:
    names = {n[len(root) + 1:] for n in z.namelist() if n.startswith(root + "/")}
    if any(n.startswith(_AOTI) for n in names):
        raise CheckpointError(refuse + "it holds AOTInductor compiled code (native libraries); kbricks opens exported programs only")
    if any(n.startswith("serialized_") for n in z.namelist()) or "version" in z.namelist():
        raise CheckpointError(refuse + "it is torch.export's pre-2.7 pickled format; export the network again with a current torch")
    models = [n[len(_MODELS):-len(".json")] for n in names if n.startswith(_MODELS) and n.endswith(".json")]
    if not models:
        raise CheckpointError(f"{where}: {path} holds no exported program (models/*.json)")
    symbols: Set[str] = set()
    exprs = []
    for m in models:
        for folder in (_WEIGHTS, _CONSTANTS):
            if f"{folder}{m}.pt" in names:
                raise CheckpointError(refuse + f"its {folder}{m}.pt is a pickled (legacy) state dict; export the network again")
            kind = "weights" if folder == _WEIGHTS else "constants"
            config_name = f"{root}/{folder}{m}_{kind}_config.json"
            config = json.loads(z.read(config_name)).get("config", {}) if config_name[len(root) + 1:] in names else {}
            for fqn, payload in config.items():
                if payload.get("use_pickle") or str(payload.get("path_name", "")).startswith(_PICKLED_CONSTANTS):
                    raise CheckpointError(refuse + f"its entry {fqn!r} is a pickled object, which kbricks never unpickles")
        samples = f"{_SAMPLES}{m}.pt"
        if samples in names:
            data = z.read(f"{root}/{samples}")
            if data:
                try:
                    torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
                except Exception:
                    raise CheckpointError(refuse + "its sample inputs are not plain tensors (torch would unpickle them)") from None
        graph = json.loads(z.read(f"{root}/{_MODELS}{m}.json"))
        for expr in _strings_of(graph, "expr_str"):
            symbols.update(a or b for a, b in _QUOTED.findall(expr))
            exprs.append(expr)
    for expr in exprs:
        unknown = set(_NAME.findall(_QUOTED.sub("''", expr))) - _SYMPY_NAMES - symbols
        if unknown:
            raise CheckpointError(refuse + f"a shape expression uses {sorted(unknown)[0]!r}, which is not a sympy number or relation")


def _check_operators(program: Any, path: Path, where: str) -> None:
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        t = node.target
        if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)):
            continue
        if getattr(t, "__module__", None) in ("_operator", "math") and callable(t):
            continue
        raise CheckpointError(f"{where}: {path} is refused: its graph calls {t!r}, which is not a torch operator")


class ExportedNetwork(nn.Module):
    """The module of a ``torch.export`` program. The graph was fixed when it was exported (normally in eval mode), so
    ``train()`` / ``eval()`` only set this wrapper's flag (the graph module itself refuses them)."""

    def __init__(self, module: nn.Module, path: str):
        super().__init__()
        self.program = module
        self.path = path

    def train(self, mode: bool = True) -> "ExportedNetwork":
        self.training = mode
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.program(*args, **kwargs)


def load_program(path: Path, where: str, extra_files: Optional[Dict[str, str]] = None) -> Any:
    """The ExportedProgram at ``path``, after :func:`check_exported_archive`; ``extra_files`` is filled like
    ``torch.export.load``'s."""
    path = Path(path)
    check_exported_archive(path, where)
    log = logging.getLogger("torch.export")
    level = log.level
    try:
        log.setLevel(logging.ERROR)  # torch logs a traceback before it raises; the error below is the one line
        with open(path, "rb") as f:  # a file object: torch expects a path to end in .pt2, kbricks reads any name
            program = torch.export.load(f, extra_files=extra_files)
    except Exception as exc:
        raise CheckpointError(f"{where}: torch.export file {path} is corrupt or unreadable ({first_line(exc, 200)})") from None
    finally:
        log.setLevel(level)
    _check_operators(program, path, where)
    return program


def open_exported(path: str, where: str) -> nn.Module:
    """A ``.pt2`` file's network (:class:`ExportedNetwork`), frozen in the mode it was exported in."""
    return ExportedNetwork(load_program(Path(path), where).module(), str(path))
