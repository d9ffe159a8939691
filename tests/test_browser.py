"""Notebook 02 in a real JupyterLab, driven in Debian's headless chromium by playwright.

Starts JupyterLab on a free loopback port with a token (temporary runtime/config folders, a copy of
the notebook so autosave never touches the repository), runs all cells of notebook 02 with its
default (tiny) parameters, waits for the plotly figures and the explorer widget, switches the
explorer's quantity, checks that the figure's data changed to the new quantity, and saves a
screenshot under ``artifacts/browser/``. Uses the system chromium (``make browser-deps``), never a
browser download.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "02_token_values.ipynb"
ARTIFACTS = ROOT / "artifacts" / "browser"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.browser


def _chromium() -> str | None:
    from shiq_lab.views.figures import chromium_path

    return chromium_path()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer {url} in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture()
def lab(tmp_path):
    """A JupyterLab serving a copy of notebook 02; yields (url, token); shut down afterwards."""
    jupyter = Path(sys.executable).parent / "jupyter"
    if not jupyter.exists():
        pytest.skip(f"{jupyter} not found: install the notebooks extra (make setup)")
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    port, token = _free_port(), secrets.token_hex(16)
    settings = tmp_path / "lab-settings"
    tracker = settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"windowingMode": "none"}))  # render every cell, not only the visible ones
    notices = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notices.parent.mkdir(parents=True)
    notices.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))  # no news pop-up, no network
    env = {
        **os.environ,
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "IPYTHONDIR": str(tmp_path / "ipython"),
        "JUPYTERLAB_SETTINGS_DIR": str(settings),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
        "SHIQ_LAB_RUNS": str(tmp_path / "runs"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),  # tiny models: threads only contend
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    }
    log = tmp_path / "jupyterlab.log"
    cmd = [str(jupyter), "lab", "--no-browser", "--ServerApp.open_browser=False", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}", "--LabApp.extension_manager=readonly"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # CI runs as root
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/api/status?token={token}", 90, proc, log)
        yield url, token
    finally:
        try:  # graceful: the server shuts its kernels down (and their kaleido browsers with them)
            req = urllib.request.Request(f"{url}/api/shutdown?token={token}", method="POST", data=b"")
            urllib.request.urlopen(req, timeout=10)
            proc.wait(timeout=30)
        except Exception:
            pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


_NOTEBOOK_STATE = """() => {
  const panel = window.jupyterapp.shell.currentWidget;
  if (!panel || !panel.content || !panel.sessionContext) return null;
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  const cells = [];
  const model = panel.content.model;
  for (let i = 0; i < model.cells.length; i++) {
    const cell = model.cells.get(i);
    if (cell.type !== 'code') continue;
    const outputs = cell.outputs.toJSON();
    cells.push({count: cell.executionCount, errors: outputs.filter(o => o.output_type === 'error')
                  .map(o => o.ename + ': ' + o.evalue),
                plotly: outputs.filter(o => o.data && o.data['application/vnd.plotly.v1+json']).length});
  }
  return {kernel: kernel ? kernel.status : null, cells};
}"""

_STRIP = "() => { const d = document.querySelector('.shiq-explorer .shiq-strip .js-plotly-plot'); " \
         "return d && d.data ? {name: d.data[0].name, z: d.data[0].z} : null; }"


def test_notebook_02_runs_in_jupyterlab_and_the_explorer_reacts(lab, tmp_path) -> None:
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no chromium installed: `make browser-deps` installs Debian's chromium with apt (needs root); "
                    "this test never downloads a browser")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright (dev extra) is not installed")
    url, token = lab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=chromium, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1400, "height": 1000})  # a new, empty profile every run
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.goto(f"{url}/lab/tree/{NOTEBOOK.name}?reset&token={token}", timeout=90_000)
            page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget "
                                   "&& window.jupyterapp.shell.currentWidget.sessionContext", timeout=90_000)
            page.wait_for_function(f"() => {{ const s = ({_NOTEBOOK_STATE})(); return s && s.kernel === 'idle'; }}",
                                   timeout=120_000)
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            # done when every code cell has run (or one failed) and the kernel is idle again
            page.wait_for_function(
                f"""() => {{ const s = ({_NOTEBOOK_STATE})();
                    return s && s.kernel === 'idle' && (s.cells.every(c => c.count !== null)
                           || s.cells.some(c => c.errors.length)); }}""", timeout=300_000, polling=1000)
            state = page.evaluate(_NOTEBOOK_STATE)
            errors = [e for c in state["cells"] for e in c["errors"]]
            assert not errors, f"notebook 02 failed in JupyterLab: {errors}"

            page.wait_for_selector(".shiq-explorer .shiq-strip .js-plotly-plot", timeout=60_000)
            page.wait_for_selector(".shiq-explorer .widget-toggle-button", timeout=60_000)
            n_figures = sum(c["plotly"] for c in state["cells"])
            rendered = page.evaluate("() => document.querySelectorAll('.jp-RenderedPlotly').length")
            # every figure is handled by JupyterLab's plotly extension (the notebook's and the explorer's)
            assert n_figures >= 5 and rendered >= n_figures + 1, f"{n_figures} figures in outputs, {rendered} rendered"
            # figures carrying a PNG copy show it first and turn interactive on hover (the extension's design)
            drawn = page.evaluate("() => document.querySelectorAll('.js-plotly-plot').length")
            first = page.locator(".jp-Notebook .jp-RenderedPlotly").first
            first.scroll_into_view_if_needed()
            first.hover()
            page.wait_for_function(f"() => document.querySelectorAll('.js-plotly-plot').length > {drawn}", timeout=30_000)
            before = page.evaluate(_STRIP)
            assert before["name"].endswith(": advantage")

            explorer = page.locator(".shiq-explorer")
            explorer.scroll_into_view_if_needed()
            explorer.locator(".widget-toggle-button", has_text="V(s)").click()
            page.wait_for_function(f"() => {{ const s = ({_STRIP})(); return s && s.name.endsWith(': v'); }}",
                                   timeout=30_000)
            after = page.evaluate(_STRIP)
            assert json.dumps(after["z"]) != json.dumps(before["z"]), "the strip's values did not change"
            page.locator(".shiq-explorer .shiq-strip").scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "02_token_values_explorer.png"))
        finally:
            context.close()

