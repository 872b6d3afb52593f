"""Decorator registries: ``@MODELS.register("name")`` then ``MODELS.create("name", **kw)``."""

from __future__ import annotations

import fnmatch
import inspect
from typing import Any, Callable, Dict, List, Optional

from .errors import ConfigError


class UnknownNameError(ConfigError, KeyError):
    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Callable[..., Any]] = {}

    def register(self, name: Optional[str] = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(obj: Callable[..., Any]) -> Callable[..., Any]:
            key = name or obj.__name__
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._entries[key] = obj
            return obj

        return decorator

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._entries:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; valid {self.kind}s: {', '.join(self.names())}"
            )
        return self._entries[name]

    def create(self, name: str, **kwargs: Any) -> Any:
        factory = self.get(name)
        check_kwargs(factory, kwargs, f"{self.kind} {name!r}")
        return factory(**kwargs)

    def names(self, pattern: str = "*") -> List[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: str) -> bool:
        return name in self._entries


def check_kwargs(factory: Callable[..., Any], kwargs: Dict[str, Any], what: str) -> None:
    """Reject unknown keyword arguments with a message listing the accepted ones."""
    sig = inspect.signature(factory)
    params = sig.parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(f"{what} got unknown argument(s) {unknown}; accepted: {accepted}")
