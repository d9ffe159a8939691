"""`make lab`: JupyterLab starts (as root too), announces no news, and saving a run notebook keeps the tree clean."""

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from shiq_lab.infra.lab import lab_command
from shiq_lab.infra.strip_notebook import strip_text

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url: str, method: str = "GET", body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read() or b"{}")


def test_lab_command_allows_root_only_as_root_and_turns_news_off(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    as_root = lab_command()
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    as_user = lab_command()
    assert "--allow-root" in as_root and "--allow-root" not in as_user
    assert "--LabApp.news_url=None" in as_user
    overrides = json.loads((ROOT / "configs" / "jupyterlab" / "overrides.json").read_text())
    assert overrides["@jupyterlab/apputils-extension:notification"]["fetchNews"] == "false"


@pytest.mark.notebook
def test_lab_serves_without_news_and_saves_notebooks_stripped(tmp_path):
    root = tmp_path / "repo"
    (root / "notebooks").mkdir(parents=True)
    shutil.copy(NOTEBOOK, root / "notebooks" / NOTEBOOK.name)
    port, token = _free_port(), "t0k"
    env = {**os.environ, "SHIQ_LAB_RUNS": str(tmp_path / "runs"), "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "user-settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"), "PYTHONPATH": str(ROOT)}
    cmd = lab_command(["--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
                       "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}"], root=root)
    log = tmp_path / "lab.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                _call(f"{base}/api/status?token={token}")
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
        settings = _call(f"{base}/lab/api/settings/@jupyterlab/apputils-extension:notification?token={token}")
        defaults = settings["schema"]["properties"]  # overrides.json sets the defaults
        assert defaults["fetchNews"]["default"] == "false" and defaults["checkForUpdates"]["default"] is False, settings
        with urllib.request.urlopen(f"{base}/lab?token={token}", timeout=30) as resp:
            page = resp.read().decode()
        assert '"news": {"disabled": true}' in page or '"news":{"disabled":true}' in page
        # save the notebook as JupyterLab does after running it: outputs in the model
        stored = (root / "notebooks" / NOTEBOOK.name).read_text(encoding="utf-8")
        nb = json.loads(stored)
        code = next(c for c in nb["cells"] if c["cell_type"] == "code")
        code["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["ran\n"]}]
        code["execution_count"] = 1
        _call(f"{base}/api/contents/{NOTEBOOK.name}?token={token}", "PUT",
              {"type": "notebook", "format": "json", "content": nb})
        assert (root / "notebooks" / NOTEBOOK.name).read_text(encoding="utf-8") == stored  # the tracked file
        reopened = _call(f"{base}/api/contents/{NOTEBOOK.name}?token={token}&content=1")
        shown = next(c for c in reopened["content"]["cells"] if c["cell_type"] == "code")
        assert shown["outputs"][0]["text"] in ("ran\n", ["ran\n"])  # the outputs survive a reload
        assert strip_text((tmp_path / "runs" / "lab" / NOTEBOOK.name).read_text(encoding="utf-8")) == stored
    finally:
        try:
            urllib.request.urlopen(urllib.request.Request(f"{base}/api/shutdown?token={token}", method="POST",
                                                          data=b""), timeout=10)
            proc.wait(timeout=30)
        except Exception:  # noqa: BLE001 -- a server that is already gone
            proc.kill()
