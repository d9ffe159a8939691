"""Seams of issue 9: the token view and the trainer compute one thing, through one function.

On the same training row (same ids, same rewards after z-scoring, same beta) the per-token
statistics of :func:`shiq_lab.views.token_values.token_values` are bit-identical to those the
trainer's loss reads, and its residuals are the trainer's per-token residuals.
"""

import numpy as np
import pytest
import torch
from helpers.tiny_pair import tiny_policy_and_reference

from shiq_lab.train.trainer import ShiQConfig, ShiQTrainer
from shiq_lab.views.token_values import token_values

BETA = 0.3
ROWS = [
    {"prompt": "was the movie good?", "completion": " the movie was great and the music was good.", "reward": 1.5},
    {"prompt": "was the movie good?", "completion": " it was boring.", "reward": -0.5},
    {"prompt": "a story", "completion": " dull.", "reward": 0.25},
]


@pytest.mark.parametrize("horizon", [None, 2])
def test_token_values_residuals_are_the_trainers_per_token_residuals(tmp_path, horizon):
    policy, reference, tok = tiny_policy_and_reference()
    args = ShiQConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, save_strategy="no",
                      disable_tqdm=True, per_device_train_batch_size=1, max_steps=1, beta=BETA, horizon=horizon,
                      max_length=64, reward_normalization="zscore", ref_batch_size=1,
                      ref_cache_dir=str(tmp_path / "cache"))
    tr = ShiQTrainer(model=policy, args=args, train_dataset=list(ROWS), processing_class=tok, ref_model=reference)
    policy.eval()
    for i, row in enumerate(ROWS):
        data = tr.train_dataset[i]
        batch = tr._prepare_inputs(tr.data_collator([data]))
        with torch.no_grad():
            out, _, _ = tr._loss_terms(tr.model, batch)
        mask = batch["action_mask"][0, 1:].bool()
        trainer_residuals = out.residuals[0][mask].double().numpy()
        normalised = float(np.sum(data["token_rewards"]))  # the z-scored return, on the last response token

        df = token_values(policy, tok, row["prompt"], [row["completion"]], reference=reference, beta=BETA,
                          rewards=[normalised], add_eos=True, horizon=horizon, batch_size=1)
        ids = np.asarray(data["input_ids"])
        assert df.token_id.tolist() == ids[1:][mask.numpy()].tolist(), "same tokens (the training encoding)"
        # the statistics the loss reads are the very same fp32 numbers
        for col, key in (("ref_logp", "ref_logp"), ("ref_logz", "ref_logz")):
            np.testing.assert_array_equal(df[col].to_numpy(np.float32), np.asarray(data[key], np.float32)[1:][mask.numpy()])
        from shiq_lab.lm.stats import token_stats

        with torch.no_grad():
            lp, lz = token_stats(policy, batch["input_ids"], batch["attention_mask"], batch["action_mask"],
                                 positions=batch["action_positions"])
        np.testing.assert_array_equal(df.logp.to_numpy(np.float32), lp[0, 1:][mask].numpy())
        np.testing.assert_array_equal(df.logz.to_numpy(np.float32), lz[0, 1:][mask].numpy())
        np.testing.assert_array_equal(df.reward.to_numpy(), np.asarray(data["token_rewards"])[1:][mask.numpy()])
        # the residuals: the view in fp64 from those numbers, the trainer in fp32
        np.testing.assert_allclose(df.residual.to_numpy(), trainer_residuals, rtol=1e-6, atol=1e-6)
        assert np.abs(trainer_residuals).max() > 0.05  # a perturbed policy and a reward: not a trivial zero
