"""Reading a network's layers during its forward pass, and finding its classifier by running it.

Every method that needs a network's head or features uses this module: SSKT's auxiliary heads, KD/KF teacher
features, KF's InfoMax layers, probes of a user's network.

The classifier is found by execution, not by registration order: one forward pass in eval mode, with a hook on
every ``nn.Linear``; the head is the ``nn.Linear`` whose output *is* the network's output (the same memory, not
modified in place since: only views, flatten, identity or eval-mode dropout may follow it). Its input is the
network's features. When no such layer exists the error asks for ``head:`` / ``features:`` in the spec.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..errors import ConfigError
from ._probe import probe

NAME_IT = "name it in the spec with head: <layer> (or features: <layer>[:input]), layer names from named_modules()"


def _reaches_output_unchanged(t: torch.Tensor, version: int, out: torch.Tensor) -> bool:
    """``t`` is ``out`` or a view of the same values (reshape, flatten, identity) not modified in place since."""
    if t._version != version:  # changed in place after the layer (views share the counter)
        return False
    return t is out or (t.data_ptr() == out.data_ptr() and t.numel() == out.numel() and t.dtype == out.dtype)


def find_head(module: nn.Module, example: torch.Tensor, where: str) -> str:
    """The name of the ``nn.Linear`` whose output is ``module``'s output on ``example`` (one eval-mode pass)."""
    if isinstance(module, torch.jit.ScriptModule):
        raise ConfigError(f"{where}: a TorchScript network has no addressable head; give it as an import path or {NAME_IT}")
    linears = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{where}: the network has no nn.Linear layer, so its classifier cannot be found; {NAME_IT}")
    calls: List[Tuple[str, torch.Tensor, int]] = []

    def record(name: str, _module, _inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            calls.append((name, output, output._version))

    handles = [m.register_forward_hook(functools.partial(record, n)) for n, m in linears]
    try:
        out = probe(module, example, where, example.shape)
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"{where}: the network returns a {type(out).__name__}, not one logits tensor, so its classifier "
                          f"cannot be found; {NAME_IT}")
    for name, t, version in reversed(calls):
        if _reaches_output_unchanged(t, version, out):
            return name
    last = repr(calls[-1][0]) if calls else "none ran"
    raise ConfigError(f"{where}: cannot tell which layer is the classifier: no nn.Linear's output is the network's output "
                      f"(last nn.Linear run: {last}); {NAME_IT}")


def _pooled(z: torch.Tensor) -> torch.Tensor:
    return z.flatten(2).mean(2) if z.dim() > 2 else z


def _flat(z: torch.Tensor) -> torch.Tensor:
    return z.flatten(1)


class FeatureTap:
    """Reads layers of any ``nn.Module`` during its forward pass: ``'<layer>'`` (its output) or ``'<layer>:input'``;
    ``layers=None`` is the input of the head found by execution (located on the first call). Values come back
    flattened to [B, D], or average-pooled over space to [B, C] with ``pool=True``.

    Hooks are attached only while the tap is watching (``tap(x)``, or ``with tap.watching(): ...`` then
    ``tap.take()``), so the network keeps no hook of kbricks' when copied, scripted or exported. The hook callables
    and capture slots are built once."""

    def __init__(self, module: nn.Module, layers: Union[None, str, Sequence[str]] = None, where: str = "the network",
                 pool: bool = False):
        self.module, self.where = module, where
        self._shape = _pooled if pool else _flat
        self.scripted = isinstance(module, torch.jit.ScriptModule)
        self.names: List[str] = []
        self._targets: List[Tuple[nn.Module, Any]] = []
        self._slots: List[Optional[torch.Tensor]] = []
        if self.scripted:
            return  # hooks do not run on TorchScript: __call__ uses its exported features(x)
        if layers is not None:
            self._resolve([layers] if isinstance(layers, str) else list(layers))

    def _resolve(self, layers: Sequence[str]) -> None:
        modules = dict(self.module.named_modules())
        targets = []
        for i, spec in enumerate(layers):
            name, _, part = spec.partition(":")
            if part not in ("", "input", "output"):
                raise ConfigError(f"{self.where}: {spec!r}: write '<layer>' (its output) or '<layer>:input'")
            if name not in modules:
                listed = [n for n in modules if n][:12]
                raise ConfigError(f"{self.where} has no layer {name!r}; its layers include {listed}")
            targets.append((modules[name], functools.partial(self._capture, i, part == "input")))
        self.names = [s.partition(":")[0] for s in layers]
        self._targets, self._slots = targets, [None] * len(targets)

    @property
    def located(self) -> bool:
        return bool(self._targets)

    def locate(self, example: torch.Tensor) -> None:
        """Find the head by running ``example`` through the network (when no layer was named)."""
        if not self._targets and not self.scripted:
            self._resolve([f"{find_head(self.module, example[:2], self.where)}:input"])

    def _capture(self, index: int, use_input: bool, _module, inputs, output) -> None:
        value = inputs[0] if use_input else output
        self._slots[index] = value[0] if isinstance(value, (tuple, list)) else value

    @contextmanager
    def watching(self) -> Iterator["FeatureTap"]:
        handles = [m.register_forward_hook(hook) for m, hook in self._targets]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def take(self) -> List[torch.Tensor]:
        """The values captured since the last ``take``, one per layer."""
        slots = self._slots
        for name, z in zip(self.names, slots):
            if z is None:
                raise ConfigError(f"{self.where}: layer {name!r} was not called by the network's forward")
            if not isinstance(z, torch.Tensor):
                raise ConfigError(f"{self.where}: layer {name!r} gives a {type(z).__name__}, not a tensor")
        out = [self._shape(z) for z in slots]
        for i in range(len(slots)):
            slots[i] = None
        return out

    def __call__(self, x: torch.Tensor) -> Tuple[Any, torch.Tensor]:
        """(the network's output, the first tapped layer's values)."""
        if self.scripted:
            fn = getattr(self.module, "features", None)
            if fn is None or not callable(fn):
                raise ConfigError(f"{self.where}: features of a TorchScript network: export a method `features(x)` with @torch.jit.export, "
                                  "or give the network as an import path so a layer can be read")
            return None, fn(x).flatten(1)
        self.locate(x)
        with self.watching():
            out = self.module(x)
        return out, self.take()[0]

    @property
    def layer(self) -> nn.Module:
        """The (first) tapped module."""
        if not self._targets:
            raise ConfigError(f"{self.where}: no layer located yet")
        return self._targets[0][0]
