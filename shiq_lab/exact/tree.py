"""Exact ground truth: small token-tree MDPs solved by backward recursion (METHOD.md, step 0).

A token tree has one root per prompt; a state is (prompt, prefix of response tokens). Every action
appends a token; the episode ends when EOS is emitted or the response reaches ``horizon`` tokens.
With a vocabulary of a few tokens the tree is small enough to enumerate, so the KL-regularised
optimum q*, v*, pi* is computed exactly and every loss can be measured against it.

All tables are indexed ``[state, token]``: ``next_state[s, a] == -1`` means the episode ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "TokenTree",
    "ExactSolution",
    "OfflineDataset",
    "make_token_tree",
    "solve",
    "state_values",
    "regularised_return",
    "expected_reward",
    "state_occupancy",
    "sequence_kl",
    "mean_state_kl",
    "skewed_policy",
    "sample_dataset",
    "tabular_logits",
    "uniform_log_probs",
    "enumerate_paths",
    "concat_datasets",
    "visited_pairs",
    "coverage",
]


@dataclass
class TokenTree:
    """An enumerated token MDP.

    Attributes:
        ref_logits: [N, V] reference logits, with large arbitrary per-state offsets (a real LM's
            logits are only defined up to such an offset; the losses must not care).
        rewards: [N, V] reward r(s, a) for taking token a in state s.
        next_state: [N, V] index of s' = s + a, or -1 when the episode ends.
        depth: [N] number of response tokens already emitted in the state.
        prompt: [N] prompt (root) a state belongs to.
        roots: [P] state index of each prompt's root.
        prefixes: response prefix of each state (for display).
        eos: the EOS token id.
        horizon: maximum response length.
        env_action: [N] token the environment emits in an environment state (multi-turn-like trees),
            -1 in states where the policy chooses. Environment tokens carry no reward.
    """

    ref_logits: torch.Tensor
    rewards: torch.Tensor
    next_state: torch.Tensor
    depth: torch.Tensor
    prompt: torch.Tensor
    roots: torch.Tensor
    prefixes: list[tuple[int, ...]]
    eos: int
    horizon: int
    env_action: torch.Tensor

    @property
    def policy_states(self) -> torch.Tensor:
        """[N] bool, True where the policy (not the environment) chooses the token."""
        return self.env_action < 0

    def with_env(self, log_pi: torch.Tensor) -> torch.Tensor:
        """Overwrite the rows of environment states with the environment's deterministic choice."""
        if bool(self.policy_states.all()):
            return log_pi
        env = ~self.policy_states
        fixed = torch.full_like(log_pi[env], -1e30)
        fixed.scatter_(1, self.env_action[env, None], 0.0)
        out = log_pi.clone()
        out[env] = fixed
        return out

    @property
    def num_states(self) -> int:
        return self.ref_logits.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.ref_logits.shape[1]

    @property
    def num_prompts(self) -> int:
        return self.roots.shape[0]

    @property
    def ref_log_probs(self) -> torch.Tensor:
        return torch.log_softmax(self.ref_logits, dim=-1)

    def states_by_depth(self, reverse: bool = False) -> list[torch.Tensor]:
        """State indices grouped by depth (deepest first when ``reverse``)."""
        groups = [torch.nonzero(self.depth == d).flatten() for d in range(self.horizon)]
        return groups[::-1] if reverse else groups


@dataclass
class ExactSolution:
    """q*, v* and pi* of a token tree for one beta (METHOD.md step 0)."""

    beta: float
    q: torch.Tensor  # [N, V]
    v: torch.Tensor  # [N]
    pi: torch.Tensor  # [N, V]
    log_pi: torch.Tensor  # [N, V]
    root_values: torch.Tensor  # [P] v* at each prompt's root

    @property
    def optimal_return(self) -> float:
        """J_beta(pi*) averaged over prompts; equals the mean of v* at the roots."""
        return float(self.root_values.mean())


