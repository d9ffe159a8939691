"""What the GPU check needs and the GPU image lacks, split into parts that each fit one device call's carry.

The device tool carries at most 64 MiB per call (the working tree included) and keeps a warm machine's ignored
files between calls (~30 s idle release). The GPU check needs more than one call can carry: the cp312 wheels the
image lacks (liger-kernel, trl, datasets, papermill + ipykernel, plotly, gguf and what they need: ~30 MiB) and, for
notebook 04 at GPU scale, the SmolLM2-135M GGUF (94 MiB) and the IMDB reviews (33 MiB, 12 MiB gzipped). So:

    python -m benchmarks.gpu_carry build      # here (make gpu-wheels): .gpu-carry/1 ... .gpu-carry/N
    python -m benchmarks.gpu_carry unpack     # there, in every call (gpu_check.sh does it): into .gpu-site/, .assets/

Call k of N carries ``.gpu-carry/k``; the last call, which runs the check, carries part N, which holds what matters
most (the wheels of the measurement stages first, then notebook 04's), so that if the machine went cold between
calls only notebook 04 is lost, and the receipt says which part never arrived. Files larger than a part are split
into chunks (optionally gzipped first) and reassembled, sha256-checked, once every chunk has arrived.

Wheels are downloaded with ``--no-deps``; their requirement closure is computed from the wheels' own metadata
(``Requires-Dist``, markers evaluated for CPython 3.12 on x86-64 Linux), pinned to ``requirements-cpu.lock`` where
the lock has the distribution, and without what the GPU image already has (:data:`IMAGE_PACKAGES`). On the device
a wheel is installed (``pip --no-index --no-deps --target``, into a fresh folder merged into ``.gpu-site/``, which
``gpu_check.sh`` puts on ``PYTHONPATH``) only where its distribution is missing there, or where a carried wheel needs
a newer one than the image's and that one is carried too (``--include pyarrow``): the image's torch, transformers,
... are never replaced.

The unpack side uses only the standard library (``packaging`` where installed), so it runs before anything else.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CARRY_DIR = ".gpu-carry"  # parts, one folder per device call: .gpu-carry/1, .gpu-carry/2, ...
SITE_DIR = ".gpu-site"  # the device's install target (on PYTHONPATH in gpu_check.sh), plus chunks and state
CARRY_CAP_MIB = 64.0  # the device tool's cap on what one call sends: the working tree plus the carried paths
MARGIN_MIB = 2.0  # files the tree gains before the call (a receipt, a log) and rounding
STATE_FILE = "CARRY_STATE.json"
MANIFEST = "MANIFEST.json"

#: Distributions the GPU image already has (the device library's KINDS.md, package list read on 2026-11-17), so never
#: carried unless asked for by name (``--include``). Names normalised (PEP 503).
IMAGE_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp
""".split())  # noqa: SIM905 -- a word list, as KINDS.md prints it

#: Not in requirements-cpu.lock (a GPU-only peer): the version whose API kernel_cases.liger_flce was checked against
#: (LigerFusedLinearCrossEntropyLoss.forward(lin_weight, _input, target, bias=None); torch >= 2.1.2, triton >= 2.3.1).
EXTRA_PINS = {"liger-kernel": "0.8.5"}

#: (group, the stage that needs it, root distributions), most important first; a group is carried whole or not at all
WHEEL_GROUPS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("liger-kernel", "loss_kernel", ("liger-kernel",)),
    ("trl", "train_step", ("trl", "datasets")),
    ("gguf", "notebook04", ("gguf",)),
    ("papermill", "notebook04", ("papermill", "ipykernel")),
    ("plotly", "notebook04", ("plotly",)),
)

#: (asset, gzip before splitting): notebook 04's data, after the wheels
ASSET_FILES: tuple[tuple[str, bool], ...] = (("movie-reviews", True), ("smollm2", False))

PIP_PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
                "--abi", "abi3", "--abi", "none", "--platform", "manylinux2014_x86_64", "--platform",
                "manylinux_2_17_x86_64", "--platform", "manylinux_2_28_x86_64", "--platform", "any"]
