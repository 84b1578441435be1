"""Name -> class registries, with close-name suggestions and entry points."""
from __future__ import annotations

import difflib
from importlib.metadata import entry_points
from typing import Callable, Generic, TypeVar

T = TypeVar("T", bound=type)


class UnknownName(ValueError):
    """A name no registry (nor entry point) knows."""


class Registry(Generic[T]):
    def __init__(self, kind: str, entry_point_group: str):
        self.kind, self.group = kind, entry_point_group
        self._classes: dict[str, T] = {}
        self._entry_points_loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        def wrap(cls: T) -> T:
            existing = self._classes.get(name)
            if existing is not None and existing.__qualname__ != cls.__qualname__:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered by {existing.__module__}.{existing.__qualname__}"
                )
            cls.name = name
            self._classes[name] = cls
            return cls

        return wrap

    def _load_entry_points(self) -> None:
        if not self._entry_points_loaded:
            self._entry_points_loaded = True
            for ep in entry_points(group=self.group):
                if ep.name not in self._classes:
                    self.register(ep.name)(ep.load())

    def get(self, name: str) -> T:
        if name not in self._classes:
            self._load_entry_points()
        if name not in self._classes:
            close = difflib.get_close_matches(name, self._classes, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
            raise UnknownName(f"{self.kind}={name!r} is not registered; {hint}(available: {', '.join(self.names())})")
        return self._classes[name]

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._classes)


WORKLOADS: Registry = Registry("workload", "polytrain.workloads")
register_workload = WORKLOADS.register
