"""BFCL multi-turn task: episodes, safe call parsing, fresh back-ends and per-turn state-checked rewards."""

import copy
import decimal
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from shiq_lab.infra import assets

if not assets.is_fetched("bfcl"):
    pytest.skip("the BFCL-V3 asset is not fetched: run `python -m shiq_lab.infra.assets fetch bfcl` (1.7 MB, once)",
                allow_module_level=True)

from shiq_lab.tasks.bfcl import (
    check_episode,
    episode_score,
    load_episodes,
    turn_rewards,
)
from shiq_lab.tasks.bfcl.asset import CATEGORIES
from shiq_lab.tasks.bfcl.backends import Backends
from shiq_lab.tasks.bfcl.calls import (
    MAX_CALL_CHARS,
    InvalidCall,
    ParsedCall,
    format_call,
    parse_call,
)


@pytest.fixture(scope="module")
def base():
    return load_episodes("base")


def test_episode_counts_and_fields() -> None:
    eps = {c: load_episodes(c) for c in CATEGORIES}
    assert {c: len(v) for c, v in eps.items()} == dict.fromkeys(CATEGORIES, 200)
    e = eps["base"][0]
    assert e.id == "multi_turn_base_0" and e.n_turns == 4 and e.involved_classes == ["TwitterAPI", "GorillaFileSystem"]
    assert e.ground_truth[0] == ["cd(folder='document')", "mkdir(dir_name='temp')",
                                 "mv(source='final_report.pdf', destination='temp')"]
    turns = [e.n_turns for e in eps["base"]]
    assert max(turns) == 7 and abs(sum(turns) / len(turns) - 3.7) < 0.05
    # miss_func: the withheld function is absent from the docs before its turn, present from it on
    mf = eps["miss_func"][0]
    assert mf.missed_functions == {3: ["sort"]} and mf.ground_truth[2] == []
    assert "sort" not in mf.available_functions(2) and "sort" in mf.available_functions(3)


def test_every_ground_truth_turn_of_all_800_entries_scores_one() -> None:
    for category in CATEGORIES:
        for e in load_episodes(category):
            result = check_episode(e, e.ground_truth)
            assert result.rewards == [1.0] * e.n_turns, (e.id, [t.reason for t in result.turns])
            assert result.score == 1.0


def test_dropping_one_call_fails_that_turn_and_later_turns_follow_the_executed_state(base) -> None:
    e = base[0]  # cd document; mkdir temp; mv report temp | cd temp; grep | sort | cd ..; mv; cd temp; diff
    def drop(k, j):
        calls = copy.deepcopy(e.ground_truth)
        del calls[k][j]
        return check_episode(e, calls)

    # without mkdir the report is renamed to 'temp': every later turn sees the wrong tree
    assert drop(0, 1).rewards == [0.0, 0.0, 0.0, 0.0]
    # without `cd temp` the model stays in document/: grep fails there and the later turns run in the wrong folder
    assert drop(1, 0).rewards == [1.0, 0.0, 0.0, 0.0]
    # a read-only call: only its own turn misses its result, the state is unchanged, later turns recover
    r = drop(1, 1)
    assert r.rewards == [1.0, 0.0, 1.0, 1.0] and r.turns[1].state_ok is True and r.turns[1].response_ok is False
    assert r.score == 0.0 and episode_score(e, e.ground_truth) == 1.0
    # no call at all in a turn that needs one
    assert drop(2, 0).turns[2].reason == "no call in a turn that needs calls"


def test_drop_any_single_call_fails_its_turn_except_redundant_touches(base) -> None:
    """Over the first 100 base entries, each single dropped call fails its turn, except 5 whose state effect
    a later echo (which creates the file) reproduces and whose result ('None') another call also returns."""
    survivors = set()
    for e in base[:100]:
        for k, turn in enumerate(e.ground_truth):
            for j in range(len(turn)):
                calls = copy.deepcopy(e.ground_truth)
                del calls[k][j]
                if check_episode(e, calls).rewards[k] != 0.0:
                    survivors.add((e.id, k, turn[j]))
    assert survivors == {("multi_turn_base_10", 3, "touch(file_name='summary.txt')"),
                         ("multi_turn_base_39", 1, "touch(file_name='styles.css')"),
                         ("multi_turn_base_39", 1, "touch(file_name='index.html')"),
                         ("multi_turn_base_39", 1, "touch(file_name='script.js')"),
                         ("multi_turn_base_44", 2, "touch(file_name='MeanRevenue.txt')")}


