"""``supermask(module)``: any network as a :class:`~kbricks.models.masked.SupermaskNet`, verified by equivalence.

Exact ``nn.Linear`` / ``nn.Conv2d`` / BatchNorm layers become masked layers; a subclass with behaviour of its own
(timm's ``BatchNormAct2d``, ``Conv2dSame``, ``StdConv2d``; ``nn.MultiheadAttention``) keeps its own forward with
masked weights; what cannot be converted is refused by name. Every conversion is then checked: with all-ones masks
the masked network computes what the original architecture computes with the same weights (float64, eval mode, a
probe batch), and every mask gets a gradient at its own layer.
"""

from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .masked import (
    MaskedConv2d,
    MaskedLayer,
    MaskedLinear,
    MaskedWrapper,
    MaskSource,
    SupermaskNet,
    TaskBatchNorm,
    WrappedTaskBatchNorm,
    _tensor_at,
)


def supermask(module: nn.Module, density: float = 0.5, seed: int = 0, example_input: Optional[torch.Tensor] = None,
              verify: bool = True) -> SupermaskNet:
    """A supermask network built from any ``nn.Module`` (which is not modified): Linear/Conv2d -> masked layers
    with signed-constant weights drawn in module order from ``seed`` (biases dropped), BatchNorm -> per-task
    non-affine BatchNorm, every remaining parameter frozen at its value. The forward pass is the module's own.

    Exact ``nn.Linear`` / ``nn.Conv2d`` / ``nn.BatchNorm*d`` become :class:`MaskedLinear` / :class:`MaskedConv2d`
    / :class:`TaskBatchNorm`; a subclass with behaviour of its own (timm's BatchNormAct2d, Conv2dSame, StdConv2d,
    hooks, a non-zero ``padding_mode``) and ``nn.MultiheadAttention`` (in-projection and out_proj masked) keep
    their own forward through :class:`MaskedWrapper` / :class:`WrappedTaskBatchNorm`.

    With ``verify`` (the default) the conversion is checked on a probe batch (``example_input``, or a shape
    inferred from the first layer), in eval mode and float64: with all-ones masks the converted network must
    compute, to 1e-5, what the original network computes with the same weights (the signed constants) once the
    changes the conversion makes on purpose are applied to it (biases zero, converted BatchNorms the identity on
    fresh statistics); a masked weight read directly, bypassing its mask, is caught (it reads NaN); and every mask
    the forward uses must reach the output (non-zero gradient), else its scores could never train. Anything else
    is a :class:`ConfigError` naming the module types that cannot be converted."""
    if isinstance(module, SupermaskNet):
        return module
    body = copy.deepcopy(module)
    conversion = _Conversion()
    _convert(body, torch.Generator().manual_seed(seed), "", conversion)
    for p in body.parameters():
        p.requires_grad_(False)
    net = SupermaskNet(body, density)
    if verify:
        _verify_conversion(module, net, conversion, example_input)
    return net


class _Conversion:
    """What :func:`_convert` changed on purpose: biases zeroed, BatchNorms made per-task (by path)."""

    def __init__(self):
        self.zeroed: List[str] = []
        self.batchnorms: List[str] = []


_REFUSED = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Embedding, nn.EmbeddingBag)
_BN_TENSORS = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def _plain(child: nn.Module, base: type, methods: Sequence[str], tensors: set) -> bool:
    """Whether ``child`` computes exactly what ``base`` does (so the fast masked layer reproduces it): ``base``
    itself, or a subclass that overrides none of ``methods`` and adds no tensors, children or hooks."""
    if type(child) is base:
        return not (child._forward_hooks or child._forward_pre_hooks)
    own = {n for n, _ in child.named_parameters(recurse=False)} | {n for n, _ in child.named_buffers(recurse=False)}
    return (all(getattr(type(child), m) is getattr(base, m) for m in methods) and own <= tensors
            and not list(child.children()) and not (child._forward_hooks or child._forward_pre_hooks))


def _no_fused_attention(module: nn.Module, args) -> None:
    """A no-op hook: its presence keeps torch's fused transformer paths off (see :func:`_converted`)."""


def _convert(parent: nn.Module, g: torch.Generator, prefix: str, conversion: _Conversion) -> None:
    if isinstance(parent, nn.TransformerEncoder):  # its nested-tensor path reads the attention weights directly
        parent.use_nested_tensor = False
    for name, child in list(parent.named_children()):
        path = prefix + name
        new = _converted(child, path, g, conversion)
        if new is None:
            _convert(child, g, path + ".", conversion)
        else:
            setattr(parent, name, new)


