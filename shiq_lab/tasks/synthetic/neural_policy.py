"""A tiny causal transformer over path tokens: the policy that must generalise across states.

The tabular policy has one free logit vector per state; this one reads the state as its token
sequence ``[prompt token, y_1, ..., y_t]`` and shares its weights across states, as a language
model does. Its output is a *correction* added to the reference logits, with a zero-initialised
head, so training starts exactly at pi_ref -- the situation of an LLM fine-tuned from its
reference (and what makes the shifted losses start at zero residual).

K independent copies (one per run of a forest, see :mod:`shiq_lab.tasks.synthetic.forest`) are evaluated in
one call with ``torch.func.vmap``: every parameter has a leading K dimension. The network runs in
float32 (the tables and the exact solution stay in float64).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from shiq_lab.exact.tree import TokenTree
from shiq_lab.tasks.synthetic.forest import Forest

__all__ = ["PathTransformer", "NeuralPolicy", "state_tokens"]


class _Block(nn.Module):
    """Pre-norm causal self-attention and MLP (written out: vmap needs plain tensor ops)."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        h = self.n_heads
        q, k, v = self.qkv(self.norm1(x)).reshape(b, length, 3, h, d // h).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // h)
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + self.out((att @ v).transpose(1, 2).reshape(b, length, d))
        return x + self.mlp(self.norm2(x))


class PathTransformer(nn.Module):
    """One copy: token + position embeddings, ``n_layers`` causal blocks, a zero-initialised head.

    Args:
        num_tokens: size of the input alphabet (response tokens, then one token per prompt).
        horizon: longest input sequence (the tree's horizon: prompt token + horizon-1 response tokens).
        vocab_size: number of output logits (the tree's vocabulary).
    """

    def __init__(self, num_tokens: int, horizon: int, vocab_size: int, *, d_model: int = 16, n_heads: int = 2, n_layers: int = 2) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be a multiple of n_heads={n_heads}")
        self.embed = nn.Embedding(num_tokens, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(horizon, d_model))
        self.blocks = nn.ModuleList(_Block(d_model, n_heads) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        nn.init.zeros_(self.head.weight)  # start exactly at the reference policy
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L] token ids -> [B, L, vocab] logit corrections (position t sees tokens <= t)."""
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def state_tokens(tree: TokenTree) -> torch.Tensor:
    """[N, horizon] input of each state: its prompt's token (``vocab + prompt``), then its prefix, 0-padded.

    State s's logits are read at position ``depth[s]`` (causal attention makes the padding after it
    irrelevant).
    """
    tokens = torch.zeros(tree.num_states, tree.horizon, dtype=torch.long)
    for s, prefix in enumerate(tree.prefixes):
        tokens[s, 0] = tree.vocab_size + int(tree.prompt[s])
        if prefix:
            tokens[s, 1 : len(prefix) + 1] = torch.tensor(prefix, dtype=torch.long)
    return tokens


def _anchors(tree: TokenTree) -> tuple[torch.Tensor, torch.Tensor]:
    """Deepest states of a tree, and for each state the row of a deepest descendant."""
    deepest = torch.nonzero(tree.depth == tree.horizon - 1).flatten()
    anchor = torch.full((tree.num_states,), -1, dtype=torch.long)
    for row, s in enumerate(deepest.tolist()):
        anchor[s] = row
    for states in tree.states_by_depth(reverse=True)[1:]:
        for s in states.tolist():
            child = next(c for c in tree.next_state[s].tolist() if c >= 0)
            anchor[s] = anchor[child]
    return deepest, anchor


class NeuralPolicy:
    """K copies of :class:`PathTransformer` producing the forest's logit table.

    ``table()`` is ``ref_logits + correction``: [K*N, V], the same interface as a tabular policy, so
    every loss of the harness applies unchanged. Copy k is initialised from ``seeds[k]``.
    """

    def __init__(self, forest: Forest, seeds: list[int], *, d_model: int = 16, n_heads: int = 2, n_layers: int = 2) -> None:
        from torch.func import functional_call, stack_module_state

        if len(seeds) != forest.copies:
            raise ValueError(f"seeds has {len(seeds)} entries for {forest.copies} copies: give one seed per copy")
        tree = forest.tree
        k, n = forest.copies, forest.states_per_copy
        num_tokens = tree.vocab_size + forest.prompts_per_copy
        models = []
        for seed in seeds:
            torch.manual_seed(seed)
            models.append(PathTransformer(num_tokens, tree.horizon, tree.vocab_size, d_model=d_model, n_heads=n_heads, n_layers=n_layers))
        params, _ = stack_module_state(models)
        self._params = params
        self._base = models[0]
        # Every state is a prefix of a deepest state (only EOS ends a path early, and EOS has no
        # child), so one causal pass over the deepest states' sequences gives every state's logits:
        # state s is read at position depth[s] of its anchor, a deepest descendant.
        first = slice(0, n)
        copy0 = forest.copy_tree(0)
        deepest, anchor = _anchors(copy0)
        tokens = state_tokens(forest.tree).reshape(k, n, tree.horizon)
        tokens[:, :, 0] = tree.vocab_size + (tokens[:, :, 0] - tree.vocab_size) % forest.prompts_per_copy
        self._tokens = tokens[:, deepest]  # [K, M, horizon]
        self._anchor = anchor
        self._depth = tree.depth[first]
        self._ref = tree.ref_logits
        self._call = torch.func.vmap(lambda p, x: functional_call(self._base, p, (x,)))

    @property
    def params(self) -> list[torch.Tensor]:
        """Parameters, each with a leading K (copy) dimension."""
        return list(self._params.values())

    def table(self) -> torch.Tensor:
        """[K*N, V] logits of every state of the forest."""
        out = self._call(self._params, self._tokens)  # [K, M, horizon, V], float32
        corr = out[:, self._anchor, self._depth]  # [K, N, V]
        return self._ref + corr.reshape(self._ref.shape).to(self._ref.dtype)
