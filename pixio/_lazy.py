"""Deferred imports, so that `import pixio` (and every command line's config check) stays light.

- `lazy_exports`: a package's public names, each imported from its module on first use
  (PEP 562 module `__getattr__`): `import pixio` loads no torch; `pixio.build_encoder` does.
- `after_import(library, module)`: import `module` once `library` has been imported, by
  anyone, before or after this call: `import pixio, timm` (either order) registers Pixio's
  encoders with timm without making `import pixio` import timm. The import waits until no
  `pixio.*` module is half-executed: timm is often first imported from inside one
  (`pixio.models.encoder` builds on timm layers), and `pixio.timm_models` needs those modules
  whole.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from typing import Any

_PREFIX = "pixio."
_waiting: dict[str, list[str]] = {}  # library -> modules to import once it is loaded
_ready: list[str] = []  # modules to import as soon as no pixio module is half-executed
_depth = 0  # pixio modules being executed right now


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`(__getattr__, __dir__)` for `package`: name -> the module that defines it."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__


def after_import(library: str, module: str) -> None:
    """Import `module` once `library` is imported (now, when it already is)."""
    if library in sys.modules:
        _ready.append(module)
        _flush()
        return
    _waiting.setdefault(library, []).append(module)
    if not any(isinstance(f, _Watch) for f in sys.meta_path):
        sys.meta_path.insert(0, _Watch())


def _flush() -> None:
    while _ready and _depth == 0:
        importlib.import_module(_ready.pop(0))
    if not _waiting and not _ready:  # nothing left to wait for: stop watching imports
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Watch)]


class _Watch(MetaPathFinder):
    """Finds nothing itself: wraps the loader the other finders return for a `pixio.*` module
    (to count those being executed) or a waited-for library (to queue what waits for it)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        if not fullname.startswith(_PREFIX) and fullname not in _waiting:
            return None
        spec = _find_elsewhere(self, fullname, path, target)
        loader = getattr(spec, "loader", None)
        if loader is None or isinstance(loader, type) or not hasattr(loader, "exec_module"):
            return spec  # a class-level loader (builtin, frozen) is shared: leave it alone
        loader.exec_module = _watched(loader.exec_module, fullname)
        return spec


def _find_elsewhere(me: _Watch, fullname: str, path: Any, target: Any) -> ModuleSpec | None:
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if finder is not me and find is not None:
            spec = find(fullname, path, target)
            if spec is not None:
                return spec
    return None


def _watched(exec_module: Callable[[Any], None], name: str) -> Callable[[Any], None]:
    counted = name.startswith(_PREFIX)

    def run(module: Any) -> None:
        global _depth
        _depth += counted
        try:
            exec_module(module)
        finally:
            _depth -= counted
        _ready.extend(_waiting.pop(name, []))
        _flush()

    return run