def _converted(child: nn.Module, path: str, g: torch.Generator, conversion: _Conversion) -> Optional[nn.Module]:
    """The masked replacement of ``child`` (at ``path``), or None when it is not a layer to convert."""
    kind = type(child).__name__
    if isinstance(child, (nn.MultiheadAttention, nn.Linear, nn.Conv2d, nn.modules.batchnorm._BatchNorm)):
        from torch.nn.utils import parametrize

        if parametrize.is_parametrized(child):
            raise ConfigError(f"supermask: layer {path!r} ({kind}) has a torch.nn.utils.parametrize parametrization; "
                              "remove it (parametrize.remove_parametrizations) before masking")
    if isinstance(child, nn.MultiheadAttention):
        projections = ["in_proj_weight"] if child._qkv_same_embed_dim else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
        wrapper = _wrapped(child, path, projections + ["out_proj.weight"], ["in_proj_bias", "out_proj.bias"], g, conversion)
        # nn.TransformerEncoderLayer's fused inference path reads the projection weights directly (bypassing the
        # masks); it is skipped whenever a hook is attached to one of its modules
        wrapper.register_forward_pre_hook(_no_fused_attention)
        return wrapper
    if isinstance(child, nn.Linear):
        if not _plain(child, nn.Linear, ("forward",), {"weight", "bias"}):
            return _wrapped(child, path, ["weight"], ["bias"], g, conversion)
        new: MaskedLayer = MaskedLinear(child.in_features, child.out_features, g)
    elif isinstance(child, nn.Conv2d):
        if child.padding_mode != "zeros" or not _plain(child, nn.Conv2d, ("forward", "_conv_forward"), {"weight", "bias"}):
            return _wrapped(child, path, ["weight"], ["bias"], g, conversion)
        new = MaskedConv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                           child.dilation, child.groups, g, child.padding_mode)
    elif isinstance(child, nn.modules.batchnorm._BatchNorm):
        conversion.batchnorms.append(path)
        momentum = child.momentum if child.momentum is not None else 0.1
        if _plain(child, nn.modules.batchnorm._BatchNorm, ("forward",), _BN_TENSORS):
            return TaskBatchNorm(child.num_features, momentum, child.eps)
        return WrappedTaskBatchNorm(copy.deepcopy(child), momentum, child.eps)
    elif isinstance(child, _REFUSED):
        raise ConfigError(f"supermask: layer {path!r} ({kind}) cannot be masked; "
                          "only nn.Linear, nn.Conv2d and nn.MultiheadAttention are supported")
    else:
        return None
    new.site, new.origin = path, path + ".weight"
    conversion.zeroed.append(path + ".bias")
    return new


def _wrapped(child: nn.Module, path: str, targets: Sequence[str], biases: Sequence[str], g: torch.Generator,
             conversion: _Conversion) -> MaskedWrapper:
    inner = copy.deepcopy(child)
    with torch.no_grad():
        for b in biases:
            t = _tensor_at(inner, b)
            if t is not None:
                t.zero_()
            conversion.zeroed.append(f"{path}.{b}")
    wrapper = MaskedWrapper(inner, targets, g)
    for t, layer in zip(targets, wrapper.masked):
        layer.site, layer.origin = path, f"{path}.{t}"
    return wrapper


# ---- the conversion check: all-ones masks and the original weights compute the original outputs ---------------

_PROBE_SIZES = (32, 28, 64, 224)


class _ProbeMasks(MaskSource):
    """All-ones masks (differentiable) on the original weights, ignoring the layers' own frozen weights (set to NaN
    for the check: a module reading a masked layer's weight directly, bypassing its mask, shows as NaN)."""

    def __init__(self, weights: Sequence[torch.Tensor]):
        self.weights = list(weights)
        self.ones = [torch.ones_like(w, requires_grad=True) for w in self.weights]
        self.used: set = set()

    def mask(self, index: int, layer: "MaskedLayer") -> torch.Tensor:
        self.used.add(index)
        return self.ones[index]

    def weight(self, index: int, layer: "MaskedLayer") -> torch.Tensor:
        return self.weights[index] * self.mask(index, layer)


