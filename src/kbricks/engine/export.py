"""Deployment: load a network that takes raw inputs from its files (an assembled network or a trained run's model)
and export it to TorchScript or ONNX. Every export is run back from disk (``torch.jit.load`` / onnxruntime) on the
example input and on other batch sizes, and is only kept when it matches eager PyTorch to ``atol`` (1e-5).

ONNX needs the optional extra: ``pip install 'kbricks[onnx]'`` (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from .. import methods as _methods  # noqa: F401  (methods register the network files they write, e.g. KF's assembled.json)
from .._version import __version__
from ..core.checkpoint import read_json
from ..errors import KbricksError
from ..models.deploy import load_model
from ..registry import NETWORK_FILES
from .card import import_recorded

FORMATS = ("torchscript", "onnx")
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _torchscript(net: nn.Module, x: torch.Tensor, tmp: Path, meta: Dict[str, Any], how: str) -> str:
    module, note = None, ""
    if how in ("auto", "script"):
        try:
            module = torch.jit.script(net)
            how = "script"
        except Exception as exc:  # user code TorchScript cannot compile
            if how == "script":
                raise KbricksError(f"torch.jit.script cannot compile the network ({_first_line(exc)}); export with torchscript='trace'") from None
            note = f"torch.jit.script failed ({_first_line(exc)}); traced on the example input instead"
    if module is None:
        try:
            module = torch.jit.trace(net, x, strict=False, check_trace=False)
        except Exception as exc:
            raise KbricksError(f"torch.jit.trace failed on the network ({_first_line(exc)})") from None
        how = "trace"
    meta["torchscript"] = how
    torch.jit.save(module, str(tmp), _extra_files={"kbricks.json": json.dumps(meta)})
    return f"{how}{'; ' + note if note else ''}"


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
        raise KbricksError(f"torch.onnx.export failed on the network ({_first_line(exc)}); try format='torchscript'") from None
    finally:
        onnx_log.setLevel(level)
    model = onnx.load(str(tmp))
    onnx.helper.set_model_props(model, {"kbricks": json.dumps(meta)})
    onnx.save(model, str(tmp))
    return f"onnx opset {opset}"


def _run_back(fmt: str, tmp: Path, inputs: Sequence[torch.Tensor]) -> List[Any]:
    if fmt == "torchscript":
        loaded = torch.jit.load(str(tmp), map_location="cpu")
        with torch.no_grad():
            return [loaded(x) for x in inputs]
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    return [[torch.from_numpy(o) for o in session.run(None, {"input": x.numpy()})] for x in inputs]


def export(
    net: Union[nn.Module, str, Path],
    path: Union[str, Path],
    format: str = "torchscript",
    example_input: Optional[torch.Tensor] = None,
    check_inputs: Optional[Sequence[torch.Tensor]] = None,
    atol: float = 1e-5,
    torchscript: str = "auto",
    opset: int = ONNX_OPSET,
) -> Dict[str, Any]:
    """Export ``net`` (a module, or a path :func:`load_network` accepts) to ``path``.

    ``format``: ``torchscript`` (``torch.jit.script``; with ``torchscript="auto"`` a network TorchScript cannot
    compile is traced instead, and the result says so) or ``onnx`` (torch's exporter, opset ``opset``, dynamic batch
    size; input ``input``, outputs named after the network's outputs). ``example_input``: a batch of raw inputs (by
    default random inputs of the recorded input shape). The file is read back and run on the example input, a batch
    of one and a larger batch (or on ``check_inputs``); it is written only if every output matches eager PyTorch to
    ``atol``. The exported file carries the network's description (input shape, normalisation, outputs, classes,
    fingerprint) as metadata (TorchScript: extra file ``kbricks.json``; ONNX: metadata property ``kbricks``)."""
    if format not in FORMATS:
        raise KbricksError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if torchscript not in ("auto", "script", "trace"):
        raise KbricksError(f"torchscript must be 'auto', 'script' or 'trace', not {torchscript!r}")
    if not isinstance(net, nn.Module):
        net = load_network(net)
    was_training = net.training
    try:
        return _export(net.eval(), Path(path), format, example_input, check_inputs, atol, torchscript, opset)
    finally:
        net.train(was_training)


def _export(net: nn.Module, path: Path, format: str, example_input: Optional[torch.Tensor],
            check_inputs: Optional[Sequence[torch.Tensor]], atol: float, torchscript: str, opset: int) -> Dict[str, Any]:
    x = example_input if example_input is not None else random_input(net)
    if check_inputs is None:
        lo, hi = x.min().item(), x.max().item()
        g = torch.Generator().manual_seed(1)
        check_inputs = [lo + (hi - lo) * torch.rand(n, *x.shape[1:], generator=g, dtype=x.dtype) for n in (1, x.shape[0] + 3)]
    # eager outputs on the network's own device; the exported file is run back on the CPU
    device = next(itertools.chain(net.parameters(), net.buffers()), torch.empty(0)).device
    x = x.to(device)
    inputs = [x, *(c.to(device) for c in check_inputs)]
    with torch.no_grad():
        expected = [net(i) for i in inputs]
    names = _output_names(net, expected[0])
    meta = {**_jsonable(getattr(net, "info", None) or {}), "outputs": names, "exported_by": f"kbricks {__version__}"}

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with torch.no_grad():
            how = _torchscript(net, x, tmp, meta, torchscript) if format == "torchscript" else _onnx(net, x, tmp, meta, names, opset)
        diffs = [max_abs_difference(e, g) for e, g in zip(expected, _run_back(format, tmp, [i.cpu() for i in inputs]))]
        worst = max(diffs)
        if not worst <= atol:
            sizes = [int(i.shape[0]) for i in inputs]
            raise KbricksError(f"the {format} export differs from the PyTorch network by {worst:.3g} > {atol:g} "
                               f"(batch sizes {sizes}: {', '.join(f'{d:.3g}' for d in diffs)}); nothing was written")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"path": str(path), "format": format, "how": how, "input": "input", "outputs": names,
            "max_abs_diff": worst, "checked_batch_sizes": [int(i.shape[0]) for i in inputs]}


def _jsonable(info: Dict[str, Any]) -> Dict[str, Any]:
    return json.loads(json.dumps(info, default=str))


def read_export_metadata(path: Union[str, Path]) -> Dict[str, Any]:
    """The description an exported file carries (see :func:`export`)."""
    path = Path(path)
    if path.suffix == ".onnx":
        try:
            import onnx
        except ImportError:
            raise KbricksError(ONNX_EXTRA) from None
        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        return json.loads(props.get("kbricks", "{}"))
    extra = {"kbricks.json": ""}
    torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra["kbricks.json"] or "{}")
