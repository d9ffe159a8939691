"""Every shell command of the README names things that exist, in an order that works in a fresh shell.

A static check (fast): the ```bash blocks are split into commands, and each one must name an existing make
target, ``shiq-lab`` sub-command and flags, module (and its sub-command), config file, notebook and
notebook parameter. The README activates the venv once before the first bare ``python`` / ``shiq-lab``
command, and never evaluates a run folder before a command that creates it.
"""

import ast
import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
ACTIVATE = "source .venv/bin/activate"
VENV_TOOLS = ("python", "shiq-lab", "papermill", "accelerate", "tensorboard", "jupyter", "pytest")


def readme_commands(text: str | None = None) -> list[str]:
    """The commands of the README's ```bash blocks, in order: continuation lines joined, comments dropped."""
    text = README.read_text(encoding="utf-8") if text is None else text
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
        block = re.sub(r"\\\n\s*", " ", block)
        for line in block.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            for part in re.split(r"\s*(?:&&|;)\s*", line):
                if part:
                    commands.append(part)
    return commands


def _make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.MULTILINE))


def _notebook_parameters(path: Path) -> set[str]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    tree = ast.parse("".join(cell["source"]))
    return {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}


def _flags(words: list[str]) -> list[str]:
    return [w[2:].split("=")[0] for w in words if w.startswith("--")]


def _check_config_flags(words: list[str], problems: list[str], cmd: str) -> None:
    for i, word in enumerate(words):
        if word == "--config" and i + 1 < len(words) and words[i + 1] != "...":
            if not (ROOT / words[i + 1]).exists():
                problems.append(f"{cmd!r}: config file {words[i + 1]} does not exist")


def _check(cmd: str, problems: list[str]) -> None:
    from shiq_lab import cli
    from shiq_lab.infra.config import _field_names
    from shiq_lab.train.config import ShiQConfig

    words = shlex.split(cmd)
    words = [w for w in words if not (w.startswith("[") or w.endswith("]"))]  # optional parts: [--quick]
    if words and words[0].startswith(".venv/bin/"):
        words[0] = words[0][len(".venv/bin/"):]
    tool = words[0]
    _check_config_flags(words, problems, cmd)
    if tool == "make":
        missing = [t for t in words[1:] if "=" not in t and t not in _make_targets()]
        if missing:
            problems.append(f"{cmd!r}: no make target {missing}")
    elif cmd == ACTIVATE:
        pass
    elif tool == "shiq-lab":
        sub = words[1]
        if sub not in cli._commands():
            problems.append(f"{cmd!r}: shiq-lab has no sub-command {sub!r}")
        elif sub in ("train", "precompute-ref"):
            fields = set(_field_names((cli.RunArguments, ShiQConfig)))
            unknown = sorted(set(_flags(words[2:])) - fields - {"config", "output", "any_field"})
            if unknown:
                problems.append(f"{cmd!r}: unknown flag(s) {unknown}")
        elif sub == "models" and len(words) > 2 and words[2] == "fetch":
            from shiq_lab.infra.models import MODEL_BUILDERS, registered_models

            registered_models()

            unknown = [n for n in words[3:] if n not in MODEL_BUILDERS and n not in ("|", "tiny", "imdb-small")]
            if unknown:
                problems.append(f"{cmd!r}: unregistered model(s) {unknown}")
    elif tool in ("python", "accelerate"):
        if "-m" not in words:
            problems.append(f"{cmd!r}: python without -m MODULE")
            return
        module = words[words.index("-m") + 1]
        if importlib.util.find_spec(module) is None:
            problems.append(f"{cmd!r}: no module {module}")
        if module == "shiq_lab.tasks.imdb.sweep":
            from shiq_lab.tasks.imdb.sweep import ImdbTaskConfig

            fields = set(_field_names((ImdbTaskConfig, ShiQConfig))) | {"config", "results"}
            unknown = sorted(set(_flags(words)) - fields)
            if unknown:
                problems.append(f"{cmd!r}: ImdbTaskConfig has no field(s) {unknown}")
        if module == "shiq_lab.tasks.synthetic":
            sub = words[words.index("-m") + 2]
            if sub not in ("synthetic", "synthetic-data"):
                problems.append(f"{cmd!r}: python -m shiq_lab.tasks.synthetic has no sub-command {sub!r}")
    elif tool == "papermill":
        notebook, params = ROOT / words[1], [words[i + 1] for i, w in enumerate(words) if w == "-p"]
        if not notebook.exists():
            problems.append(f"{cmd!r}: no notebook {words[1]}")
        else:
            unknown = sorted(set(params) - _notebook_parameters(notebook))
            if unknown:
                problems.append(f"{cmd!r}: {notebook.name} has no parameter(s) {unknown}")
    elif tool in ("tensorboard", "jupyter", "git", "pytest"):
        pass
    else:
        problems.append(f"{cmd!r}: unknown tool {tool!r} (add it to tests/test_readme_commands.py if it is meant)")