@dataclass
class OfflineDataset:
    """Paths sampled from a behaviour policy, in the padded [B, T] layout the losses take.

    ``states[b, t]`` is the tree state before action t (``-1`` on padding), so tabular logits are
    ``theta[states.clamp(min=0)]``. ``mask`` is 1 on response tokens, 0 on padding and, for
    environment positions, 0 too (``policy_mask`` of the tree decides).
    """

    states: torch.Tensor  # [B, T] long
    actions: torch.Tensor  # [B, T] long
    rewards: torch.Tensor  # [B, T] float
    mask: torch.Tensor  # [B, T] float, 1 where the policy chose the token
    prompts: torch.Tensor  # [B] long
    lengths: torch.Tensor  # [B] long

    def __len__(self) -> int:
        return self.actions.shape[0]

    @property
    def returns(self) -> torch.Tensor:
        """Sum of rewards of each path."""
        return self.rewards.sum(dim=1)

    def subset(self, index: torch.Tensor | slice) -> OfflineDataset:
        return OfflineDataset(
            self.states[index], self.actions[index], self.rewards[index], self.mask[index],
            self.prompts[index], self.lengths[index],
        )


def make_token_tree(
    vocab_size: int = 3,
    horizon: int = 3,
    num_prompts: int = 1,
    *,
    reward: str = "mixed",
    logit_offset_scale: float = 50.0,
    logit_scale: float = 1.5,
    seed: int = 0,
    env_depths: tuple[int, ...] = (),
    dtype: torch.dtype = torch.float64,
) -> TokenTree:
    """Build a random token tree.

    Args:
        vocab_size: tokens per state, EOS included (EOS is the last id).
        horizon: maximum response length; at depth ``horizon - 1`` every token ends the episode.
        num_prompts: number of independent roots.
        reward: ``"terminal"`` (a score on the last token of each path only), ``"token"`` (a reward
            on every token) or ``"mixed"`` (both).
        logit_offset_scale: scale of the arbitrary per-state offset added to the reference logits.
        logit_scale: scale of the informative part of the reference logits.
        seed: RNG seed; the same arguments give the same tree.
        env_depths: response positions whose token the environment picks (a fixed, random non-EOS
            token per state, reward 0): the multi-turn-like setting where such tokens have mask 0.
        dtype: float dtype of the tables (float64 keeps the exact solution exact).
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size={vocab_size}: need at least 2 tokens (one of them EOS)")
    if horizon < 1:
        raise ValueError(f"horizon={horizon}: need at least 1")
    if reward not in ("terminal", "token", "mixed"):
        raise ValueError(f"reward={reward!r}: choose 'terminal', 'token' or 'mixed'")
    if any(not 0 < d < horizon - 1 for d in env_depths):
        raise ValueError(f"env_depths={env_depths}: each must lie in 1..horizon-2 (the policy starts and ends)")
    gen = torch.Generator().manual_seed(seed)
    env_gen = torch.Generator().manual_seed(seed + 7919)
    eos = vocab_size - 1
    env_choice: dict[tuple[int, tuple[int, ...]], int] = {}

    prefixes: list[tuple[int, ...]] = []
    prompt_of: list[int] = []
    index: dict[tuple[int, tuple[int, ...]], int] = {}
    frontier = []
    for p in range(num_prompts):
        index[(p, ())] = len(prefixes)
        prefixes.append(())
        prompt_of.append(p)
        frontier.append((p, ()))
    while frontier:
        new = []
        for p, pre in frontier:
            if len(pre) + 1 >= horizon:
                continue
            choices = range(vocab_size - 1)  # EOS ends the episode: no child
            if len(pre) in env_depths:
                env_choice[(p, pre)] = int(torch.randint(vocab_size - 1, (1,), generator=env_gen))
                choices = [env_choice[(p, pre)]]
            for a in choices:
                child = pre + (a,)
                index[(p, child)] = len(prefixes)
                prefixes.append(child)
                prompt_of.append(p)
                new.append((p, child))
        frontier = new

    n = len(prefixes)
    next_state = torch.full((n, vocab_size), -1, dtype=torch.long)
    for (p, pre), s in index.items():
        for a in range(vocab_size - 1):
            next_state[s, a] = index.get((p, pre + (a,)), -1)
    depth = torch.tensor([len(pre) for pre in prefixes], dtype=torch.long)
    prompt = torch.tensor(prompt_of, dtype=torch.long)
    roots = torch.tensor([index[(p, ())] for p in range(num_prompts)], dtype=torch.long)
    env_action = torch.full((n,), -1, dtype=torch.long)
    for key, a in env_choice.items():
        env_action[index[key]] = a

    informative = logit_scale * torch.randn(n, vocab_size, generator=gen, dtype=dtype)
    offsets = logit_offset_scale * torch.randn(n, 1, generator=gen, dtype=dtype)
    ref_logits = informative + offsets

    terminal = next_state < 0
    rewards = torch.zeros(n, vocab_size, dtype=dtype)
    if reward in ("token", "mixed"):
        rewards += 0.5 * torch.randn(n, vocab_size, generator=gen, dtype=dtype)
    if reward in ("terminal", "mixed"):
        rewards += torch.where(terminal, torch.randn(n, vocab_size, generator=gen, dtype=dtype), 0.0)
    rewards[env_action >= 0] = 0.0
    return TokenTree(ref_logits, rewards, next_state, depth, prompt, roots, prefixes, eos, horizon, env_action)


def _next_values(tree: TokenTree, v: torch.Tensor) -> torch.Tensor:
    """[N, V] value of the successor state, 0 when the episode ends."""
    return torch.where(tree.next_state >= 0, v[tree.next_state.clamp(min=0)], torch.zeros((), dtype=v.dtype))


def solve(tree: TokenTree, beta: float) -> ExactSolution:
    """Exact q*, v*, pi* by backward recursion (METHOD.md step 0)."""
    if not beta > 0:
        raise ValueError(f"beta={beta}: must be > 0")
    ref_logp = tree.ref_log_probs
    v = torch.zeros(tree.num_states, dtype=tree.ref_logits.dtype)
    q = torch.zeros_like(tree.rewards)
    for states in tree.states_by_depth(reverse=True):
        q_s = tree.rewards[states] + _next_values(tree, v)[states]
        q[states] = q_s
        v[states] = beta * torch.logsumexp(ref_logp[states] + q_s / beta, dim=-1)
        env = states[tree.env_action[states] >= 0]
        if env.numel():  # the environment's token is not chosen: no soft-max, no KL
            v[env] = q[env].gather(1, tree.env_action[env, None]).squeeze(1)
    log_pi = tree.with_env(torch.log_softmax(ref_logp + q / beta, dim=-1))
    return ExactSolution(beta=beta, q=q, v=v, pi=log_pi.exp(), log_pi=log_pi, root_values=v[tree.roots])


def state_values(tree: TokenTree, log_pi: torch.Tensor, beta: float) -> torch.Tensor:
    """[N] regularised value of a policy: E_pi[sum_t r_t - beta * ln(pi/pi_ref)(a_t|s_t)] from each state."""
    ref_logp = tree.ref_log_probs
    log_pi = tree.with_env(log_pi.to(ref_logp.dtype))
    pi = log_pi.exp()
    kl_weight = beta * tree.policy_states.to(ref_logp.dtype)[:, None]
    v = torch.zeros(tree.num_states, dtype=ref_logp.dtype)
    for states in tree.states_by_depth(reverse=True):
        log_ratio = torch.where(pi[states] > 0, log_pi[states] - ref_logp[states], 0.0)
        gain = tree.rewards[states] - kl_weight[states] * log_ratio + _next_values(tree, v)[states]
        v[states] = (pi[states] * gain).sum(-1)
    return v


def regularised_return(tree: TokenTree, log_pi: torch.Tensor, beta: float) -> float:
    """J_beta(pi) = E_pi[sum r] - beta * KL(pi || pi_ref), averaged over prompts."""
    return float(state_values(tree, log_pi, beta)[tree.roots].mean())


def expected_reward(tree: TokenTree, log_pi: torch.Tensor) -> float:
    """E_pi[sum_t r_t], averaged over prompts (beta = 0 in :func:`state_values`)."""
    return regularised_return(tree, log_pi, 0.0)


def state_occupancy(tree: TokenTree, log_pi: torch.Tensor) -> torch.Tensor:
    """[N] probability that a path of pi (prompt uniform) visits each state."""
    pi = tree.with_env(log_pi.to(tree.ref_logits.dtype)).exp()
    d = torch.zeros(tree.num_states, dtype=pi.dtype)
    d[tree.roots] = 1.0 / tree.num_prompts
    for states in tree.states_by_depth():
        flow = d[states, None] * pi[states]
        nxt = tree.next_state[states]
        keep = nxt >= 0
        d.index_add_(0, nxt[keep], flow[keep])
    return d


def _state_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def sequence_kl(tree: TokenTree, log_pi: torch.Tensor, log_other: torch.Tensor) -> float:
    """KL(pi || other) of whole responses, averaged over prompts (token KLs weighted by occupancy).

    Environment states are skipped: neither policy chooses their token.
    """
    log_pi = log_pi.to(tree.ref_logits.dtype)
    occ = state_occupancy(tree, log_pi) * tree.policy_states
    return float((occ * _state_kl(log_pi, log_other.to(log_pi.dtype))).sum())


def mean_state_kl(tree: TokenTree, log_pi: torch.Tensor, log_other: torch.Tensor) -> float:
    """KL(pi(.|s) || other(.|s)) averaged uniformly over the policy states of the tree."""
    log_pi = log_pi.to(tree.ref_logits.dtype)
    return float(_state_kl(log_pi, log_other.to(log_pi.dtype))[tree.policy_states].mean())


def skewed_policy(tree: TokenTree, strength: float = 3.0, seed: int = 1) -> torch.Tensor:
    """[N, V] log-probs of a behaviour policy far from pi_ref: reference logits plus a random tilt."""
    gen = torch.Generator().manual_seed(seed)
    tilt = strength * torch.randn(tree.ref_logits.shape, generator=gen, dtype=tree.ref_logits.dtype)
    return torch.log_softmax(tree.ref_logits + tilt, dim=-1)


def sample_dataset(
    tree: TokenTree,
    behaviour_log_probs: torch.Tensor,
    num_paths: int,
    *,
    seed: int = 0,
) -> OfflineDataset:
    """Sample ``num_paths`` responses with a behaviour policy (``[N, V]`` log-probs).

    Prompts are drawn uniformly. In environment states the environment's token is taken whatever the
    behaviour policy says, and gets mask 0: that is how multi-turn data looks to the losses.
    """
    if num_paths < 1:
        raise ValueError(f"num_paths={num_paths}: need at least 1")
    gen = torch.Generator().manual_seed(seed)
    probs = tree.with_env(behaviour_log_probs.to(torch.float64)).exp()
    T = tree.horizon
    states = torch.full((num_paths, T), -1, dtype=torch.long)
    actions = torch.zeros((num_paths, T), dtype=torch.long)
    rewards = torch.zeros((num_paths, T), dtype=tree.rewards.dtype)
    mask = torch.zeros((num_paths, T), dtype=tree.rewards.dtype)
    prompts = torch.randint(tree.num_prompts, (num_paths,), generator=gen)
    lengths = torch.zeros(num_paths, dtype=torch.long)
    s = tree.roots[prompts].clone()
    alive = torch.ones(num_paths, dtype=torch.bool)
    for t in range(T):
        if not alive.any():
            break
        a = torch.multinomial(probs[s.clamp(min=0)], 1, generator=gen).squeeze(1)
        states[alive, t] = s[alive]
        actions[alive, t] = a[alive]
        rewards[alive, t] = tree.rewards[s[alive], a[alive]]
        mask[alive, t] = tree.policy_states[s[alive]].to(mask.dtype)
        lengths[alive] += 1
        nxt = tree.next_state[s.clamp(min=0), a]
        alive = alive & (nxt >= 0)
        s = torch.where(alive, nxt, torch.full_like(nxt, -1))
    return OfflineDataset(states, actions, rewards, mask, prompts, lengths)


def tabular_logits(theta: torch.Tensor, dataset: OfflineDataset) -> torch.Tensor:
    """[B, T, V] logits of a tabular policy ``theta`` ([N, V]) along the dataset's paths."""
    return theta[dataset.states.clamp(min=0)]


