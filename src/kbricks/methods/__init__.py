"""Training methods, one small file each, registered by name."""

from . import distill, dml, kf, maxl, sskt, supervised  # noqa: F401  (registers methods)
from .base import METHODS, Batch, Method, MethodContext, MethodParams


def list_methods(pattern: str = "*"):
    return METHODS.names(pattern)


def create_method(ctx: MethodContext) -> Method:
    from ..config import validate_method_params

    cls = METHODS.get(ctx.cfg.method.name)
    return cls(validate_method_params(ctx.cfg), ctx)


__all__ = ["METHODS", "Batch", "Method", "MethodContext", "MethodParams", "create_method", "list_methods"]