def test_perturbed_argument_and_no_call_turns(base) -> None:
    e = base[0]
    calls = copy.deepcopy(e.ground_truth)
    calls[2] = ["sort(file_name='previous_report.pdf')"]  # a real file, but not the asked one
    r = check_episode(e, calls)
    assert r.rewards == [1.0, 1.0, 0.0, 1.0] and r.turns[2].reason.startswith("a ground-truth result is missing")
    # a ground-truth "no call" turn passes only without calls
    mf = load_episodes("miss_func")[0]
    assert mf.ground_truth[2] == []
    calls = copy.deepcopy(mf.ground_truth)
    calls[2] = ["sort(file_name='final_report.pdf')"]
    assert check_episode(mf, calls).rewards[2] == 0.0
    assert turn_rewards(mf, mf.ground_truth)[2] == 1.0


@pytest.mark.parametrize("text", [
    "__import__('os').system('touch {p}')",
    "cd(folder=__import__('os').system('touch {p}'))",
    "open('{p}', 'w')",
    "exec(\"open('{p}', 'w')\")",
    "cd.__globals__['__builtins__']['open']('{p}', 'w')",
    "cd(folder=(lambda: open('{p}', 'w'))())",
    "cd(folder=[open('{p}', 'w') for _ in 'a'])",
    "cd(*[open('{p}', 'w')])",
    "cd(**{{'folder': open('{p}', 'w')}})",
    "cd(folder='a') or open('{p}', 'w')",
    "_load_scenario({{}})",
    "add(a=1, b=2)",  # a MathAPI method, but this episode has no MathAPI
    "cd(folder=x)",
    "power(base=10, exponent=10**10)",
])
def test_hostile_calls_are_refused_without_running_anything(base, tmp_path, text) -> None:
    marker = tmp_path / "ran"
    text = text.format(p=marker)
    e = base[0]
    calls = copy.deepcopy(e.ground_truth)
    calls[0] = [text] + calls[0]
    result = check_episode(e, calls)
    assert not marker.exists()
    assert result.rewards[0] == 0.0 and result.turns[0].invalid and result.turns[0].invalid[0].text == text
    assert result.turns[0].reason.startswith("invalid call")
    # the valid calls of the turn still ran, so the later turns see the right state
    assert result.rewards[1:] == [1.0, 1.0, 1.0]


def test_parse_call_limits_and_round_trip() -> None:
    fs = Backends(["GorillaFileSystem", "MathAPI"], {})
    assert parse_call("x" * (MAX_CALL_CHARS + 1), fs.signatures).reason.startswith("call string has")
    assert isinstance(parse_call(None, fs.signatures), InvalidCall)
    assert "exponent" in parse_call("power(10, 1001)", fs.signatures).reason  # positional arguments are bound
    assert "precision" in parse_call("square_root(number=2, precision=10**6)", fs.signatures).reason
    ok = parse_call("mkdir(dir_name='a b', )", fs.signatures)
    assert isinstance(ok, ParsedCall) and ok.kwargs == (("dir_name", "a b"),)
    again = parse_call(format_call("mean", {"numbers": [1, 2.5, -3]}), fs.signatures)
    assert isinstance(again, ParsedCall) and again.kwargs_dict() == {"numbers": [1, 2.5, -3]}
    assert fs.execute(parse_call("mean(numbers=[1, 2, 6])", fs.signatures)) == '{"result": 3.0}'
    assert fs.execute(parse_call("mkdir()", fs.signatures)).startswith("Error during execution:")