def _tensors(x) -> List[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


def _difference(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Largest difference of two tensor lists relative to the scale of ``b`` (inf when shapes differ or NaN)."""
    if len(a) != len(b):
        return math.inf
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return math.inf
        if not (x.is_floating_point() and y.is_floating_point()):
            if not torch.equal(x, y):
                return math.inf
            continue
        if x.numel() == 0:
            continue
        diff = float((x.detach().double() - y.detach().double()).abs().max())
        if not math.isfinite(diff):
            return math.inf
        worst = max(worst, diff / max(1.0, float(y.detach().abs().max())))
    return worst


class _Recorder:
    """Every module call of ``root``: (path, inputs, outputs) in completion order, the modules entered but not left
    (on an exception, the last is the innermost one that failed), and the outputs of the ``live`` modules."""

    def __init__(self, root: nn.Module, live: Sequence[str] = ()):
        self.calls: List[tuple] = []
        self.open: List[str] = []
        self.records: List[list] = []  # the calls of ``open``
        self.live_paths = set(live)
        self.live: Dict[str, List[torch.Tensor]] = {}  # outputs of the ``live`` modules, still in the graph
        self.handles = []
        for path, m in root.named_modules():
            self.handles.append(m.register_forward_pre_hook(self._enter(path), with_kwargs=True))
            self.handles.append(m.register_forward_hook(self._leave(path), with_kwargs=True))

    def _enter(self, path: str):
        def hook(module, args, kwargs):
            self.calls.append([path, [t.detach().clone() for t in _tensors((args, kwargs))], None])
            self.open.append(path)
            self.records.append(self.calls[-1])
        return hook

    def _leave(self, path: str):
        def hook(module, args, kwargs, output):
            self.open.pop()
            self.records.pop()[2] = [t.detach().clone() for t in _tensors(output)]
            if path in self.live_paths:
                self.live.setdefault(path, []).extend(_tensors(output))
        return hook

    def by_path(self) -> Dict[str, List[tuple]]:
        out: Dict[str, List[tuple]] = {}
        for path, ins, outs in self.calls:
            out.setdefault(path, []).append((ins, outs))
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _reference(original: nn.Module, conversion: _Conversion, dtype: torch.dtype) -> nn.Module:
    """The original network with the changes the conversion makes on purpose: biases of masked layers zero,
    converted BatchNorms the identity affine on fresh statistics (mean 0, variance 1) in eval mode (the masked
    weights are set by :func:`_compare`)."""
    ref = copy.deepcopy(original).cpu().to(dtype).eval()
    with torch.no_grad():
        for path in conversion.zeroed:
            t = _tensor_at(ref, path)
            if isinstance(t, torch.Tensor):
                t.zero_()
        for path in conversion.batchnorms:
            bn = ref.get_submodule(path)
            if bn.weight is not None:
                bn.weight.fill_(1.0)
                bn.bias.zero_()
            bn.track_running_stats = True
            bn.running_mean = torch.zeros(bn.num_features, dtype=dtype)
            bn.running_var = torch.ones(bn.num_features, dtype=dtype)
    return ref


def _probe_batches(module: nn.Module, example_input: Optional[torch.Tensor]) -> List[torch.Tensor]:
    """Inputs to try, in order: the example given, else shapes read from the first layer (a Linear's features; a
    Conv2d's channels at the image sizes the network names, then 32, 28, 64, 224 px)."""
    if example_input is not None:
        return [example_input.detach().cpu()]
    g = torch.Generator().manual_seed(0)
    first = next((m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.MultiheadAttention))), None)
    shapes: List[tuple] = []
    if isinstance(first, nn.Linear):
        shapes += [(2, first.in_features), (2, 4, first.in_features)]
    elif isinstance(first, nn.MultiheadAttention):
        shapes += [(2, 4, first.embed_dim)]
    channels = next((m.in_channels for m in module.modules() if isinstance(m, nn.Conv2d)), None)
    if channels is not None:
        sizes: List[tuple] = []
        for m in module.modules():
            for attr in ("img_size", "image_size"):
                v = getattr(m, attr, None)
                if isinstance(v, int) or (isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v)):
                    sizes.append((v, v) if isinstance(v, int) else tuple(v))
        sizes += [(s, s) for s in _PROBE_SIZES]
        shapes += [(2, channels, *hw) for hw in dict.fromkeys(sizes)]
    return [torch.randn(s, generator=g) for s in shapes]


def _run(net: nn.Module, x: torch.Tensor):
    with torch.random.fork_rng(devices=[]):  # same random stream for both networks; the caller's is untouched
        torch.manual_seed(0)
        return net(x)


def _describe(ref: nn.Module, paths: Sequence[str]) -> str:
    """'TypeA ('a.b', 'c'), TypeB ('d')': the original module types at ``paths`` (wrapper internals mapped back)."""
    modules = dict(ref.named_modules())
    by_type: Dict[str, List[str]] = {}
    for path in paths:
        while path not in modules and path:
            path = path.rpartition(".")[0].removesuffix(".inner").removesuffix(".masked")
        kind = type(modules[path]).__name__ if path in modules else type(ref).__name__
        names = by_type.setdefault(kind, [])
        if path not in names:
            names.append(path)
    parts = []
    for kind, names in by_type.items():
        shown = ", ".join(repr(n or "<network>") for n in names[:3]) + (f", +{len(names) - 3} more" if len(names) > 3 else "")
        parts.append(f"{kind} ({shown})")
    return ", ".join(parts)


