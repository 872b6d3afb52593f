"""Decorator registries: ``@MODELS.register("name", tags=("masked",))`` then ``MODELS.create("name", **kw)``.

A registry is filled by the modules that define its entries (imported by their package) and by user code:
``--import MODULE`` on the command line, or an installed package that declares an entry point in the registry's
group (``kbricks.models``, ``kbricks.methods``, ``kbricks.datasets``, ``kbricks.scenarios``).
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from .errors import ConfigError


class UnknownNameError(ConfigError, KeyError):
    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


class Registry:
    def __init__(self, kind: str, entry_point_group: Optional[str] = None):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._entries: Dict[str, Callable[..., Any]] = {}
        self._tags: Dict[str, Tuple[str, ...]] = {}
        self._plugins_loaded = False

    def register(self, name: Optional[str] = None, tags: Iterable[str] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(obj: Callable[..., Any]) -> Callable[..., Any]:
            key = name or obj.__name__
            if key in self._entries and self._entries[key] is not obj:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._entries[key] = obj
            self._tags[key] = tuple(tags)
            return obj

        return decorator

    def _load_plugins(self) -> None:
        """Entry points of installed packages, loaded once, on the first lookup."""
        if self._plugins_loaded or self.entry_point_group is None:
            return
        self._plugins_loaded = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=self.entry_point_group):
            try:
                ep.load()
            except Exception as exc:
                raise ConfigError(f"entry point {ep.name!r} ({ep.value}) of group {self.entry_point_group!r} failed to load: {exc}") from None

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._entries:
            self._load_plugins()
        if name not in self._entries:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; valid {self.kind}s: {', '.join(self.names())}")
        return self._entries[name]

    def create(self, name: str, **kwargs: Any) -> Any:
        factory = self.get(name)
        check_kwargs(factory, kwargs, f"{self.kind} {name!r}")
        return factory(**kwargs)

    def tags(self, name: str) -> Tuple[str, ...]:
        self.get(name)
        return self._tags[name]

    def names(self, pattern: str = "*", tag: Optional[str] = None) -> List[str]:
        self._load_plugins()
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern) and (tag is None or tag in self._tags[n]))

    def __contains__(self, name: str) -> bool:
        self._load_plugins()
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


_IMPORTED: List[str] = []  # modules import_user_modules loaded in this process, in order


def importable_working_directory() -> None:
    """User code next to the config (``my_models.py``) is importable, as under ``python -m``: the working directory
    joins the module search path once."""
    import os
    import sys

    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())


def import_user_modules(modules: Iterable[str]) -> None:
    """``--import MODULE``: import user code that registers models, methods or datasets. The working directory is
    searched too (as ``python -m`` does), so a ``my_models.py`` next to the config is found. The modules are
    remembered (:func:`imported_modules`): a run records them in its model card."""
    importable_working_directory()
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise ConfigError(f"--import {name}: {type(exc).__name__}: {exc}") from None
        if name not in _IMPORTED:
            _IMPORTED.append(name)


def imported_modules() -> List[str]:
    """The modules :func:`import_user_modules` has imported (since :func:`forget_imported_modules`)."""
    return list(_IMPORTED)


def forget_imported_modules() -> None:
    """Start a new record: each ``kbricks`` command records only its own ``--import`` modules (the modules stay
    imported)."""
    _IMPORTED.clear()


class NetworkFiles:
    """Openers of the network files methods write beside the engine's own ``model.json`` (KF's ``assembled.json``),
    so ``kbricks export`` opens them without knowing the method. An opener is registered under the file's name (found
    in a directory) and the prefix of its JSON ``format`` field (a file given directly)."""

    def __init__(self) -> None:
        self._openers: List[Tuple[str, str, Callable[[Any], Any]]] = []

    def register(self, filename: str, format_prefix: str) -> Callable[[Callable[[Any], Any]], Callable[[Any], Any]]:
        def decorator(opener: Callable[[Any], Any]) -> Callable[[Any], Any]:
            self._openers = [o for o in self._openers if o[0] != filename] + [(filename, format_prefix, opener)]
            return opener

        return decorator

    def for_directory(self, folder) -> Optional[Callable[[Any], Any]]:
        """The opener of the first registered file present in ``folder`` (None: none is)."""
        from pathlib import Path

        return next((o for name, _, o in self._openers if (Path(folder) / name).exists()), None)

    def for_format(self, fmt: Any) -> Optional[Callable[[Any], Any]]:
        """The opener of a JSON document whose ``format`` is ``fmt`` (None: no registered kind)."""
        return next((o for _, prefix, o in self._openers if str(fmt or "").startswith(prefix)), None)

    def filenames(self) -> List[str]:
        return [name for name, _, _ in self._openers]


NETWORK_FILES = NetworkFiles()


class ObjectStore:
    """Python objects handed to the API (networks, datasets) under a string key, so that a run config can name them
    like any other network or dataset: ``memory:teacher-1``. The key lives as long as this Python process; a config
    naming it cannot be replayed in another process (the error says so)."""

    PREFIX = "memory:"

    def __init__(self) -> None:
        self._objects: Dict[str, Any] = {}
        self._count = 0

    def put(self, obj: Any, kind: str) -> str:
        for key, held in self._objects.items():
            if held is obj:
                return key
        self._count += 1
        key = f"{self.PREFIX}{kind}-{self._count}"
        self._objects[key] = obj
        return key

    @classmethod
    def is_key(cls, text: Any) -> bool:
        return isinstance(text, str) and text.startswith(cls.PREFIX)

    def get(self, key: str, what: str) -> Any:
        if key not in self._objects:
            raise ConfigError(f"{what}: {key!r} names an object handed to the Python API; it only exists in the Python "
                              "process that created it (name a file, an import path or a registered name instead)")
        return self._objects[key]

    def release(self, key: str) -> None:
        self._objects.pop(key, None)


OBJECTS = ObjectStore()