def test_no_state_is_shared_between_episodes_or_left_in_the_process(base) -> None:
    long = load_episodes("long_context")
    travel = next(e for e in long if "TravelAPI" in e.involved_classes)
    vehicle = next(e for e in long if "VehicleControlAPI" in e.involved_classes)
    math = next(e for c in CATEGORIES for e in load_episodes(c) if "MathAPI" in e.involved_classes
                and any("precision" in c for t in e.ground_truth for c in t))
    episodes = [base[0], travel, vehicle, math, base[1]]
    mods = set(sys.modules)
    prec = decimal.getcontext().prec
    first = [[(t.reward, t.results, t.ground_truth_results) for t in check_episode(e, e.ground_truth).turns]
             for e in episodes]
    again = [[(t.reward, t.results, t.ground_truth_results) for t in check_episode(e, e.ground_truth).turns]
             for e in reversed(episodes)][::-1]
    assert first == again
    # a wrong trajectory in between changes nothing for the next run of the right one
    bad = copy.deepcopy(travel.ground_truth)
    bad[0] = bad[0][::-1]
    check_episode(travel, bad)
    assert [(t.reward, t.results) for t in check_episode(travel, travel.ground_truth).turns] == \
        [(r, res) for r, res, _ in first[1]]
    assert not any(m.startswith("bfcl_eval") for m in sys.modules)
    assert set(sys.modules) - mods <= {"mpmath"} and decimal.getcontext().prec == prec


def test_length_mismatch_names_the_fix(base) -> None:
    with pytest.raises(ValueError, match="one list per turn"):
        turn_rewards(base[0], [[]])


def test_missing_asset_message_and_sha_pin(tmp_path, monkeypatch) -> None:
    from shiq_lab.tasks.bfcl import asset

    monkeypatch.setenv("SHIQ_LAB_ASSETS", str(tmp_path))
    with pytest.raises(assets.AssetMissingError, match=re.escape("python -m shiq_lab.infra.assets fetch bfcl")):
        asset.package_root("v3")

    def fake_download(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "bfcl_eval-2025.6.8-py3-none-any.whl", "w") as zf:
            zf.writestr("bfcl_eval/__init__.py", "")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_download)
    with pytest.raises(RuntimeError, match="sha256"):
        assets.fetch("bfcl", quiet=True)
    assert not assets.is_fetched("bfcl")
    assert assets.ASSETS["bfcl"].requirement == "bfcl-eval==2025.6.8" and assets.ASSETS["bfcl"].default


def test_module_level_data_of_the_back_ends_does_not_leak() -> None:
    """TravelAPI's long-context cards are module-level dicts that a booking charges in place: with the package's
    modules imported once, the second run of the same calls sees 4400 instead of 4700."""
    e = next(x for x in load_episodes("long_context") if x.id == "multi_turn_long_context_151")
    tok, card = e.initial_config["TravelAPI"]["access_token"], "1234567812345678"
    calls = [[] for _ in e.turns]
    calls[0] = [(f"book_flight(access_token={tok!r}, card_id={card!r}, travel_date='2024-10-06', travel_from='RMS', "
                 "travel_to='SBK', travel_class='economy', travel_cost=300.0)"),
                f"get_credit_card_balance(access_token={tok!r}, card_id={card!r})"]
    balances = [check_episode(e, calls).turns[0].results[1] for _ in range(2)]
    assert balances == ['{"card_balance": 4700.0}'] * 2


@pytest.mark.skipif(not assets.is_fetched("bfcl-v4"), reason="BFCL-V4 (optional) is not fetched: "
                    "`python -m shiq_lab.infra.assets fetch bfcl-v4`")
def test_v4_ground_truth_scores_one_and_its_data_differ_from_v3() -> None:
    differ = 0
    for category in CATEGORIES:
        v3 = {e.id: e for e in load_episodes(category, "v3")}
        for e in load_episodes(category, "v4"):
            assert check_episode(e, e.ground_truth).score == 1.0, e.id
            old = v3[e.id]
            differ += (old.turns, old.ground_truth, old.initial_config) != (e.turns, e.ground_truth, e.initial_config)
    assert 200 < differ < 600  # 394 of the 800 entries differ in questions, answers or initial state
