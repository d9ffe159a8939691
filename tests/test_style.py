"""One style everywhere: ShiQ's colour and drawing order, beta labels, log ticks, legends below the plot."""

import json
from pathlib import Path

import pandas as pd
import pytest

from shiq_lab.tasks.synthetic.plots import (
    efficiency_figure,
    frontier_figure,
    headline_figure,
    headline_frame,
    learning_curves_figure,
)
from shiq_lab.views.curves import training_curves
from shiq_lab.views.style import (
    SHIQ,
    by_drawing_order,
    format_beta,
    log_ticks,
    method_style,
    responsive,
)

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "synthetic.json"


@pytest.fixture(scope="module")
def results():
    return json.loads(RESULTS.read_text())


def test_beta_labels_and_drawing_order() -> None:
    assert [format_beta(b) for b in (0.1, 0.05, 1.0, 2, 1e-3, 2e-5, float("nan"))] == \
        ["0.1", "0.05", "1", "2", "0.001", "2e-05", "n/a"]
    assert by_drawing_order(["shiq", "dpo", "copg", "naive"])[-1] == "shiq"  # drawn last: on top
    assert by_drawing_order(["dpo", "copg"]) == ["dpo", "copg"]  # ties keep their order
    assert method_style("shiq").colour == SHIQ and method_style("dpo").colour != SHIQ
    assert method_style("something new").colour == method_style("something new").colour != SHIQ


def test_log_ticks_read_as_numbers() -> None:
    axis = log_ticks(32, 2048)  # under three decades: 1-2-5 ticks, written plainly
    assert axis["tickvals"] == [50, 100, 200, 500, 1000, 2000] and axis["ticktext"][0] == "50"
    wide = log_ticks(1e-9, 0.1)  # more: one tick per decade, as powers of ten
    assert wide["dtick"] == 1 and wide["exponentformat"] == "power"
    with pytest.raises(ValueError, match="positive"):
        log_ticks(0, 1)


def test_every_benchmark_figure_draws_shiq_in_its_colour_on_top(results) -> None:
    figures = [learning_curves_figure(results, "tabular", "token", "uniform"),
               efficiency_figure(results, "tabular", "token", "mix"), frontier_figure(results)]
    for fig in figures:
        shiq = [t for t in fig.data if t.name == method_style("shiq").label]
        assert len(shiq) == 1 and (shiq[0].marker.color or shiq[0].line.color) == SHIQ
        assert shiq[0].zorder == max(t.zorder or 0 for t in fig.data if t.name != method_style("reference").label)
        assert fig.layout.legend.orientation == "h" and fig.layout.legend.yref == "container"
        assert fig.layout.autosize and fig.layout.width is None
    frontier = figures[2]
    shiq = next(t for t in frontier.data if t.name == method_style("shiq").label)
    betas = [p["beta"] for p in results["frontier"]["points"] if p["method"] == "shiq"]
    assert list(shiq.text) == [f"β={format_beta(b)}" for b in betas] and "text" in shiq.mode  # points carry beta
    assert frontier.layout.xaxis.type == "log"


def test_headline_is_a_figure_and_shows_spread_only_with_seeds(results) -> None:
    frame = headline_frame(results)
    n = len(results["meta"]["config"]["seeds"])
    assert (n > 1) == any(c.endswith("± std") for c in frame.columns)
    fig = headline_figure(results)
    z = fig.data[0].z
    assert len(z) == len(results["meta"]["config"]["methods"]) and fig.data[0].y[0] == method_style("shiq").label
    cell = fig.data[0].text[0][0]
    assert cell.startswith(f"{frame.iloc[0, 0]:.2f}") and (("±" in cell) == (n > 1))
    single = json.loads(json.dumps(results))
    single["meta"]["config"]["seeds"] = [0]
    assert not any(c.endswith("± std") for c in headline_frame(single).columns)
    assert "±" not in headline_figure(single).data[0].text[0][0]  # one seed: no "± 0.00"


def test_responsive_keeps_the_legend_below_and_the_figure_fluid() -> None:
    import plotly.graph_objects as go

    fig = responsive(go.Figure(go.Scatter(y=[1, 2], name="a")).update_layout(width=1000), height=300)
    assert fig.layout.width is None and fig.layout.height == 300 and fig.layout.legend.y == 0
    fig = training_curves(pd.DataFrame({"loss_type": ["shiq"] * 3, "beta": [0.1] * 3, "step": [1, 2, 3], "loss": [3, 2, 1]}))
    assert [t.name for t in fig.data if t.showlegend is not False] == ["shiq β=0.1"]
