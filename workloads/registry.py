"""Name -> class registries, with close-name suggestions and entry points."""
from __future__ import annotations

import difflib
from importlib.metadata import entry_points
from typing import Callable, Generic, TypeVar

from workloads.plugins import is_ref, load_class

T = TypeVar("T", bound=type)


class UnknownName(ValueError):
    """A name no registry (nor entry point) knows."""


class Registry(Generic[T]):
    def __init__(self, kind: str, entry_point_group: str, base: type):
        self.kind, self.group, self.base = kind, entry_point_group, base
        self._classes: dict[str, T] = {}
        self._entry_points_loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        def wrap(cls: T) -> T:
            existing = self._classes.get(name)
            if existing is not None and _origin(existing) != _origin(cls):
                raise ValueError(
                    f"{self.kind} {name!r} is already registered by {existing.__module__}.{existing.__qualname__}"
                )
            cls.name = name
            self._classes[name] = cls
            return cls

        return wrap

    def _load_entry_points(self, *, rescan: bool = False) -> None:
        """Register installed plugins (entry-point group ``polytrain.workloads`` or
        ``polytrain.strategies``); ``rescan`` picks up packages installed since."""
        if self._entry_points_loaded and not rescan:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=self.group):
            if ep.name not in self._classes:
                try:
                    cls = ep.load()
                except Exception as e:
                    raise ValueError(f"{self.kind} entry point {ep.name}={ep.value}: cannot import ({e})") from None
                if not (isinstance(cls, type) and issubclass(cls, self.base)):
                    raise ValueError(f"{self.kind} entry point {ep.name}={ep.value}: not a {self.base.__name__}")
                self.register(ep.name)(cls)

    def get(self, name: str) -> T:
        """A registered name, an entry point, or a reference path/file.py:Class or package.module:Class."""
        if is_ref(name):
            return load_class(name, self.kind, self.base)
        if name not in self._classes:
            self._load_entry_points(rescan=True)
        if name not in self._classes:
            close = difflib.get_close_matches(name, self._classes, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
            raise UnknownName(f"{self.kind}={name!r} is not registered; {hint}(available: {', '.join(self.names())})")
        return self._classes[name]

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._classes)


def _origin(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _workload_base() -> type:
    from workloads.base import Workload

    return Workload


WORKLOADS: Registry = Registry("workload", "polytrain.workloads", _workload_base())
register_workload = WORKLOADS.register
