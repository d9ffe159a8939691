"""Many independent training runs as one "forest": K token trees side by side.

A benchmark cell is a grid of independent runs (seeds x behaviour policies x learning rates x
dataset sizes). Run one by one, each would pay Python's per-operation overhead on tiny tensors.
Placed side by side -- copy k's states renumbered after copy k-1's -- the K trees form one bigger
token tree whose states never interact: every loss in :mod:`shiq_lab.losses` is a sum over
tokens (or over pairs of responses to one prompt), so copy k's gradient depends on copy k only.
One forward and backward pass then trains all K runs, and the exact solution, values and
occupancies of the forest are those of each copy, read back per copy with :func:`per_copy`.

The only coupling is the normalisation: a mean over the forest's tokens weights copy k's loss by
(its tokens / all tokens), a constant factor; the harness multiplies each copy's gradient back by
its inverse, and a test checks a forest against separate runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shiq_lab.exact.tree import OfflineDataset, TokenTree

__all__ = ["Forest", "stack_trees", "stack_datasets", "per_copy", "per_copy_mean"]


@dataclass
class Forest:
    """K token trees merged into one :class:`TokenTree`.

    Attributes:
        tree: the merged tree (states of copy k are ``k*states_per_copy ...``).
        copies: K.
        states_per_copy: N, the same for every copy (same vocabulary, horizon, prompts, env depths).
        prompts_per_copy: P.
        copy_of_state: [K*N] copy index of each merged state.
    """

    tree: TokenTree
    copies: int
    states_per_copy: int
    prompts_per_copy: int
    copy_of_state: torch.Tensor

    def copy_tree(self, k: int) -> TokenTree:
        """Copy k as a standalone tree (state ids renumbered from 0)."""
        n, lo = self.states_per_copy, k * self.states_per_copy
        t = self.tree
        sl = slice(lo, lo + n)
        nxt = t.next_state[sl]
        return TokenTree(
            t.ref_logits[sl], t.rewards[sl], torch.where(nxt >= 0, nxt - lo, nxt), t.depth[sl],
            t.prompt[sl] - k * self.prompts_per_copy, t.roots[k * self.prompts_per_copy:(k + 1) * self.prompts_per_copy] - lo,
            t.prefixes[sl], t.eos, t.horizon, t.env_action[sl],
        )


def stack_trees(trees: list[TokenTree]) -> Forest:
    """Merge trees of one shape (same vocabulary, horizon, prompt count, state count) into a forest."""
    if not trees:
        raise ValueError("trees is empty: a forest needs at least one tree")
    first = trees[0]
    for i, t in enumerate(trees):
        if (t.num_states, t.vocab_size, t.num_prompts, t.horizon, t.eos) != (
            first.num_states, first.vocab_size, first.num_prompts, first.horizon, first.eos
        ):
            raise ValueError(
                f"trees[{i}] has shape (states={t.num_states}, vocab={t.vocab_size}, prompts={t.num_prompts}, "
                f"horizon={t.horizon}) but trees[0] has (states={first.num_states}, vocab={first.vocab_size}, "
                f"prompts={first.num_prompts}, horizon={first.horizon}): build every copy with the same tree arguments"
            )
    n, p = first.num_states, first.num_prompts
    next_state = torch.cat([torch.where(t.next_state >= 0, t.next_state + k * n, t.next_state) for k, t in enumerate(trees)])
    merged = TokenTree(
        ref_logits=torch.cat([t.ref_logits for t in trees]),
        rewards=torch.cat([t.rewards for t in trees]),
        next_state=next_state,
        depth=torch.cat([t.depth for t in trees]),
        prompt=torch.cat([t.prompt + k * p for k, t in enumerate(trees)]),
        roots=torch.cat([t.roots + k * n for k, t in enumerate(trees)]),
        prefixes=[pre for t in trees for pre in t.prefixes],
        eos=first.eos,
        horizon=first.horizon,
        env_action=torch.cat([t.env_action for t in trees]),
    )
    copy_of_state = torch.arange(len(trees)).repeat_interleave(n)
    return Forest(merged, len(trees), n, p, copy_of_state)


def stack_datasets(forest: Forest, datasets: list[OfflineDataset]) -> tuple[OfflineDataset, torch.Tensor]:
    """Concatenate one dataset per copy, renumbering states and prompts into the forest.

    Returns the merged dataset and ``copy_of_row`` ([B] copy index of each path).
    """
    if len(datasets) != forest.copies:
        raise ValueError(f"got {len(datasets)} datasets for a forest of {forest.copies} copies: pass one per copy")
    n, p = forest.states_per_copy, forest.prompts_per_copy
    states = torch.cat([torch.where(d.states >= 0, d.states + k * n, d.states) for k, d in enumerate(datasets)])
    merged = OfflineDataset(
        states=states,
        actions=torch.cat([d.actions for d in datasets]),
        rewards=torch.cat([d.rewards for d in datasets]),
        mask=torch.cat([d.mask for d in datasets]),
        prompts=torch.cat([d.prompts + k * p for k, d in enumerate(datasets)]),
        lengths=torch.cat([d.lengths for d in datasets]),
    )
    copy_of_row = torch.cat([torch.full((len(d),), k, dtype=torch.long) for k, d in enumerate(datasets)])
    return merged, copy_of_row


def per_copy(values: torch.Tensor, copies: int) -> torch.Tensor:
    """[K*M] -> [K, M]: split a per-state (or per-prompt) vector of the forest by copy."""
    return values.reshape(copies, -1)


def per_copy_mean(values: torch.Tensor, weights: torch.Tensor, copy_index: torch.Tensor, copies: int) -> torch.Tensor:
    """[K] weighted mean of ``values`` within each copy (rows with weight 0 are left out)."""
    num = torch.zeros(copies, dtype=values.dtype).index_add_(0, copy_index, values * weights)
    den = torch.zeros(copies, dtype=values.dtype).index_add_(0, copy_index, weights.to(values.dtype))
    return num / den.clamp(min=torch.finfo(values.dtype).tiny)
