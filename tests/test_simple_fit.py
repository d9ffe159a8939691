"""The in-memory fits: SFT makes a reference that puts mass on the responses; ShiQ then moves the values
where the exact soft-optimal solution says they should be."""

import copy

import numpy as np
import pytest
import torch

from shiq_lab.data.rewards import word_reward
from shiq_lab.infra.models import load_model
from shiq_lab.train.simple_fit import fit_sft, fit_shiq
from shiq_lab.views.token_values import token_values

PROMPT = [{"role": "user", "content": "was the movie good?"}]
RESPONSES = [f"the {s} was {a}." for s in ("movie", "film", "music") for a in ("great", "bad", "boring", "fun")]
BETA = 0.5


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    model, tok = load_model("tiny")
    sft = fit_sft(model, tok, PROMPT, RESPONSES, steps=40, lr=3e-3)
    reference = copy.deepcopy(model)
    reward = word_reward(tok, "great")
    shiq = fit_shiq(model, tok, PROMPT, RESPONSES, rewards=reward, beta=BETA, steps=60, lr=3e-3)
    df = token_values(model, tok, PROMPT, RESPONSES, reference=reference, beta=BETA, rewards=reward)
    return sft, shiq, df


def test_fits_lower_their_losses(fitted) -> None:
    sft, shiq, _ = fitted
    assert len(sft.loss) == 41 and sft.loss[-1] < 0.3 * sft.loss[0]
    # At the start (model = reference) delta_t = -(rewards still ahead): -1 on the 4 tokens up to 'great'
    # in the 3 rewarded responses, 0 elsewhere; 12 responses x 6 policy tokens -> loss = 3*4 / 72.
    assert shiq.loss[0] == pytest.approx(12 / 72, abs=1e-6)
    assert shiq.loss[-1] < 0.05 * shiq.loss[0]


def test_shiq_values_approach_the_soft_optimum(fitted) -> None:
    _, _, df = fitted
    rewarded = df[df.reward > 0]
    adjectives = df[(df.step == 3)]
    # exact soft-optimal value of the state before the adjective: beta*ln E_ref[exp(r/beta)]
    p_great = rewarded.ref_prob.to_numpy()
    v_star = BETA * np.log(1 + p_great * (np.exp(1 / BETA) - 1))
    np.testing.assert_allclose(rewarded.v, v_star, atol=0.08)
    assert (rewarded.advantage > 0.3).all()  # the rewarded token gains advantage ...
    assert (adjectives[adjectives.reward == 0].advantage < -0.2).all()  # ... the other adjectives lose it
    prefix = df[df.step <= 3]
    after = df[df.step > 3]
    # values rise on the prefixes that lead to the reward; after it, offline data pins only Q of the
    # tokens it holds, so V there is small but not exactly 0
    assert prefix.v.min() > 0.25 and prefix.v.mean() > after.v.mean() + 0.3


def test_bad_steps_are_refused() -> None:
    model, tok = load_model("tiny")
    with pytest.raises(ValueError, match="steps"):
        fit_sft(model, tok, PROMPT, RESPONSES[:1], steps=0)