def uniform_log_probs(tree: TokenTree) -> torch.Tensor:
    """[N, V] log-probs of the uniform behaviour policy."""
    return torch.full(tree.ref_logits.shape, -math.log(tree.vocab_size), dtype=tree.ref_logits.dtype)


def enumerate_paths(tree: TokenTree) -> OfflineDataset:
    """Every complete response of every prompt, once, in the :class:`OfflineDataset` layout.

    In environment states only the environment's token is followed. Exact checks ("the residual
    vanishes on *every* path") and covering datasets (every (state, action) pair visited) use it.
    """
    paths: list[tuple[int, list[int], list[int]]] = []  # (prompt, states, actions)
    stack = [(p, [int(r)], []) for p, r in enumerate(tree.roots.tolist())]
    while stack:
        p, states, actions = stack.pop()
        s = states[-1]
        env = int(tree.env_action[s])
        for a in ([env] if env >= 0 else range(tree.vocab_size)):
            nxt = int(tree.next_state[s, a])
            if nxt < 0:
                paths.append((p, states, actions + [a]))
            else:
                stack.append((p, states + [nxt], actions + [a]))
    paths.sort(key=lambda path: (path[0], path[2]))
    B, T = len(paths), tree.horizon
    states = torch.full((B, T), -1, dtype=torch.long)
    actions = torch.zeros((B, T), dtype=torch.long)
    lengths = torch.tensor([len(a) for _, _, a in paths], dtype=torch.long)
    for b, (_, st, ac) in enumerate(paths):
        states[b, : len(st)] = torch.tensor(st)
        actions[b, : len(ac)] = torch.tensor(ac)
    on_path = states >= 0
    rewards = torch.where(on_path, tree.rewards[states.clamp(min=0), actions], 0.0)
    mask = (on_path & tree.policy_states[states.clamp(min=0)]).to(tree.rewards.dtype)
    prompts = torch.tensor([p for p, _, _ in paths], dtype=torch.long)
    return OfflineDataset(states, actions, rewards, mask, prompts, lengths)


