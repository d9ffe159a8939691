"""The one config system: YAML values go through the same parser as flags; errors name the file, line and field."""

from dataclasses import dataclass, field

import pytest

from shiq_lab.infra.config import ConfigError, parse_config, read_yaml, yaml_to_flags


@dataclass
class Task:
    betas: list[float] = field(default_factory=lambda: [0.1])
    n_prompts: int = 8
    name: str = "x"


@dataclass
class Train:
    max_steps: int = 10
    lr: float = 1e-3
    bf16: bool = False
    extra: str | None = None


def test_yaml_becomes_flags_and_flags_win(tmp_path):
    assert yaml_to_flags({"betas": [0.1, 0.5], "bf16": True, "extra": {"a": 1}, "skip": None}) == [
        "--betas", "0.1", "0.5", "--bf16", "true", "--extra", '{"a": 1}']
    cfg = tmp_path / "c.yaml"
    cfg.write_text("betas: [0.2, 0.4]\nmax_steps: 30\nbf16: true\n")
    task, train = parse_config((Task, Train), ["--config", str(cfg), "--max_steps", "5"], defaults={"lr": 0.5})
    assert task == Task(betas=[0.2, 0.4]) and train == Train(max_steps=5, lr=0.5, bf16=True)
    # the file sits above the task's defaults, flags above the file
    cfg.write_text("lr: 0.25\n")
    assert parse_config((Task, Train), ["--config", str(cfg)], defaults={"lr": 0.5})[1].lr == 0.25


def test_a_yaml_value_is_type_checked_like_a_flag(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_steps: 2.5\n")
    with pytest.raises(ConfigError, match=r"c.yaml: argument --max_steps/--max-steps: invalid int value: '2.5'"):
        parse_config((Task, Train), ["--config", str(cfg)])
    with pytest.raises(ConfigError, match=r"argument --max_steps/--max-steps: invalid int value: '2.5'"):
        parse_config((Task, Train), ["--max_steps", "2.5"])


def test_entry_points_print_one_line_and_exit_2(capsys):
    from shiq_lab.tasks.synthetic.__main__ import main as synthetic_main

    assert synthetic_main(["synthetic", "--stepz", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--stepz" in err and "Traceback" not in err


def test_yaml_errors_name_the_file_and_line(tmp_path):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("max_steps: 3\nbetas: [0.1, 0.2\nname: y\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:3:\d+: YAML syntax error"):
        read_yaml(cfg)
    cfg.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: must be a YAML mapping of field: value, not a list"):
        read_yaml(cfg)
    with pytest.raises(ConfigError, match=r"nowhere\.yaml does not exist"):
        read_yaml(tmp_path / "nowhere.yaml")
    cfg.write_text("n_promts: 3\n")
    with pytest.raises(ConfigError, match=r"unknown field\(s\) 'n_promts' \(did you mean 'n_prompts'\?\)"):
        parse_config((Task, Train), ["--config", str(cfg)])
