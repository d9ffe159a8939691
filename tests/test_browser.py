"""The notebooks in a real JupyterLab, driven in Debian's headless chromium by playwright.

Starts JupyterLab on a free loopback port with a token (temporary runtime/config folders, copies of
the notebooks so autosave never touches the repository) and checks, in the browser:

- notebook 02 runs with its default (tiny) parameters, every plotly figure renders, and the
  explorer's quantity toggle changes the figure's data to the new quantity;
- every plotly figure is complete at window widths of 1400 px and 1000 px: no static image wider
  than its output area, and the figure, its title, its legend (every entry) and its colour bars
  inside the visible output area. A gallery notebook of the library's figures (the benchmark's, the frontier,
  the training curves, the token views) gets the same check, and two deliberately broken figures in
  it (a fixed-width figure with its legend on the right, a fixed 1000 px PNG shown first) must be
  flagged: the check can fail;
- (slow) notebooks 01, 03 and 04 the same way.

Screenshots of each notebook at both widths go to ``artifacts/browser/``. Uses the system chromium
(``make browser-deps``), never a browser download.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "02_token_values.ipynb"
WIDTHS = (1400, 1000)
GALLERY = "00_figure_gallery.ipynb"
# broken figures of the gallery the completeness check must flag at both widths (with the file browser open,
# a notebook's output area is under 1000 px wide even in a 1400 px window)
CANARIES = ("CANARY fixed width", "CANARY fixed png")
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


def _gallery(path: Path) -> None:
    """A notebook of the library's figures on small or committed data, plus two broken canaries."""
    import nbformat

    results = ROOT / "benchmarks" / "results" / "synthetic.json"
    cells = [
        # no static copies: what is measured is the interactive figure (and it saves the kaleido time)
        "import plotly.io as pio\nfrom shiq_lab.views.figures import configure_plotly\nconfigure_plotly(static=False)\n"
        + "pio.renderers.default = 'plotly_mimetype'",
        f"import json\nwith open({str(results)!r}) as fh:\n    results = json.load(fh)",
        textwrap.dedent("""\
            from shiq_lab.tasks.synthetic.plots import efficiency_figure, frontier_figure, headline_figure, learning_curves_figure
            headline_figure(results).show()
            learning_curves_figure(results, 'tabular', 'token', 'uniform').show()
            efficiency_figure(results, 'tabular', 'token', 'mix').show()
            frontier_figure(results).show()"""),
        textwrap.dedent("""\
            import pandas as pd
            from shiq_lab.evaluation import FRONTIER_COLUMNS, plot_frontier
            common = dict(reward_sem=0.01, kl_sem=0.02, kl_states_sem=0.02, length_mean=10, finished_fraction=0.1, n=64,
                          path='', label='')
            rows = [dict(loss_type='reference', beta=float('nan'), step=0, reward_mean=0.5, kl_mean=0.0,
                         kl_states_mean=0.0, **common)]
            rows += [dict(loss_type=lt, beta=b, step=s, reward_mean=0.5 + s / 400 + b / 10, kl_mean=s / 200 / b,
                          kl_states_mean=s / 200 / b, **common)
                     for lt in ('shiq', 'dpo', 'dro', 'copg') for b in (0.1, 0.5) for s in (20, 40)]
            plot_frontier(pd.DataFrame(rows)[FRONTIER_COLUMNS], title='plot_frontier').show()"""),
        textwrap.dedent("""\
            from shiq_lab.views.curves import training_curves
            history = pd.DataFrame([dict(loss_type=lt, beta=b, step=s, loss=1 / s + b, kl=s * b / 100)
                                    for lt in ('shiq', 'dpo', 'dro', 'copg') for b in (0.1, 0.5) for s in range(1, 41)])
            training_curves(history, 'loss').show()
            training_curves(history, 'kl', facet=False).show()"""),
        textwrap.dedent("""\
            import plotly.graph_objects as go
            canary = go.Figure([go.Scatter(y=[1, 2, k], name=f'a long legend entry number {k}') for k in range(6)])
            canary.update_layout(title='CANARY fixed width', width=1500, legend={'orientation': 'v', 'x': 1.02, 'y': 1})
            canary.show()"""),
        textwrap.dedent("""\
            import warnings
            import plotly.io as pio
            from plotly.io._base_renderers import PngRenderer
            pio.renderers['fixed_png'] = PngRenderer(width=1000, scale=1)  # what the figures carried before
            canary.update_layout(title='CANARY fixed png', width=None)
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                canary.show(renderer='plotly_mimetype+fixed_png')"""),
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab serving copies of the notebooks and the figure gallery; yields (url, token)."""
    tmp_path = tmp_path_factory.mktemp("lab")
    jupyter = Path(sys.executable).parent / "jupyter"
    if not jupyter.exists():
        pytest.skip(f"{jupyter} not found: install the notebooks extra (make setup)")
    root = tmp_path / "root"
    root.mkdir()
    for nb in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"):
        shutil.copy(nb, root / nb.name)
    _gallery(root / GALLERY)
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
        except Exception:  # noqa: BLE001 -- a server that is already gone is killed below
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


# Every plotly output: the visible output area, and what must lie inside it (a shown static image, the
# figure's svg, each legend entry, each colour bar). Legend entries must also lie inside the figure.
_FIGURES = """() => {
  const box = e => { const b = e.getBoundingClientRect(); return {l: b.left, t: b.top, r: b.right, b: b.bottom}; };
  const cells = [...document.querySelectorAll('.jp-Notebook .jp-Cell')];
  const found = [];
  document.querySelectorAll('.jp-Notebook .jp-RenderedPlotly').forEach(p => {
    const area = p.closest('.jp-OutputArea-output');
    if (!area || area.offsetParent === null) return;  // hidden (a collapsed widget part)
    const img = p.querySelector('img.plot-img');
    const imgShown = img && img.getAttribute('src') && getComputedStyle(img).display !== 'none';
    const svg = p.querySelector('.main-svg');
    const title = ((p.querySelector('.gtitle') || {}).textContent || '').trim();
    const items = [];
    if (imgShown) items.push({kind: 'static image', ...box(img)});
    else if (svg) {
      items.push({kind: 'figure', ...box(svg)});
      p.querySelectorAll('.legend .traces').forEach(t => items.push({kind: 'legend entry ' + t.textContent.trim(), ...box(t)}));
      p.querySelectorAll('.colorbar').forEach(c => items.push({kind: 'colour bar', ...box(c)}));
      p.querySelectorAll('.gtitle').forEach(t => items.push({kind: 'title ' + t.textContent.trim(), ...box(t)}));
    }
    const cell = p.closest('.jp-Cell');
    const source = ((cell && cell.querySelector('.jp-InputArea-editor')) || {}).textContent || '';
    const canary = (source.match(/CANARY [a-z ]+/) || [''])[0];
    found.push({cell: cells.indexOf(cell), title: canary || title,
                area: box(area), figure: svg ? box(svg) : null, items});
  });
  return found;
}"""


def _cut(figures: list[dict], tol: float = 1.0) -> list[str]:
    """What lies outside its output area (or, for legend entries, outside the figure): one line each."""
    problems = []
    for f in figures:
        area, fig = f["area"], f["figure"]
        for it in f["items"]:
            where = f"cell {f['cell']} '{f['title'][:50]}': {it['kind'][:60]}"
            if it["l"] < area["l"] - tol or it["r"] > area["r"] + tol:
                problems.append(f"{where} spans x {it['l']:.0f}-{it['r']:.0f}, output area {area['l']:.0f}-{area['r']:.0f}")
            elif it["kind"].startswith("legend entry") and fig and (it["t"] < fig["t"] - tol or it["b"] > fig["b"] + tol
                                                                     or it["r"] > fig["r"] + tol):
                problems.append(f"{where} lies outside its figure")
    return problems


def _open(page, url: str, token: str, name: str, width: int) -> None:
    page.set_viewport_size({"width": width, "height": 1000})
    page.goto(f"{url}/lab/tree/{name}?reset&token={token}", timeout=90_000)
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget "
                           "&& window.jupyterapp.shell.currentWidget.sessionContext", timeout=90_000)
    page.wait_for_function(f"() => {{ const s = ({_NOTEBOOK_STATE})(); return s && s.kernel === 'idle'; }}",
                           timeout=120_000)


def _run_all(page, name: str, timeout_s: int = 300) -> dict:
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    # done when every code cell has run (or one failed) and the kernel is idle again
    page.wait_for_function(
        f"""() => {{ const s = ({_NOTEBOOK_STATE})();
            return s && s.kernel === 'idle' && (s.cells.every(c => c.count !== null)
                   || s.cells.some(c => c.errors.length)); }}""", timeout=timeout_s * 1000, polling=1000)
    state = page.evaluate(_NOTEBOOK_STATE)
    errors = [e for c in state["cells"] for e in c["errors"]]
    assert not errors, f"{name} failed in JupyterLab: {errors}"
    return state


def _figures_at(page, width: int, n_expected: int) -> list[dict]:
    """Resize the window to ``width`` and measure every figure once plotly has drawn (and re-laid out) all."""
    page.set_viewport_size({"width": width, "height": 1000})
    page.wait_for_function(f"() => document.querySelectorAll('.jp-Notebook .jp-RenderedPlotly').length >= {n_expected}",
                           timeout=60_000)
    page.wait_for_timeout(1500)  # JupyterLab's resize -> plotly's relayout
    return page.evaluate(_FIGURES)


def _screenshot(page, stem: str, width: int) -> None:
    """The whole notebook: a window tall enough for all of it (JupyterLab scrolls inside the page)."""
    height = page.evaluate("() => { const n = document.querySelector('.jp-NotebookPanel .jp-WindowedPanel-outer') "
                           "|| document.querySelector('.jp-NotebookPanel-notebook'); return n ? n.scrollHeight + 200 : 1000; }")
    page.set_viewport_size({"width": width, "height": min(int(height), 30_000)})
    page.evaluate("() => document.querySelectorAll('.jp-NotebookPanel .jp-WindowedPanel-outer').forEach(e => e.scrollTop = 0)")
    page.wait_for_timeout(1500)
    page.screenshot(path=str(ARTIFACTS / f"{stem}_{width}px.png"))
    page.set_viewport_size({"width": width, "height": 1000})


def _check_notebook_complete(page, stem: str, n_figures: int, *, canaries: tuple[str, ...] = ()) -> None:
    for width in WIDTHS:
        figures = _figures_at(page, width, n_figures)
        problems = _cut(figures)
        expected = set(canaries)
        flagged = {c for c in CANARIES if any(f"'{c}" in p for p in problems)}
        assert flagged == expected, f"at {width} px the check flagged {flagged or 'nothing'} among the broken figures, " \
                                    f"expected {expected or 'nothing'}"
        problems = [p for p in problems if not any(f"'{c}" in p for c in CANARIES)]
        assert not problems, f"{stem} at {width} px: cut figures:\n" + "\n".join(problems)
        _screenshot(page, stem, width)


def _browser(tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no chromium installed: `make browser-deps` installs Debian's chromium with apt (needs root); "
                    "this test never downloads a browser")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright (dev extra) is not installed")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return chromium, playwright


def test_notebook_02_runs_in_jupyterlab_and_the_explorer_reacts(lab, tmp_path) -> None:
    chromium, playwright = _browser(tmp_path)
    url, token = lab
    with playwright.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=chromium, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": WIDTHS[0], "height": 1000})  # a new, empty profile every run
        try:
            page = context.pages[0] if context.pages else context.new_page()
            _open(page, url, token, NOTEBOOK.name, WIDTHS[0])
            state = _run_all(page, NOTEBOOK.name)
            page.wait_for_selector(".shiq-explorer .shiq-strip .js-plotly-plot", timeout=60_000)
            page.wait_for_selector(".shiq-explorer .widget-toggle-button", timeout=60_000)
            n_figures = sum(c["plotly"] for c in state["cells"])
            # every figure is drawn interactively by JupyterLab's plotly extension at once (no static image first)
            page.wait_for_function(f"() => document.querySelectorAll('.jp-Notebook .js-plotly-plot').length >= {n_figures + 1}",
                                   timeout=60_000)
            rendered = page.evaluate("() => document.querySelectorAll('.jp-RenderedPlotly').length")
            assert n_figures >= 5 and rendered >= n_figures + 1, f"{n_figures} figures in outputs, {rendered} rendered"
            assert page.locator(".jp-Notebook .shiq-static-strip").count() == 1  # the explorer's static snapshot
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
            _check_notebook_complete(page, NOTEBOOK.stem, n_figures)
        finally:
            context.close()


@contextlib.contextmanager
def _notebook_page(lab, tmp_path, notebook: str):
    """A chromium page with ``notebook`` open in the lab at the first width (closed afterwards)."""
    chromium, playwright = _browser(tmp_path)
    url, token = lab
    with playwright.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=chromium, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": WIDTHS[0], "height": 1000})
        try:
            page = context.pages[0] if context.pages else context.new_page()
            _open(page, url, token, notebook, WIDTHS[0])
            yield page
        finally:
            context.close()


def test_library_figures_are_complete_at_every_width_and_cut_ones_are_caught(lab, tmp_path) -> None:
    with _notebook_page(lab, tmp_path, GALLERY) as page:
        state = _run_all(page, GALLERY, timeout_s=120)
        n_figures = sum(c["plotly"] for c in state["cells"])
        assert n_figures == 9, n_figures
        _check_notebook_complete(page, Path(GALLERY).stem, n_figures, canaries=CANARIES)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["01_bellman_derivation", "03_synthetic_benchmark", "04_finetune"])
def test_every_notebook_is_complete_in_jupyterlab(lab, tmp_path, name) -> None:
    with _notebook_page(lab, tmp_path, f"{name}.ipynb") as page:
        state = _run_all(page, name, timeout_s=900)
        n_figures = sum(c["plotly"] for c in state["cells"])
        assert n_figures >= 3
        _check_notebook_complete(page, name, n_figures)
