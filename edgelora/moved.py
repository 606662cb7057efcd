"""Old module paths that still import, with a DeprecationWarning naming the new one.

Code written against an earlier layout (``from edgelora.manifest import load_manifest``, as the README
used to show) keeps working for a release: the old name becomes the new module itself, so its classes,
functions and private seams are the same objects, not copies. A finder resolves each old name only when
it is imported, so ``import edgelora`` loads none of the modules below.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

MOVED = {
    **{f"edgelora.{name}": f"edgelora.format.{name}"
       for name in ("manifest", "adapter_file", "codec", "factors", "slot_groups", "sidecar", "fileio")},
    "edgelora.check": "edgelora.checks.run",
    **{f"edgelora.{name}": f"edgelora.checks.{name}" for name in ("budget", "baseline", "report", "measure")},
    "edgelora.progress": "edgelora.exporters.progress",
    "edgelora.exporters.train": "edgelora.training.trainer",
    "edgelora.exporters.demo": "edgelora.demo.run",
    "edgelora.exporters.demo_tasks": "edgelora.demo.tasks",
    "edgelora.exporters.tiny_models": "edgelora.demo.tiny_models",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module):
        """The target module ran when it was imported; an alias has nothing more to run."""


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        warnings.warn(f"{fullname} moved to {new}; the old path will go away", DeprecationWarning, stacklevel=2)
        return importlib.machinery.ModuleSpec(fullname, _Alias(new))


def install() -> None:
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
