"""Load a user's class from ``path/file.py:Class`` or ``package.module:Class``,
and say which local sources must travel to the workers for it to load there."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import sysconfig
from types import ModuleType


def is_ref(name: str) -> bool:
    return ":" in name


def canonical_ref(name: str) -> str:
    """Make a file reference absolute, so workers on this machine find it whatever their cwd."""
    target, sep, attr = name.rpartition(":")
    if sep and target.endswith(".py") and not os.path.isabs(target):
        return f"{os.path.abspath(target)}:{attr}"
    return name


def _import_file(path: str) -> ModuleType:
    name = os.path.splitext(os.path.basename(path))[0]
    existing = sys.modules.get(name)
    if existing is not None and os.path.abspath(getattr(existing, "__file__", "") or "") == os.path.abspath(path):
        return existing
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # importable by name afterwards (pickling, workers)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def load_class(ref: str, kind: str, base: type) -> type:
    """Import ``ref`` and return its class, checked to be a concrete subclass of ``base``."""
    target, _, attr = ref.rpartition(":")
    if not target or not attr:
        raise ValueError(f"{kind}={ref!r}: expected path/file.py:Class or package.module:Class")
    try:
        if target.endswith(".py"):
            if os.path.exists(target):
                module = _import_file(target)
            else:  # on a worker of another node: shipped under the file's stem by py_modules
                module = importlib.import_module(os.path.splitext(os.path.basename(target))[0])
        else:
            module = importlib.import_module(target)
    except ModuleNotFoundError as e:
        if target.endswith(".py"):
            raise ValueError(f"{kind}={ref!r}: no such file") from None
        raise ValueError(f"{kind}={ref!r}: cannot import {target} ({_first_line(e)})") from None
    except Exception as e:  # SyntaxError, ImportError, errors raised at import time
        raise ValueError(f"{kind}={ref!r}: cannot import {target} ({_first_line(e)})") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise ValueError(f"{kind}={ref!r}: {target} has no attribute {attr!r}")
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"{kind}={ref!r}: {attr} is not a {base.__name__} subclass")
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        raise ValueError(f"{kind}={ref!r}: {attr} does not implement {', '.join(m + '()' for m in missing)}")
    return cls


def local_sources(ref: str) -> list[str]:
    """Files or package folders a worker needs to import ``ref``: a .py file, or
    the top-level package of a module that is not installed in site-packages."""
    target, _, _ = ref.rpartition(":")
    if target.endswith(".py"):
        return [os.path.abspath(target)]
    top = importlib.import_module(target.split(".")[0])
    path = getattr(top, "__file__", None)
    if not path:
        return []
    installed = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    if any(os.path.abspath(path).startswith(p) for p in installed):
        return []
    return [os.path.dirname(path) if path.endswith("__init__.py") else path]
