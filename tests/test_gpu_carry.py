"""benchmarks/gpu_carry.py: the carry split into device-call parts, and its unpacking on the GPU machine.

No network and no GPU: a tiny pure wheel is written here, the parts are planned and written with a small budget
(so one file is split over several parts), and unpacking runs the real ``pip install --no-index --no-deps --target``
into a temporary site, as on the device, after which a fresh interpreter imports the package from it.
"""

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from benchmarks import gpu_carry
from benchmarks.gpu_carry import Item, plan_parts, unpack, write_parts

ROOT = Path(__file__).resolve().parent.parent


def tiny_wheel(folder: Path, name: str = "shiqtinypkg", version: str = "1.0", requires: tuple[str, ...] = ()) -> Path:
    """A pure wheel holding one module whose VALUE is 42."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": "VALUE = 42\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                            + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(path, "w") as zf:
        for arc, text in files.items():
            zf.writestr(arc, text)
        zf.writestr(f"{info}/RECORD", "".join(f"{arc},,\n" for arc in files) + f"{info}/RECORD,,\n")
    return path


def test_plan_puts_the_first_items_in_the_last_part_and_splits_only_files():
    items = [Item("a", "wheels", 40), Item("b", "wheels", 50), Item("f", "file", 230), Item("c", "wheels", 100)]
    parts = plan_parts(items, budget=100)
    # a + b + 10 bytes of f | 100 | 100 | the last 20 of f, where c (100) does not fit | c: in call order, reversed
    assert [sum(e["length"] for e in p) for p in parts] == [100, 20, 100, 100, 100]
    assert [e["item"] for e in parts[-1]] == ["a", "b", "f"]  # the call that runs the check gets the first items
    # the file fills what the wheels left (10 bytes), then goes on backwards, contiguous
    chunks = sorted((e["offset"], e["length"]) for p in parts for e in p if e["item"] == "f")
    assert chunks == [(0, 10), (10, 100), (110, 100), (210, 20)]
    assert [e["item"] for e in parts[0]] == ["c"]  # a wheel group is never split: it opens a part of its own
    with pytest.raises(ValueError, match="more than one part"):
        plan_parts([Item("big", "wheels", 101)], budget=100)


def test_lock_pins_and_wheel_names(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("Jupyter_Client==8.10.0\nnest-asyncio2==1.7.4\n# a comment\n-e file:///x\n")
    assert gpu_carry.lock_pins(lock) == {"jupyter-client": "8.10.0", "nest-asyncio2": "1.7.4"}
    assert gpu_carry.wheel_dist("jupyter_client-8.10.0-py3-none-any.whl") == ("jupyter-client", "8.10.0")
    assert {"torch", "transformers", "pyarrow", "nvidia-ml-py"} <= gpu_carry.IMAGE_PACKAGES
    assert not {"trl", "datasets", "liger-kernel", "papermill", "plotly", "gguf"} & gpu_carry.IMAGE_PACKAGES


def _carry(tmp_path: Path, budget: int) -> tuple[Path, bytes]:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    whl = tiny_wheel(wheels, requires=("packaging>=1.0",))
    payload = os.urandom(3000)  # incompressible: the gzipped file is larger than a part
    gz = tmp_path / "asset.gz"
    gz.write_bytes(gzip.compress(payload, mtime=0))
    items = [Item("tiny", "wheels", whl.stat().st_size, stage="loss_kernel", files=[str(whl)]),
             Item("asset", "file", gz.stat().st_size, stage="notebook04", source=str(gz),
                  dest=".assets/asset/data/file.bin", compress=True, sha256=hashlib.sha256(payload).hexdigest(),
                  marker=".assets/asset/.complete", marker_text="asset==1\n")]
    write_parts(items, budget, tmp_path / "carry")
    return tmp_path / "carry", payload


def test_unpack_call_by_call_installs_joins_and_says_what_is_missing(tmp_path):
    whl_size = tiny_wheel(tmp_path).stat().st_size
    carry, payload = _carry(tmp_path, budget=whl_size + 600)
    parts = sorted(int(p.name) for p in carry.iterdir())
    assert len(parts) >= 3
    root, site = tmp_path / "device", tmp_path / "device" / ".gpu-site"
    dest = root / ".assets/asset/data/file.bin"
    # call 1 of N: only part 1 arrives; the file is incomplete, nothing marked complete
    device_carry = root / ".gpu-carry"
    (device_carry / "1").parent.mkdir(parents=True)
    (carry / "1").rename(device_carry / "1")
    state = unpack(root, site=site)
    assert state["items"]["asset"].startswith("incomplete") and not dest.exists()
    assert state["items"]["tiny"].startswith("missing 1 of 1 wheels")
    assert state["missing_parts"] == [str(p) for p in parts[1:]]
    # the machine went cold: part 1's folder is gone, but what it staged in .gpu-site stayed (a warm machine keeps it)
    shutil.rmtree(device_carry / "1")
    for p in parts[1:]:
        (carry / str(p)).rename(device_carry / str(p))
        state = unpack(root, site=site)
    assert state["missing_parts"] == [] and len(state["calls"]) == len(parts)
    assert state["items"] == {"tiny": "complete", "asset": "complete"}
    assert dest.read_bytes() == payload  # joined in order, gunzipped, sha256-checked
    assert (root / ".assets/asset/.complete").read_text() == "asset==1\n"
    assert state["calls"][-1]["installed"] == ["shiqtinypkg-1.0-py3-none-any.whl"]
    assert state["unsatisfied"] == {}  # packaging>=1.0 holds here
    # the installed package imports from the site in a fresh interpreter, as the check's stages do
    out = subprocess.run([sys.executable, "-c", "import shiqtinypkg; print(shiqtinypkg.VALUE, shiqtinypkg.__file__)"],
                         env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True, check=True)
    value, where = out.stdout.split()
    assert value == "42" and Path(where).is_relative_to(site)
    # a second unpack of the same part changes nothing: installed wheels are not reinstalled
    again = unpack(root, site=site)
    assert again["calls"][-1]["installed"] == [] and "shiqtinypkg 1.0" in again["calls"][-1]["present"]
    assert json.loads((site / gpu_carry.STATE_FILE).read_text())["items"]["asset"] == "complete"


def test_unpack_reports_a_requirement_that_nothing_installs(tmp_path):
    wheels = tmp_path / "w"
    wheels.mkdir()
    whl = tiny_wheel(wheels, name="shiqlonely", requires=("shiq-no-such-dist>=1",))
    write_parts([Item("lonely", "wheels", whl.stat().st_size, files=[str(whl)])], 10**6, tmp_path / "root/.gpu-carry")
    state = unpack(tmp_path / "root")
    assert state["items"] == {"lonely": "complete"}  # installed, but it will not import its requirement:
    assert state["unsatisfied"] == {"shiq-no-such-dist": "shiqlonely needs shiq-no-such-dist>=1, not installed"}


def test_unpack_reports_an_unmet_requirement_of_a_carried_wheel(tmp_path):
    wheels = tmp_path / "w"
    wheels.mkdir()
    whl = tiny_wheel(wheels, name="shiqneedy", requires=("packaging>=9999", "pytest; python_version < '3'"))
    write_parts([Item("needy", "wheels", whl.stat().st_size, files=[str(whl)])], 10**6, tmp_path / "root/.gpu-carry")
    state = unpack(tmp_path / "root", dry_run=True)
    assert state["calls"][-1]["would_install"] == [whl.name]
    assert list(state["unsatisfied"]) == ["packaging"]  # the marker-false requirement is not judged
    assert "needs packaging>=9999" in state["unsatisfied"]["packaging"]
    assert not (tmp_path / "root/.gpu-site").exists()  # a dry run writes nothing


def test_gpu_check_dry_run_installs_the_carry_into_a_temporary_site(tmp_path):
    whl_size = tiny_wheel(tmp_path).stat().st_size
    carry, _ = _carry(tmp_path, budget=whl_size + 600)
    last = max(int(p.name) for p in carry.iterdir())
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out-dir", str(tmp_path / "out"),
                           "--carry", str(carry), "--stages", "carry"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    receipt = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    stage = receipt["stages"]["carry"]
    assert proc.returncode == 0 and stage["status"] == "ok", (proc.stderr[-2000:], stage)
    res = stage["result"]
    assert res["installed"] == ["shiqtinypkg-1.0-py3-none-any.whl"] and res["items"]["asset"] == "complete"
    assert res["parts_this_call"] == [f"{k}/{last}" for k in range(1, last + 1)] and res["missing_parts"] == []
    assert "gpu-check-" in res["site"]  # a temporary site, never the checkout's own .gpu-site, in a dry run