def test_every_readme_command_names_existing_things():
    commands = readme_commands()
    assert len(commands) > 20 and ACTIVATE in commands
    problems: list[str] = []
    for cmd in commands:
        _check(cmd, problems)
    assert not problems, "\n".join(problems)


def test_the_venv_is_activated_before_the_first_bare_venv_command():
    commands = readme_commands()
    first_bare = next(i for i, c in enumerate(commands) if c.split()[0] in VENV_TOOLS)
    assert ACTIVATE in commands[:first_bare], f"{commands[first_bare]!r} runs before `{ACTIVATE}`"


def test_no_command_evaluates_a_run_folder_before_one_creates_it():
    import yaml

    commands = readme_commands()
    created: list[str] = []
    for cmd in commands:
        words = shlex.split(cmd)
        if "--run_dir" in words:
            run_dir = words[words.index("--run_dir") + 1].rstrip("/")
            assert any(c == run_dir or c.startswith(run_dir + "/") for c in created), \
                f"{cmd!r} evaluates {run_dir} before any README command writes it"
        if "--output_dir" in words:
            created.append(words[words.index("--output_dir") + 1].rstrip("/"))
        elif "--config" in words and (ROOT / words[words.index("--config") + 1]).is_file():
            out = yaml.safe_load((ROOT / words[words.index("--config") + 1]).read_text()).get("output_dir")
            if out:
                created.append(str(out).rstrip("/"))


@pytest.mark.parametrize("bad, message", [
    ("make nonsense", "no make target"),
    ("shiq-lab trian --config configs/train/tiny_cpu.yaml", "no sub-command"),
    ("shiq-lab train --config configs/missing.yaml", "does not exist"),
    ("shiq-lab train --config configs/train/tiny_cpu.yaml --betta 0.1", "unknown flag"),
    ("python -m shiq_lab.nothing", "no module"),
    ("papermill notebooks/04_finetune.ipynb out.ipynb -p stepz 3", "no parameter"),
    ("curl http://example.com", "unknown tool"),
])
def test_the_checks_catch_a_wrong_command(bad, message):
    problems: list[str] = []
    _check(bad, problems)
    assert len(problems) == 1 and message in problems[0], problems


def test_every_output_folder_of_a_readme_command_is_ignored_by_git():
    import shutil
    import subprocess

    import yaml

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout")
    outputs = set()
    for cmd in readme_commands():
        words = shlex.split(cmd)
        for flag in ("--output_dir", "--out", "--output"):
            if flag in words:
                outputs.add(words[words.index(flag) + 1])
        if "--config" in words and (ROOT / words[words.index("--config") + 1]).is_file():
            out = yaml.safe_load((ROOT / words[words.index("--config") + 1]).read_text()).get("output_dir")
            if out:
                outputs.add(str(out))
        if words[0] == "papermill":
            outputs.add(words[2])
    assert len(outputs) >= 5
    tracked = [o for o in sorted(outputs)
               if subprocess.run(["git", "check-ignore", "-q", o], cwd=ROOT).returncode != 0]
    assert not tracked, f"README commands write into tracked folders: {tracked}"