def concat_datasets(*datasets: OfflineDataset) -> OfflineDataset:
    """Stack datasets of the same tree (e.g. off-policy samples topped up with :func:`enumerate_paths`)."""
    if not datasets:
        raise ValueError("concat_datasets needs at least one dataset")
    widths = {d.actions.shape[1] for d in datasets}
    if len(widths) > 1:
        raise ValueError(f"datasets have different widths T={sorted(widths)}: they must come from the same tree")
    fields = ("states", "actions", "rewards", "mask", "prompts", "lengths")
    return OfflineDataset(*(torch.cat([getattr(d, f) for d in datasets]) for f in fields))


def visited_pairs(tree: TokenTree, data: OfflineDataset) -> torch.Tensor:
    """[N, V] bool: which (state, action) pairs the dataset holds on a response (mask 1) token."""
    seen = torch.zeros(tree.ref_logits.shape, dtype=torch.bool)
    on = data.mask.bool()
    seen[data.states[on], data.actions[on]] = True
    return seen


def coverage(tree: TokenTree, data: OfflineDataset) -> float:
    """Fraction of the policy's (state, action) pairs the dataset visits.

    The losses only constrain the logits of visited pairs: the fitted policy equals pi* in every
    policy state only when this is 1.
    """
    return float(visited_pairs(tree, data)[tree.policy_states].double().mean())
