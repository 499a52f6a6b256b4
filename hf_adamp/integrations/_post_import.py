"""Run a function when a module is imported, now if it already is, else right after its import.

``import hf_adamp`` must register the Trainer options, but importing ``transformers.trainer`` and
``accelerate`` eagerly would add many seconds to every ``import hf_adamp``. A meta-path finder lets
the patches land exactly when (and only if) those modules load.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

Patch = Callable[[ModuleType], None]

# Marks our finder in sys.meta_path, so a reloaded copy of this file finds and reuses it.
_MARKER = "_hf_adamp_post_import_finder_"


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        setattr(self, _MARKER, True)
        # module name -> {patch key -> patch}; a key registered again replaces the old patch.
        self.pending: dict[str, dict[str, Patch]] = {}
        self._busy: set[str] = set()

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in self.pending or fullname in self._busy:
            return None
        self._busy.add(fullname)
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or getattr(finder, _MARKER, False):
                    continue
                find_spec = getattr(finder, "find_spec", None)
                spec = find_spec(fullname, path, target) if find_spec is not None else None
                if spec is not None:
                    break
        finally:
            self._busy.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _PatchingLoader(spec.loader, self)
        return spec

    def run(self, module: ModuleType) -> None:
        for key, patch in self.pending.pop(module.__name__, {}).items():
            try:
                patch(module)
            except Exception as exc:  # a failed patch must not make transformers unusable; say so loudly
                warnings.warn(
                    f"hf_adamp could not hook into {module.__name__} ({key}): {type(exc).__name__}: {exc}",
                    RuntimeWarning,
                    stacklevel=2,
                )


class _PatchingLoader(importlib.abc.Loader):
    """Delegates to the real loader, then runs the pending patches on the fresh module."""

    def __init__(self, loader: Any, finder: _PostImportFinder) -> None:
        self._loader = loader
        self._finder = finder

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # Give the module its real loader back (inspect.getsource and friends ask it).
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        self._finder.run(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


def _finder() -> _PostImportFinder:
    for finder in sys.meta_path:
        if getattr(finder, _MARKER, False):
            return finder  # type: ignore[return-value]
    finder = _PostImportFinder()
    sys.meta_path.insert(0, finder)
    return finder


def when_imported(module_name: str, key: str, patch: Patch) -> None:
    """Apply ``patch(module)`` to ``module_name`` now if it is loaded, else once it is.

    ``key`` names the patch: registering the same key again before the import replaces it, so
    re-running registration never applies a patch twice. Patches themselves must be idempotent too,
    since a loaded module is patched at once every time.
    """
    module = sys.modules.get(module_name)
    if module is not None and getattr(module, "__spec__", None) is not None and not _is_initializing(module):
        patch(module)
        return
    _finder().pending.setdefault(module_name, {})[key] = patch


def _is_initializing(module: ModuleType) -> bool:
    return bool(getattr(module.__spec__, "_initializing", False))