_FIX = "replace those modules by standard layers, or mask a network without them"


def _verify_conversion(original: nn.Module, net: SupermaskNet, conversion: _Conversion,
                       example_input: Optional[torch.Tensor]) -> None:
    for dtype, tolerance in ((torch.float64, 1e-5), (torch.float32, 1e-4)):
        ref = _reference(original, conversion, dtype)
        tried = []
        for x in _probe_batches(original, example_input):
            x = x.to(dtype) if x.is_floating_point() else x
            tried.append(tuple(x.shape))
            try:
                with torch.no_grad():
                    _run(ref, x)
            except Exception:
                continue
            _compare(ref, net, x, dtype, tolerance)
            return
    if example_input is not None:
        raise ConfigError(f"supermask: the network does not accept example_input of shape {tried[0]}; "
                          "pass a batch the network accepts")
    raise ConfigError(f"supermask: found no input the network accepts to check the conversion (tried shapes "
                      f"{', '.join(map(str, tried)) or 'none'}); pass example_input=<a batch the network accepts>")


def _compare(ref: nn.Module, net: SupermaskNet, x: torch.Tensor, dtype: torch.dtype, tolerance: float) -> None:
    cand = copy.deepcopy(net).cpu().to(dtype).eval()
    layers = cand.masked_layers()
    # both networks get the signed constants (never zero: an original zero-initialised head would hide everything
    # upstream); the masked layers' own weights become NaN so that a direct read, bypassing the mask, shows
    source = _ProbeMasks([layer.weight.detach().clone() for layer in layers])
    with torch.no_grad():
        for layer, w in zip(layers, source.weights):
            _tensor_at(ref, layer.origin).copy_(w)
            layer.weight = torch.full_like(layer.weight, math.nan)
    ref_rec, cand_rec = _Recorder(ref), _Recorder(cand.body, live=[layer.site for layer in layers])
    try:
        with torch.no_grad():
            expected = _tensors(_run(ref, x))
        try:
            with cand.using(source, task=0):
                got = _tensors(_run(cand.body, x))
        except Exception as e:  # the innermost module still running is the one that failed
            where = _describe(ref, cand_rec.open[-1:] or [""])
            reason = (str(e).strip().splitlines() or [""])[0][:160]
            raise ConfigError(f"supermask: cannot convert {where}: its forward fails once its layers are masked "
                              f"({type(e).__name__}: {reason}); {_FIX}") from None
        worst = _difference(got, expected)
        if worst > tolerance:
            culprits = _first_divergences(ref_rec.by_path(), cand_rec.calls, tolerance)
            raise ConfigError(f"supermask: cannot convert {_describe(ref, culprits or [''])}: with all-ones masks the "
                              f"converted network computes other outputs than the original (relative difference "
                              f"{worst:.2g} > {tolerance:g}); {_FIX}")
    finally:
        ref_rec.remove()
        cand_rec.remove()
    # every mask the forward used must reach its own layer's output, else its scores could never train
    by_site: Dict[str, List[int]] = {}
    for i in sorted(source.used):
        by_site.setdefault(layers[i].site, []).append(i)
    g = torch.Generator().manual_seed(1)
    deaf = []
    for site, used in by_site.items():
        outputs = [t for t in cand_rec.live.get(site, got) if t.requires_grad and t.is_floating_point()]
        grads: Sequence[Optional[torch.Tensor]] = [None] * len(used)
        if outputs:
            objective = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for t in outputs)
            grads = torch.autograd.grad(objective, [source.ones[i] for i in used], allow_unused=True, retain_graph=True)
        if any(gr is None or not bool(gr.ne(0).any()) for gr in grads):
            deaf.append(site)
    if deaf:
        raise ConfigError(f"supermask: cannot convert {_describe(ref, deaf)}: its output does not depend on its mask "
                          f"(the mask could never train: a detached weight, or a gain frozen at 0?); {_FIX}")


def _first_divergences(expected: Dict[str, List[tuple]], calls: Sequence[tuple], tolerance: float) -> List[str]:
    """The innermost module calls whose inputs agree with the reference but whose outputs do not."""
    seen: Dict[str, int] = {}
    culprits: List[str] = []
    for path, ins, outs in calls:
        k = seen.get(path, 0)
        seen[path] = k + 1
        if path not in expected or k >= len(expected[path]) or outs is None:
            continue
        ref_ins, ref_outs = expected[path][k]
        if _difference(ins, ref_ins) <= tolerance and _difference(outs, ref_outs) > tolerance:
            culprits.append(path)
    inner = [c for c in culprits if not any(o != c and (c == "" or o.startswith(c + ".")) for o in culprits)]
    return list(dict.fromkeys(inner))
