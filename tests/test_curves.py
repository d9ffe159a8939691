"""Training curves: the moving average is the hand-computed one, every run keeps its beta in the legend."""

import numpy as np
import pandas as pd
import pytest

from shiq_lab.views.curves import ema, training_curves


def test_ema_is_bias_corrected_and_skips_nan() -> None:
    out = ema([1.0, 3.0, np.nan, 5.0], alpha=0.5)
    # m1 = 0.5, w1 = 0.5 -> 1; m2 = 0.25 + 1.5 = 1.75, w2 = 0.75 -> 7/3; NaN carries it; m4 = 0.875 + 2.5, w4 = 0.875
    np.testing.assert_allclose(out, [1.0, 7 / 3, 7 / 3, 3.375 / 0.875])
    np.testing.assert_allclose(ema([2.0] * 5, alpha=0.9), 2.0)  # a constant stays itself from the first point
    with pytest.raises(ValueError, match="alpha"):
        ema([1.0], alpha=1.0)


def test_training_curves_keep_beta_and_smooth_each_run() -> None:
    rows = [{"loss_type": lt, "beta": b, "step": s, "loss": float(s % 3 + (b == 0.5))}
            for lt in ("dpo", "shiq") for b in (0.1, 0.5) for s in range(1, 11)]
    history = pd.DataFrame(rows)
    fig = training_curves(history, "loss")
    shown = [t for t in fig.data if t.showlegend is not False]
    assert sorted(t.name for t in shown) == ["dpo β=0.1", "dpo β=0.5", "shiq β=0.1", "shiq β=0.5"]
    raw = {t.name: t for t in fig.data if t.name.endswith("(raw)")}
    for t in shown:
        np.testing.assert_allclose(t.y, ema(raw[f"{t.name} (raw)"].y, 0.8))
    assert all(t.opacity == 0.3 for t in raw.values())
    assert {t.line.color for t in shown if t.name.startswith("shiq")} == {"#d62728"}
    assert fig.layout.legend.orientation == "h"
