"""Where the BFCL files live: the ``bfcl-eval`` wheel unpacked as an asset (never imported as a package).

V3 (``bfcl-eval==2025.6.8``, the paper's data) is the ``bfcl`` asset; V4 (``bfcl-v4``) is optional.
"""

from __future__ import annotations

from pathlib import Path

from shiq_lab.infra import assets

__all__ = ["CATEGORIES", "VERSIONS", "backend_source_dir", "data_file", "docs_dir", "package_root"]

# version -> (asset name, file prefix of the data files)
VERSIONS: dict[str, tuple[str, str]] = {"v3": ("bfcl", "BFCL_v3"), "v4": ("bfcl-v4", "BFCL_v4")}
CATEGORIES = ("base", "miss_func", "miss_param", "long_context")


def package_root(version: str = "v3") -> Path:
    """The unpacked ``bfcl_eval`` folder of ``version``; raises :class:`AssetMissingError` naming the fix."""
    if version not in VERSIONS:
        raise ValueError(f"BFCL version {version!r} is unknown: choose one of {', '.join(VERSIONS)}")
    name = VERSIONS[version][0]
    try:
        return assets.asset_path(name)
    except assets.AssetMissingError as err:
        raise assets.AssetMissingError(
            f"the BFCL {version.upper()} data are not on this machine ({err}). The multi-turn tool-use task "
            f"needs them: `python -m shiq_lab.infra.assets fetch {name}` (1-2 MB from PyPI, once)") from None


def data_file(category: str, version: str = "v3", *, answers: bool = False) -> Path:
    """The JSON-lines file of one multi-turn category (questions, or ground-truth answers)."""
    if category not in CATEGORIES:
        raise ValueError(f"BFCL category {category!r} is unknown: choose one of {', '.join(CATEGORIES)}")
    root = package_root(version) / "data"
    if answers:
        root = root / "possible_answer"
    path = root / f"{VERSIONS[version][1]}_multi_turn_{category}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the unpacked wheel: refetch the asset "
                                f"(`rm -r {package_root(version).parent}` then `python -m shiq_lab.infra.assets fetch`)")
    return path


def backend_source_dir(version: str = "v3") -> Path:
    """Folder of the back-ends' Python sources (read as source text, compiled by :mod:`.backends`)."""
    return package_root(version) / "eval_checker" / "multi_turn_eval" / "func_source_code"


def docs_dir(version: str = "v3") -> Path:
    """Folder of the function docs (one JSON-lines file per API class)."""
    return package_root(version) / "data" / "multi_turn_func_doc"
