"""Deployment: load a network that takes raw inputs from its files (an assembled network or a trained run's model)
and export it to a ``torch.export`` program (``.pt2``), TorchScript or ONNX. Every export is run back from disk
(``torch.export.load`` / ``torch.jit.load`` / onnxruntime) on the example input and on other batch sizes, and is only
kept when it matches eager PyTorch to ``atol`` (1e-5). The file is written atomically and never replaces an
existing one unless asked to.

TorchScript is deprecated from torch 2.14 on (``torch.jit`` warns): it is used only when asked for.

ONNX needs the optional extra: ``pip install 'kbricks[onnx]'`` (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from .. import methods as _methods  # noqa: F401  (methods register the network files they write, e.g. KF's assembled.json)
from .._version import __version__
from ..core.checkpoint import read_json
from ..core.io import first_line, storage_error, writable_dir
from ..errors import KbricksError, StorageError
from ..models.deploy import load_model
from ..models.exported import load_program, read_extra_file
from ..registry import NETWORK_FILES
from .card import import_recorded

FORMATS = ("export", "torchscript", "onnx")
SUFFIXES = {".pt2": "export", ".onnx": "onnx", ".pt": "torchscript", ".pth": "torchscript", ".ts": "torchscript"}
ONNX_OPSET = 18
ONNX_EXTRA = "ONNX export needs the optional extra: pip install 'kbricks[onnx]' (onnx, onnxscript, onnxruntime)"


def load_network(path: Union[str, Path]) -> nn.Module:
    """A trained run's network (a run directory or its ``model.json``, after importing the plugin modules its card
    records) or a network file a method registered (``kbricks.registry.NETWORK_FILES``: KF's assembled network, a
    directory with ``assembled.json`` or that file), fingerprint-checked, in eval mode, taking raw inputs."""
    p = Path(path)
    if p.is_dir():
        opener = NETWORK_FILES.for_directory(p)
        if opener is not None:
            return opener(p)
        if (p / "model.json").exists():
            return _load_run_model(p, p)
        expected = " or ".join(NETWORK_FILES.filenames() + ["model.json (a run directory)"])
        raise KbricksError(f"no deployable network in {str(p)!r} (expected {expected})")
    doc = read_json(p, f"no deployable network at {str(p)!r} (give an assembled network's directory or a run directory)")
    opener = NETWORK_FILES.for_format(doc.get("format")) if isinstance(doc, dict) else None
    if opener is not None:
        return opener(p)
    return _load_run_model(p, p.parent)


def _load_run_model(path: Path, run_dir: Path) -> nn.Module:
    import_recorded(run_dir)
    return load_model(path)


def random_input(net: nn.Module, batch: int = 2, seed: int = 0, shape: Optional[Sequence[int]] = None) -> torch.Tensor:
    """A batch of raw inputs, uniform in [0, 1], of ``shape`` per sample (default: the network's recorded one)."""
    shape = shape or (getattr(net, "info", None) or {}).get("input", {}).get("shape")
    if not shape:
        raise KbricksError("the network does not record its input shape; give an example input (a batch of raw inputs) or --input-shape")
    return torch.rand(batch, *shape, generator=torch.Generator().manual_seed(seed))


def _outputs(out) -> List[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def max_abs_difference(expected, got) -> float:
    """Largest |expected - got| over finite entries; inf when shapes or the positions of inf / nan entries differ
    (an assembled classifier scores -inf for the classes no brick covers)."""
    a, b = _outputs(expected), _outputs(got)
    if len(a) != len(b):
        return float("inf")
    worst = 0.0
    for x, y in zip(a, b):
        x, y = x.detach().float().cpu(), torch.as_tensor(y).detach().float().cpu()
        if x.shape != y.shape:
            return float("inf")
        finite = torch.isfinite(x)
        if not torch.equal(finite, torch.isfinite(y)) or not torch.equal(x[~finite].nan_to_num(0.0), y[~finite].nan_to_num(0.0)):
            return float("inf")
        if finite.any():
            worst = max(worst, (x[finite] - y[finite]).abs().max().item())
    return worst


def _output_names(net: nn.Module, out) -> List[str]:
    names = (getattr(net, "info", None) or {}).get("outputs")
    n = len(_outputs(out))
    if names and len(names) == n:
        return list(names)
    return ["output"] if n == 1 else [f"output_{i}" for i in range(n)]


def _torchscript(net: nn.Module, x: torch.Tensor, tmp: Path, meta: Dict[str, Any], how: str) -> str:
    module, note = None, ""
    if how in ("auto", "script"):
        try:
            module = torch.jit.script(net)
            how = "script"
        except Exception as exc:  # user code TorchScript cannot compile
            if how == "script":
                raise KbricksError(f"torch.jit.script cannot compile the network ({first_line(exc, 200)}); export with torchscript='trace'") from None
            note = f"torch.jit.script failed ({first_line(exc, 200)}); traced on the example input instead"
    if module is None:
        try:
            module = torch.jit.trace(net, x, strict=False, check_trace=False)
        except Exception as exc:
            raise KbricksError(f"torch.jit.trace failed on the network ({first_line(exc, 200)})") from None
        how = "trace"
    meta["torchscript"] = how
    torch.jit.save(module, str(tmp), _extra_files={"kbricks.json": json.dumps(meta)})
    return f"{how}{'; ' + note if note else ''}"


def _exported(net: nn.Module, x: torch.Tensor, tmp: Path, meta: Dict[str, Any]) -> str:
    """torch.export with a dynamic batch dimension; a network whose graph fixes the batch size is exported for the
    example's batch size only, and the result and metadata say so."""
    note = ""
    try:
        program = torch.export.export(net, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        meta["batch"] = "dynamic"
    except Exception as dynamic_failure:
        try:
            program = torch.export.export(net, (x,))
        except Exception as exc:
            raise KbricksError(f"torch.export.export failed on the network ({first_line(exc, 200)}); data-dependent Python control "
                               "flow needs torch.cond, or export with format='onnx' or 'torchscript'") from None
        meta["batch"] = int(x.shape[0])
        note = f"; fixed batch size {int(x.shape[0])} (a dynamic batch failed: {first_line(dynamic_failure, 200)})"
    with open(tmp, "wb") as f:  # a file object: torch.export.save names its archive after a path, not after a tmp name
        torch.export.save(program, f, extra_files={"kbricks.json": json.dumps(meta)})
    return f"torch.export, {'dynamic batch' if meta['batch'] == 'dynamic' else 'fixed batch'}{note}"


def _onnx(net: nn.Module, x: torch.Tensor, tmp: Path, meta: Dict[str, Any], names: List[str], opset: int) -> str:
    try:
        import onnx
        import onnxruntime  # noqa: F401  (checked below)
        import onnxscript  # noqa: F401  (torch.onnx's exporter)
    except ImportError:
        raise KbricksError(ONNX_EXTRA) from None
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    try:
        onnx_log.setLevel(logging.ERROR)  # the exporter logs a warning per torchvision op it cannot register
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(net, (x,), str(tmp), input_names=["input"], output_names=names, opset_version=opset,
                              dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False, verbose=False, dynamo=True)
    except Exception as exc:
        raise KbricksError(f"torch.onnx.export failed on the network ({first_line(exc, 200)}); try format='torchscript'") from None
    finally:
        onnx_log.setLevel(level)
    model = onnx.load(str(tmp))
    onnx.helper.set_model_props(model, {"kbricks": json.dumps(meta)})
    onnx.save(model, str(tmp))
    return f"onnx opset {opset}"


def _run_back(fmt: str, tmp: Path, inputs: Sequence[torch.Tensor]) -> List[Any]:
    if fmt == "export":  # read back the way a .pt2 teacher is read: archive checked, no pickled part
        loaded = load_program(tmp, "export").module()
        with torch.no_grad():
            return [loaded(x) for x in inputs]
    if fmt == "torchscript":
        loaded = torch.jit.load(str(tmp), map_location="cpu")
        with torch.no_grad():
            return [loaded(x) for x in inputs]
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    return [[torch.from_numpy(o) for o in session.run(None, {"input": x.numpy()})] for x in inputs]


def format_for(path: Union[str, Path], format: Optional[str] = None) -> str:
    """``format``, or the one ``path``'s suffix names: ``.pt2`` torch.export, ``.onnx`` ONNX, ``.pt`` / ``.pth`` /
    ``.ts`` TorchScript."""
    if format is not None:
        if format not in FORMATS:
            raise KbricksError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
        return format
    found = SUFFIXES.get(Path(path).suffix.lower())
    if found is None:
        raise KbricksError(f"cannot tell the export format from the name {Path(path).name!r}: name the file .pt2 (torch.export), "
                           ".onnx or .pt (TorchScript, deprecated), or give the format (--format / format=)")
    return found


def export(
    net: Union[nn.Module, str, Path],
    path: Union[str, Path],
    format: Optional[str] = None,
    example_input: Optional[torch.Tensor] = None,
    check_inputs: Optional[Sequence[torch.Tensor]] = None,
    atol: float = 1e-5,
    torchscript: str = "auto",
    opset: int = ONNX_OPSET,
    overwrite: bool = False,
) -> Dict[str, Any]:
    """Export ``net`` (a module, or a path :func:`load_network` accepts) to ``path``.

    ``format`` (default: from the file's suffix, see :func:`format_for`): ``export`` (``torch.export.export`` with a
    dynamic batch dimension, saved with ``torch.export.save``; a graph that fixes the batch size is exported for the
    example's batch size and the result says so), ``torchscript`` (deprecated by torch; ``torch.jit.script``, and
    with ``torchscript="auto"`` a network TorchScript cannot compile is traced instead, and the result says so) or
    ``onnx`` (torch's exporter, opset ``opset``, dynamic batch size; input ``input``, outputs named after the
    network's outputs). ``example_input``: a batch of raw inputs (by default random inputs of the recorded input
    shape). The file is read back and run on the example input, a batch of one and a larger batch (or on
    ``check_inputs``); it is written, atomically, only if every output matches eager PyTorch to ``atol``, and never
    over an existing file unless ``overwrite``. The exported file carries the network's description (input shape,
    normalisation, outputs, classes, fingerprint) as metadata (torch.export and TorchScript: extra file
    ``kbricks.json``; ONNX: metadata property ``kbricks``)."""
    path = Path(path)
    check_export_target(path, overwrite)
    format = format_for(path, format)
    if torchscript not in ("auto", "script", "trace"):
        raise KbricksError(f"torchscript must be 'auto', 'script' or 'trace', not {torchscript!r}")
    if not isinstance(net, nn.Module):
        net = load_network(net)
    was_training = net.training
    try:
        return _export(net.eval(), path, format, example_input, check_inputs, atol, torchscript, opset, overwrite)
    finally:
        net.train(was_training)


def check_export_target(path: Path, overwrite: bool) -> None:
    """Before any work: ``path`` is not a directory, not an existing file (unless ``overwrite``), and its directory
    accepts new files."""
    if path.is_dir():
        raise KbricksError(f"{str(path)!r} is a directory; give the file to write, e.g. {str(path / 'net.pt2')!r}")
    if path.exists() and not overwrite:
        raise KbricksError(f"{str(path)!r} already exists; refusing to replace it (add --overwrite, or overwrite=True in Python)")
    writable_dir(path.parent, "the export's directory")


def _export(net: nn.Module, path: Path, format: str, example_input: Optional[torch.Tensor],
            check_inputs: Optional[Sequence[torch.Tensor]], atol: float, torchscript: str, opset: int,
            overwrite: bool) -> Dict[str, Any]:
    x = example_input if example_input is not None else random_input(net)
    lo, hi = x.min().item(), x.max().item()
    g = torch.Generator().manual_seed(1)

    def like(n: int) -> torch.Tensor:  # random raw inputs in the example's value range
        return lo + (hi - lo) * torch.rand(n, *x.shape[1:], generator=g, dtype=x.dtype)

    # eager outputs on the network's own device; the exported file is run back on the CPU
    device = next(itertools.chain(net.parameters(), net.buffers()), torch.empty(0)).device
    x = x.to(device)
    with torch.no_grad():
        first = net(x)
    names = _output_names(net, first)
    meta = {**_jsonable(getattr(net, "info", None) or {}), "outputs": names, "exported_by": f"kbricks {__version__}"}

    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with torch.no_grad():
            if format == "export":
                how = _exported(net, x, tmp, meta)
            elif format == "torchscript":
                how = _torchscript(net, x, tmp, meta, torchscript)
            else:
                how = _onnx(net, x, tmp, meta, names, opset)
        fixed = meta.get("batch") if isinstance(meta.get("batch"), int) else None
        if check_inputs is None:
            check_inputs = [like(fixed), like(fixed)] if fixed else [like(1), like(x.shape[0] + 3)]
        elif fixed:
            check_inputs = [c for c in check_inputs if c.shape[0] == fixed] or [like(fixed)]
        inputs = [x, *(c.to(device) for c in check_inputs)]
        with torch.no_grad():
            expected = [first, *(net(i) for i in inputs[1:])]
        diffs = [max_abs_difference(e, o) for e, o in zip(expected, _run_back(format, tmp, [i.cpu() for i in inputs]))]
        worst = max(diffs)
        if not worst <= atol:
            sizes = [int(i.shape[0]) for i in inputs]
            raise KbricksError(f"the {format} export differs from the PyTorch network by {worst:.3g} > {atol:g} "
                               f"(batch sizes {sizes}: {', '.join(f'{d:.3g}' for d in diffs)}); nothing was written")
        _commit(tmp, path, overwrite)
    except OSError as exc:
        raise (exc if isinstance(exc, StorageError) else storage_error(exc, path, "the exported network")) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"path": str(path), "format": format, "how": how, "input": "input", "outputs": names,
            "max_abs_diff": worst, "checked_batch_sizes": [int(i.shape[0]) for i in inputs]}


def _commit(tmp: Path, path: Path, overwrite: bool) -> None:
    """Make the checked file durable, then put it at ``path`` in one rename (a file that appeared there meanwhile is
    kept unless ``overwrite``)."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if path.exists() and not overwrite:
        raise KbricksError(f"{str(path)!r} already exists; refusing to replace it (add --overwrite, or overwrite=True in Python)")
    os.replace(tmp, path)
    try:  # the rename itself durable, where the directory can be synced
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _jsonable(info: Dict[str, Any]) -> Dict[str, Any]:
    return json.loads(json.dumps(info, default=str))


def read_export_metadata(path: Union[str, Path]) -> Dict[str, Any]:
    """The description an exported file carries (see :func:`export`), read without loading the network."""
    path = Path(path)
    if path.suffix == ".onnx":
        try:
            import onnx
        except ImportError:
            raise KbricksError(ONNX_EXTRA) from None
        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        return json.loads(props.get("kbricks", "{}"))
    text = read_extra_file(path, "kbricks.json")
    if text is None:
        text = _torchscript_extra_file(path, "kbricks.json")
    return json.loads(text or "{}")


def _torchscript_extra_file(path: Path, name: str) -> Optional[str]:
    """A TorchScript archive's extra file (``<archive>/extra/<name>``), read from the zip without ``torch.jit.load``."""
    try:
        with zipfile.ZipFile(path) as z:
            found = [n for n in z.namelist() if n.count("/") == 2 and n.endswith(f"/extra/{name}")]
            return z.read(found[0]).decode("utf-8") if found else None
    except (zipfile.BadZipFile, OSError):
        raise KbricksError(f"{path} is not an exported network (expected a .pt2, TorchScript or .onnx file)") from None
