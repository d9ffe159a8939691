"""``make lab``: JupyterLab on the notebooks, as root too, without pop-ups, and without dirtying the tree.

    python -m shiq_lab.infra.lab [--port 8888] [any jupyter lab flag ...]

- ``--allow-root`` when run as root (the default user in containers);
- no news or update toast: ``news_url=None``, no update check, and the notification settings in
  ``configs/jupyterlab/overrides.json`` (the app settings folder, so the user's own settings stay);
- :class:`StrippingContentsManager`: a notebook saved in ``notebooks/`` is written there without
  outputs (:mod:`shiq_lab.infra.strip_notebook`) and in full to ``runs/lab/`` (ignored; ``$SHIQ_LAB_RUNS/lab``);
  opening it again shows the full copy while its cells still match. Running the notebooks never changes a
  tracked file, and the outputs survive a reload.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager

from shiq_lab.infra.strip_notebook import strip

__all__ = ["ROOT", "StrippingContentsManager", "lab_command", "main"]

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = ROOT / "configs" / "jupyterlab"


def _shadow(path: str) -> Path | None:
    """Where the full copy of a notebook lives (``runs/lab/<path>``, ignored by git), None for other files."""
    rel = Path(path.strip("/"))
    if rel.suffix != ".ipynb" or ".ipynb_checkpoints" in rel.parts:
        return None
    return Path(os.environ.get("SHIQ_LAB_RUNS", ROOT / "runs")) / "lab" / rel


class StrippingContentsManager(AsyncLargeFileManager):
    """Saves notebooks without outputs and keeps their outputs in ``runs/lab/`` (``make lab`` serves notebooks/)."""

    async def save(self, model: dict[str, Any], path: str = "") -> dict[str, Any]:
        shadow = _shadow(path)
        if shadow is None or model.get("type") != "notebook" or model.get("content") is None:
            return await super().save(model, path)
        shadow.parent.mkdir(parents=True, exist_ok=True)
        shadow.write_text(json.dumps(model["content"], indent=1, sort_keys=True, ensure_ascii=False) + "\n",
                          encoding="utf-8")
        return await super().save({**model, "content": strip(model["content"])}, path)

    async def get(self, path: str, content: bool = True, type: str | None = None, format: str | None = None,
                  require_hash: bool = False) -> dict[str, Any]:
        model = await super().get(path, content=content, type=type, format=format, require_hash=require_hash)
        shadow = _shadow(path)
        if not content or shadow is None or model.get("type") != "notebook" or not shadow.exists():
            return model
        try:
            full = json.loads(shadow.read_text(encoding="utf-8"))
        except ValueError:
            return model
        import nbformat

        def cells(nb: Any) -> str:  # multi-line sources as one string, as nbformat reads them
            return json.dumps(strip(nbformat.reads(json.dumps(nb), as_version=4)), sort_keys=True)

        # the full copy is shown only while it is this notebook with outputs (not an older version of it)
        if cells(full) == cells(model["content"]):
            model["content"] = nbformat.reads(json.dumps(full), as_version=4)
        return model


def lab_command(extra: list[str] | None = None, *, root: Path = ROOT) -> list[str]:
    """The ``jupyter lab`` command line of ``make lab``."""
    cmd = [str(Path(sys.executable).with_name("jupyter")), "lab", f"--ServerApp.root_dir={root / 'notebooks'}",
           "--ServerApp.contents_manager_class=shiq_lab.infra.lab.StrippingContentsManager",
           "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           f"--LabApp.app_settings_dir={SETTINGS}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # containers run as root; JupyterLab refuses it otherwise
    return cmd + list(extra or [])


def main(argv: list[str] | None = None) -> int:
    """Replace this process with JupyterLab (flags after the module name go to ``jupyter lab``)."""
    cmd = lab_command(list(sys.argv[1:] if argv is None else argv))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    os.execve(cmd[0], cmd, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
