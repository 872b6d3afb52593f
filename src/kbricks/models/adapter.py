"""From the method's inputs to a network's: the data's normalisation undone, channels / size / shape mapped as the
spec says, the network's own normalisation applied."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..data.augment import channel_view
from ..errors import ConfigError
from .spec import InputSpec


class InputAdapter(nn.Module):
    """From the method's inputs to the network's: undo the run's normalisation, map channels / resize / reshape as
    the spec says, apply the network's normalisation. Identity steps cost nothing."""

    def __init__(self, data_norm: Optional[Dict[str, Any]], net_norm: Optional[Dict[str, Any]], spec: Optional[InputSpec] = None):
        super().__init__()

        def stats(norm):
            if not norm or norm.get("mean") is None:
                return torch.zeros(1), torch.ones(1)
            return torch.tensor(norm["mean"], dtype=torch.float32), torch.tensor(norm["std"], dtype=torch.float32)

        for prefix, norm in (("data", data_norm), ("net", net_norm)):
            m, s = stats(norm)
            self.register_buffer(f"{prefix}_mean", m)
            self.register_buffer(f"{prefix}_std", s)
        self.spec = spec or InputSpec()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * channel_view(self.data_std, x) + channel_view(self.data_mean, x)
        spec = self.spec
        if spec.channels is not None:
            if x.dim() != 4:
                raise ConfigError(f"input.channels needs images [N, C, H, W], got {list(x.shape)}")
            x = x.mean(1, keepdim=True) if spec.channels == "mean" else x[:, list(spec.channels)]
        if spec.size is not None:
            if x.dim() != 4:
                raise ConfigError(f"input.size needs images [N, C, H, W], got {list(x.shape)}")
            size = (spec.size, spec.size) if isinstance(spec.size, int) else tuple(spec.size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if spec.shape is not None:
            x = x.reshape(x.shape[0], *spec.shape)
        return (x - channel_view(self.net_mean, x)) / channel_view(self.net_std, x)
