"""One batch through a network: in eval mode (running statistics untouched), failures as one line."""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import ConfigError
from ._files import exception_line


@torch.no_grad()
def probe(module: nn.Module, x: torch.Tensor, where: str, shown_shape: Union[str, Sequence[int]], fn: Optional[Callable] = None) -> Any:
    """One forward pass (``fn``, default the module) in eval mode, so running statistics stay untouched; a failure
    is one line naming the input shape."""
    was = module.training
    module.eval()
    try:
        return (fn or module)(x)
    except ConfigError:
        raise
    except Exception as exc:
        shown = shown_shape if isinstance(shown_shape, str) else str(list(shown_shape))
        raise ConfigError(f"{where} fails on one batch of the data (input shape {shown}): {exception_line(exc)}") from None
    finally:
        module.train(was)


def output_classes(out: Any, where: str, batch: int) -> Union[int, List[int]]:
    """Number of outputs of logits [B, K] (or of each head of a multi-head network)."""
    if isinstance(out, (list, tuple)) and out and all(isinstance(o, torch.Tensor) for o in out):
        return [output_classes(o, where, batch) for o in out]
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"{where} returns a {type(out).__name__}; it must return logits [batch, classes] (wrap it in a module "
                          "whose forward returns the logits tensor)")
    if out.dim() != 2 or out.shape[0] != batch:
        raise ConfigError(f"{where} returns a tensor of shape {list(out.shape)} for a batch of {batch}; logits [batch, classes] are expected")
    return int(out.shape[1])


def check_built(net: nn.Module, name: str, num_classes: int, input_shape: Sequence[int], hint: str = "") -> None:
    """One zero batch through a freshly built model: a model that cannot take the data's shape, or that predicts
    another number of classes than the data have, fails here in one line instead of at the first training step.
    ``hint``: what to write instead, added to the class-count error."""
    x = torch.zeros(2, *input_shape)
    out = probe(net, x, f"model {name!r}", x.shape)
    if num_classes > 0 and isinstance(out, torch.Tensor):
        k = output_classes(out, f"model {name!r}", 2)
        if k != num_classes:
            raise ConfigError(f"model {name!r} outputs {k} classes but the data have {num_classes}{hint}")
