"""Old flat module paths (``shiq_lab.token_tree``, ``shiq_lab.imdb_task``, ``python -m shiq_lab.bench``...).

They keep working for one release: an import of an old name returns the module at its new home (the same
module object, so classes compare equal), with a ``DeprecationWarning`` naming the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

#: old module (without ``shiq_lab.``) -> new module; removed in the release after 0.2
LEGACY_MODULES: dict[str, str] = {
    "token_tree": "exact.tree",
    "tabular": "exact.fit",
    "encoding": "data.encode",
    "rewards": "data.rewards",
    "fused_logprobs": "lm.kernel",
    "trainer": "train.trainer",
    "simple_fit": "train.simple_fit",
    "sampling": "evaluation.sampling",
    "token_values": "views.token_values",
    "figures": "views.figures",
    "explorer": "views.explorer",
    "imdb": "tasks.imdb.reviews",
    "reward_model": "tasks.imdb.reward",
    "imdb_model": "tasks.imdb.lm",
    "imdb_task": "tasks.imdb.sweep",
    "models": "infra.models",
    "assets": "infra.assets",
    "cpu": "infra.runtime",
    "notebook_support": "infra.notebooks",
    "notebook_runner": "infra.notebook_runner",
    "demo": "infra.demo",
    "bench": "tasks.synthetic",
    "bench.synthetic": "tasks.synthetic.suite",
    "bench.tasks": "tasks.synthetic.problems",
    "bench.__main__": "tasks.synthetic.__main__",
    **{f"bench.{m}": f"tasks.synthetic.{m}" for m in
       ("forest", "harness", "metrics", "neural_policy", "plots", "report", "sequence_baselines")},
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:  # already executed under its new name
        pass

    def get_code(self, fullname: str):  # what `python -m old.name` runs
        spec = importlib.util.find_spec(self.target)
        assert spec is not None and spec.loader is not None
        return spec.loader.get_code(self.target)  # type: ignore[attr-defined]

    def is_package(self, fullname: str) -> bool:
        spec = importlib.util.find_spec(self.target)
        return bool(spec and spec.submodule_search_locations is not None)


class _LegacyFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith("shiq_lab."):
            return None
        old = fullname[len("shiq_lab."):]
        new = LEGACY_MODULES.get(old)
        if new is None:
            return None
        new_full = f"shiq_lab.{new}"
        if old != "bench.__main__":  # runpy imports the package first; warn once, there
            warnings.warn(f"{fullname} moved to {new_full}; the old path is removed in the next release",
                          DeprecationWarning, stacklevel=2)
        loader = _AliasLoader(new_full)
        is_pkg = loader.is_package(fullname)
        spec = importlib.machinery.ModuleSpec(fullname, loader, is_package=is_pkg)
        if is_pkg:
            target_spec = importlib.util.find_spec(new_full)
            spec.submodule_search_locations = list(target_spec.submodule_search_locations or [])
        return spec


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (first, so an old path never loads a second copy of a module)."""
    if not any(isinstance(f, _LegacyFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _LegacyFinder())