#: the device's interpreter, for evaluating Requires-Dist markers
TARGET_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def norm(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_dist(filename: str) -> tuple[str, str]:
    """(normalised distribution, version) of a wheel file name."""
    parts = Path(filename).name.split("-")
    return norm(parts[0]), parts[1]


def wheel_requirements(wheel: Path) -> list[str]:
    """The wheel's ``Requires-Dist`` lines (markers included)."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode("utf-8", "replace")
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def _applies(requirement: Any) -> bool:
    """The requirement holds on the device's interpreter (extras are never asked for)."""
    return requirement.marker is None or requirement.marker.evaluate(TARGET_ENV)


# ---------------------------------------------------------------------------------------------
# planning: what goes into which part
# ---------------------------------------------------------------------------------------------


@dataclass
class Item:
    """One thing to carry: a wheel group (never split) or a file (split into chunks where needed)."""

    name: str
    kind: str  # "wheels" or "file"
    size: int  # bytes as carried (gzipped, for a gzipped file)
    stage: str = ""
    files: list[str] = field(default_factory=list)  # wheel file names (kind "wheels")
    source: str = ""  # the file to carry (kind "file"), and where it goes on the device, relative to the root
    dest: str = ""
    compress: bool = False
    sha256: str = ""  # of the original file
    marker: str = ""  # written (relative to the root) once the file is complete: the asset's ``.complete``
    marker_text: str = ""


def plan_parts(items: list[Item], budget: int) -> list[list[dict[str, Any]]]:
    """Parts in call order, each at most ``budget`` bytes: the first items (the most important) go into the LAST part.

    A wheel group goes whole into the part being filled, or opens an earlier one; a file fills what is left of the
    part being filled and goes on in earlier parts. Returns, per part, its entries:
    ``{"item": name, "offset": o, "length": n}`` (a whole group: offset 0 and its size).
    """
    if budget <= 0:
        raise ValueError(f"no room to carry anything: budget {budget} bytes (is the working tree near 64 MiB?)")
    backwards: list[list[dict[str, Any]]] = [[]]
    free = budget
    for it in items:
        if it.kind == "wheels":
            if it.size > budget:
                raise ValueError(f"wheel group {it.name}: {it.size / 2**20:.1f} MiB is more than one part "
                                 f"({budget / 2**20:.1f} MiB); leave a distribution out or split the group")
            if it.size > free:
                backwards.append([])
                free = budget
            backwards[-1].append({"item": it.name, "offset": 0, "length": it.size})
            free -= it.size
            continue
        offset = 0
        while offset < it.size:
            if free == 0:
                backwards.append([])
                free = budget
            n = min(free, it.size - offset)
            backwards[-1].append({"item": it.name, "offset": offset, "length": n})
            offset += n
            free -= n
    if not backwards[-1]:
        backwards.pop()
    return backwards[::-1]


def tree_bytes(root: Path) -> int:
    """Bytes of what the device tool sends besides the carry: tracked and untracked-not-ignored files (and shared/)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    total = 0
    for rel in out.decode().split("\0"):
        p = root / rel
        if rel and p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    shared = root / "shared"
    if shared.is_dir():
        total += sum(p.stat().st_size for p in shared.rglob("*") if p.is_file())
    return total


# ---------------------------------------------------------------------------------------------
# build (here)
# ---------------------------------------------------------------------------------------------


def lock_pins(lock: Path) -> dict[str, str]:
    """``{distribution: version}`` from a pip-freeze lock file."""
    pins = {}
    for line in lock.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, ver = line.split(";")[0].split("==", 1)
            pins[norm(name.strip())] = ver.strip()
    return pins


def _download(names: list[str], pins: dict[str, str], dest: Path, python: str) -> None:
    specs = [f"{n}=={pins[n]}" if n in pins else n for n in names]
    subprocess.run([python, "-m", "pip", "download", "-q", "--no-deps", *PIP_PLATFORM, "-d", str(dest), *specs],
                   check=True)


def resolve_wheels(roots: tuple[str, ...], pins: dict[str, str], have: set[str], dest: Path,
                   python: str = sys.executable) -> list[Path]:
    """Download ``roots`` and their requirement closure, skipping distributions in ``have``; returns the wheels."""
    from packaging.requirements import Requirement

    todo = [norm(r) for r in roots if norm(r) not in have]
    got: list[Path] = []
    while todo:
        _download(todo, pins, dest, python)
        fresh = [w for w in dest.glob("*.whl") if w not in got and wheel_dist(w.name)[0] in todo]
        have.update(todo)
        got += fresh
        todo = []
        for w in fresh:
            for line in wheel_requirements(w):
                req = Requirement(line)
                if _applies(req) and norm(req.name) not in have and norm(req.name) not in todo:
                    todo.append(norm(req.name))
    return got


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _asset_item(name: str, compress: bool, staging: Path) -> Item | None:
    from shiq_lab.infra.assets import ASSETS, asset_path, assets_dir, is_fetched

    if not is_fetched(name):
        return None
    src = asset_path(name)
    rel = src.relative_to(assets_dir())
    carried = src
    if compress:
        carried = staging / f"{name}.gz"
        with src.open("rb") as fin, gzip.GzipFile(carried, "wb", compresslevel=6, mtime=0) as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
    return Item(name=name, kind="file", size=carried.stat().st_size, stage="notebook04", source=str(carried),
                dest=f".assets/{name}/{rel.relative_to(name).as_posix()}", compress=compress, sha256=_sha256(src),
                marker=f".assets/{name}/.complete", marker_text=ASSETS[name].requirement + "\n")


def build(out: Path, *, root: Path = ROOT, include: list[str] = (), skip_assets: bool = False,
          python: str = sys.executable, cap_mib: float = CARRY_CAP_MIB) -> dict[str, Any]:
    """Download the wheels, gather the assets, and write the parts ``out/1 .. out/N`` with their manifests."""
    pins = {**lock_pins(root / "requirements-cpu.lock"), **EXTRA_PINS}
    budget = int((cap_mib - MARGIN_MIB) * 2**20) - tree_bytes(root)
    staging = Path(tempfile.mkdtemp(prefix="gpu-carry-"))
    have = set(IMAGE_PACKAGES) - {norm(n) for n in include}
    items: list[Item] = []
    notes: list[str] = []
    for group, stage, roots in WHEEL_GROUPS:
        folder = staging / group
        folder.mkdir()
        extra = tuple(n for n in include if group == "trl")  # --include rides with the trainer group
        wheels = resolve_wheels(roots + extra, pins, have, folder, python)
        items.append(Item(name=group, kind="wheels", stage=stage, size=sum(w.stat().st_size for w in wheels),
                          files=[str(w) for w in sorted(wheels)]))
    for name, compress in ASSET_FILES:
        if skip_assets:
            continue
        it = _asset_item(name, compress, staging)
        if it is None:
            notes.append(f"asset {name} is not fetched here (make assets): notebook 04 will skip on the GPU")
        else:
            items.append(it)
    plan = write_parts(items, budget, out, notes)
    shutil.rmtree(staging)
    return plan


def write_parts(items: list[Item], budget: int, out: Path, notes: list[str] = ()) -> dict[str, Any]:
    """Split ``items`` into parts of at most ``budget`` bytes (:func:`plan_parts`) and write ``out/1 .. out/N``, each
    with a manifest holding its entries and the whole plan; returns the plan."""
    parts = plan_parts(items, budget)
    if out.exists():
        shutil.rmtree(out)
    by_name = {it.name: it for it in items}
    plan = {"parts": len(parts), "budget_bytes": budget, "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_id": hashlib.sha256(os.urandom(16)).hexdigest()[:16],
            "items": [{"name": it.name, "kind": it.kind, "stage": it.stage, "bytes": it.size, "dest": it.dest,
                       "sha256": it.sha256, "compress": it.compress, "marker": it.marker,
                       "marker_text": it.marker_text,
                       "wheels": [Path(f).name for f in it.files] if it.kind == "wheels" else [],
                       "parts": [i + 1 for i, p in enumerate(parts) if any(e["item"] == it.name for e in p)]}
                      for it in items],
            "notes": list(notes)}
    for i, entries in enumerate(parts, start=1):
        folder = out / str(i)
        folder.mkdir(parents=True)
        written = []
        for e in entries:
            it = by_name[e["item"]]
            if it.kind == "wheels":
                for f in it.files:
                    shutil.copy2(f, folder / Path(f).name)
                written.append({"item": it.name, "kind": "wheels", "wheels": [Path(f).name for f in it.files]})
            else:
                chunk = f"{it.name}.{e['offset']:012d}"
                with open(it.source, "rb") as fin, (folder / chunk).open("wb") as fout:
                    fin.seek(e["offset"])
                    fout.write(fin.read(e["length"]))
                written.append({"item": it.name, "kind": "chunk", "file": chunk, "offset": e["offset"],
                                "length": e["length"]})
        (folder / MANIFEST).write_text(json.dumps({"part": i, "of": len(parts), "entries": written, "plan": plan},
                                                  indent=1) + "\n")
    return plan


# ---------------------------------------------------------------------------------------------
# unpack (there)
# ---------------------------------------------------------------------------------------------


def installed(site: Path) -> dict[str, str]:
    """``{distribution: version}`` importable with ``site`` first on the path (as gpu_check.sh sets it)."""
    from importlib import metadata

    out: dict[str, str] = {}
    for found in metadata.distributions(path=[str(site), *sys.path]):
        out.setdefault(norm(found.metadata["Name"] or ""), found.version)  # the first on the path wins, as on import
    return out


def _needs_newer(wheels: list[Path], have: dict[str, str], *, absent: bool = False) -> dict[str, str]:
    """``{dist: why}`` for installed distributions that a carried wheel requires in another version (and, with
    ``absent``, for required ones not installed at all: the image lacks something it was thought to have)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # no packaging: nothing is judged, only missing distributions are installed
        return {}
    out = {}
    for w in wheels:
        for line in wheel_requirements(w):
            req = Requirement(line)
            if not _applies(req):
                continue
            found = have.get(norm(req.name))
            if found is not None and not req.specifier.contains(found, prereleases=True):
                out[norm(req.name)] = f"{wheel_dist(w.name)[0]} needs {req}, found {found}"
            elif found is None and absent:
                out[norm(req.name)] = f"{wheel_dist(w.name)[0]} needs {req}, not installed"
    return out


def _pip_target(wheels: list[Path], site: Path, timeout_s: float = 300.0) -> tuple[list[str], list[str]]:
    """Install ``wheels`` into a fresh folder, then merge it into ``site`` (pip --target would skip, or with
    --upgrade replace, a folder such as ``bin/`` or ``share/`` that an earlier install made)."""
    ok, failed = [], []
    if not wheels:
        return ok, failed
    tmp = Path(tempfile.mkdtemp(prefix="gpu-site-", dir=site))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--disable-pip-version-check", "--target", str(tmp)]
    deadline = time.monotonic() + timeout_s
    try:
        proc = subprocess.run([*cmd, *map(str, wheels)], capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode == 0:
            ok = [w.name for w in wheels]
        else:  # one at a time, so one bad wheel costs only itself
            for w in wheels:
                p = subprocess.run([*cmd, str(w)], capture_output=True, text=True,
                                   timeout=max(1.0, deadline - time.monotonic()))
                (ok.append(w.name) if p.returncode == 0 else failed.append(f"{w.name}: {p.stderr.strip()[-300:]}"))
    except subprocess.TimeoutExpired:
        failed += [f"{w.name}: pip ran past {timeout_s:.0f} s" for w in wheels if w.name not in ok]
    shutil.copytree(tmp, site, dirs_exist_ok=True)
    shutil.rmtree(tmp)
    return ok, failed


def _assemble(item: dict[str, Any], chunks: Path, root: Path) -> str:
    """Join an item's chunks into its destination once all have arrived; returns its status."""
    dest, marker = root / item["dest"], root / item["marker"]
    if dest.exists() and marker.exists():
        return "complete"
    pieces = sorted(chunks.glob(f"{item['name']}.*"))
    have = sum(p.stat().st_size for p in pieces)
    if have < item["bytes"]:
        return f"incomplete: {have} of {item['bytes']} bytes (parts {item['parts']} needed)"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    with tmp.open("wb") as out:
        for p in pieces:  # offsets are zero-padded: name order is file order
            out.write(p.read_bytes())
    if item["compress"]:
        raw = tmp.with_name(tmp.name + ".raw")
        with gzip.open(tmp, "rb") as fin, raw.open("wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
        raw.replace(tmp)
    if _sha256(tmp) != item["sha256"]:
        tmp.unlink()
        return "failed: sha256 mismatch after joining the chunks"
    tmp.replace(dest)
    marker.write_text(item["marker_text"])  # last: its presence marks a complete asset (shiq_lab.infra.assets)
    for p in pieces:
        p.unlink()
    return "complete"


def unpack(root: Path = ROOT, *, carry: Path | None = None, site: Path | None = None,
           dry_run: bool = False, pip_timeout_s: float = 300.0) -> dict[str, Any]:
    """Install / stage every part found under ``carry`` (default ``root/.gpu-carry``) into ``site`` (default
    ``root/.gpu-site``) and ``root/.assets``; returns (and records in ``site``) what is there and what is missing.

    Safe to run in every call: wheels already installed and chunks already staged are skipped. ``dry_run``:
    report what would be installed, change nothing.
    """
    carry = carry or root / CARRY_DIR
    site = site or root / SITE_DIR
    state_path = site / STATE_FILE
    state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.exists() else {"calls": []}
    found = sorted((p for p in carry.glob("*/" + MANIFEST)), key=lambda p: int(p.parent.name)) if carry.is_dir() else []
    call: dict[str, Any] = {"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "parts": [], "installed": [],
                            "failed": [], "present": [], "replaced_older": {}}
    if not dry_run:
        site.mkdir(parents=True, exist_ok=True)
    chunks = site / "chunks"
    plan = state.get("plan")
    to_install: list[Path] = []
    for manifest_path in found:
        manifest = json.loads(manifest_path.read_text())
        if plan is not None and plan["build_id"] != manifest["plan"]["build_id"]:
            call.setdefault("notes", []).append(f"part {manifest['part']} is from another build "
                                                f"({manifest['plan']['created_utc']}): the earlier state is dropped")
            state = {"calls": []}
            if not dry_run:
                shutil.rmtree(chunks, ignore_errors=True)
        plan = manifest["plan"]
        call["parts"].append(f"{manifest['part']}/{manifest['of']}")
        for e in manifest["entries"]:
            if e["kind"] == "wheels":
                to_install += [manifest_path.parent / w for w in e["wheels"]]
            elif not dry_run:
                chunks.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(manifest_path.parent / e["file"], chunks / e["file"])
    have = installed(site)
    newer = _needs_newer(to_install, have)
    missing = []
    for w in to_install:
        dist, version = wheel_dist(w.name)
        if dist not in have or (dist in newer and have[dist] != version):
            missing.append(w)
            if dist in have:
                call["replaced_older"][dist] = newer[dist]
        else:
            call["present"].append(f"{dist} {have[dist]}")
    if dry_run:
        call["would_install"] = [w.name for w in missing]
    else:
        call["installed"], call["failed"] = _pip_target(missing, site, pip_timeout_s)
        have = installed(site)
    items = {}
    for it in (plan or {}).get("items", []):
        if it["kind"] == "wheels":
            absent = [w for w in it["wheels"] if wheel_dist(w)[0] not in have]
            items[it["name"]] = "complete" if not absent else \
                f"missing {len(absent)} of {len(it['wheels'])} wheels (part {it['parts'][0]})"
        elif dry_run:
            items[it["name"]] = "dry run"
        else:
            items[it["name"]] = _assemble(it, chunks, root)
    state["plan"] = plan
    state["calls"] = [*state.get("calls", []), call]
    state["items"] = items
    seen = {p.split("/")[0] for c in state["calls"] for p in c["parts"]}
    state["missing_parts"] = [str(i) for i in range(1, (plan or {}).get("parts", 0) + 1) if str(i) not in seen]
    state["unsatisfied"] = _needs_newer(to_install, have, absent=not dry_run)
    if not dry_run:
        site.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps(state, indent=1) + "\n")
    importlib_invalidate()
    return state


def importlib_invalidate() -> None:
    """Forget the import system's cached folder listings (new packages in ``.gpu-site``)."""
    import importlib

    importlib.invalidate_caches()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="here: download and split into .gpu-carry/1..N")
    b.add_argument("--out", type=Path, default=ROOT / CARRY_DIR)
    b.add_argument("--include", nargs="*", default=[], help="carry these even though the image has them (pyarrow)")
    b.add_argument("--no-assets", action="store_true", help="wheels only (notebook 04 then skips on the GPU)")
    b.add_argument("--cap-mib", type=float, default=float(os.environ.get("GPU_CARRY_CAP_MIB", CARRY_CAP_MIB)))
    u = sub.add_parser("unpack", help="there: install / stage the parts present into .gpu-site and .assets")
    u.add_argument("--carry", type=Path, default=None)
    u.add_argument("--site", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.cmd == "build":
        plan = build(args.out, include=args.include, skip_assets=args.no_assets, cap_mib=args.cap_mib)
        for it in plan["items"]:
            print(f"gpu_carry: {it['name']:<14} {it['bytes'] / 2**20:6.1f} MiB  parts {it['parts']}  ({it['stage']})")
        for note in plan["notes"]:
            print(f"gpu_carry: {note}")
        n = plan["parts"]
        sizes = [sum(f.stat().st_size for f in (args.out / str(i)).iterdir()) / 2**20 for i in range(1, n + 1)]
        print(f"gpu_carry: {n} part(s) of at most {plan['budget_bytes'] / 2**20:.1f} MiB in {args.out} ("
              + ", ".join(f"{s:.1f}" for s in sizes) + " MiB); device calls, back to back (a machine stays warm ~30 s):")
        for i in range(1, n + 1):
            cmd = "bash benchmarks/gpu_check.sh" if i == n else "bash benchmarks/gpu_check.sh --unpack-only"
            print(f"  run(command={cmd!r}, carry=[\"{CARRY_DIR}/{i}\"]" + (", timeout_s=560)" if i == n else ", timeout_s=320)"))
        return 0
    state = unpack(carry=args.carry, site=args.site)
    last = state["calls"][-1]
    print(f"gpu_carry: parts here {last['parts'] or 'none'}; installed {len(last['installed'])} wheels, "
          f"{len(last['failed'])} failed; items {state['items']}; missing parts {state['missing_parts'] or 'none'}")
    return 1 if last["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
