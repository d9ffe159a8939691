"""Per-token values of a causal LM against its reference: Q, V, advantage, ShiQ residual, KL, top-k.

For the state ``s_t = (x, y_<t)`` before response token ``a_t = y_t`` (METHOD.md, step 3)::

    Q(s, a)   = beta * (l_theta - l_ref)(s, a)                    shifted Q-value of the token
    V(s)      = beta * (logsumexp l_theta - logsumexp l_ref)(s)   implied value of the state
    A(s, a)   = Q - V = beta * ln(pi_theta / pi_ref)(a | s)       implied advantage
    residual  = delta_t of :func:`shiq_lab.losses.shiq_loss` on the same numbers
    kl        = KL(pi_theta(.|s) || pi_ref(.|s)) over the vocabulary, in nats

:func:`token_values` returns one DataFrame row per response token. The beta-free numbers
(``logp, ref_logp, logz, ref_logz``, top-k log-probs) are kept, so :func:`with_beta` moves beta
without running a model again.

The numbers: ``logp`` / ``logz`` of the taken tokens are :func:`shiq_lab.lm.stats.token_stats`'s,
the very function (and so the very fp32 values) the trainer and the reference cache use; on the
same row the residuals here are the trainer's (tests/test_seams.py). The top-k alternatives and
the per-state KL need every vocabulary entry: they are read from the same forward pass's hidden
states, ``chunk_tokens`` states at a time (:class:`shiq_lab.lm.stats.StateLogits`).

Memory: responses are scored ``batch_size`` at a time; only the states of response tokens are
kept (their last hidden state, [N, H]), so no [B, T, V] tensor is held beyond one chunk's
[chunk, V]. A model whose output layer is not a plain matrix next to its forward pass
(:func:`shiq_lab.lm.stats.resolve_logits_mode`: soft-capping, an adapted or sharded output layer,
a wrapper that post-processes logits) uses its own logits, with a warning.

The reference is one of: a second model; the same model object (values are then exactly 0); a
peft model's base (``reference=None`` or ``"disable_adapter"``: adapters disabled); or
:class:`ReferenceStats` precomputed by :func:`reference_stats`. Without the reference's full
logits, Q, V, A, the log-ratio and the residual are exact, but the per-token KL is NaN and the
top-k alternatives get a Q-value only where the reference stored that token among its own top
``candidates`` (NaN otherwise).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from shiq_lab.data.batch import batch_responses, pad_token_id
from shiq_lab.data.encode import EncodedResponse, Prompt, Response, encode_responses
from shiq_lab.lm.modes import as_reference, device_of, eval_mode, is_peft
from shiq_lab.lm.stats import StateLogits, resolve_logits_mode, token_stats
from shiq_lab.losses import shiq_loss

__all__ = [
    "QUANTITY_COLUMNS",
    "ReferenceStats",
    "reference_stats",
    "token_values",
    "with_beta",
    "resolve_rewards",
    "eval_mode",
]

#: columns that depend on beta (recomputed by :func:`with_beta`) and their meaning
QUANTITY_COLUMNS = {
    "q": "Q(s,a) = beta*(l_theta - l_ref)(s,a)",
    "v": "V(s) = beta*(logsumexp l_theta - logsumexp l_ref)(s)",
    "advantage": "A(s,a) = Q - V = beta*ln(pi/pi_ref)(a|s)",
    "reward": "token reward r(s,a)",
    "residual": "ShiQ residual delta_t (shiq_loss)",
    "log_ratio": "ln pi(a|s) - ln pi_ref(a|s)",
    "kl": "KL(pi(.|s) || pi_ref(.|s)), nats",
}

Rewards = None | float | Sequence[float] | Sequence[Sequence[float]] | Callable[[Sequence[int]], Sequence[float]]


@dataclass
class ReferenceStats:
    """Reference numbers precomputed per response (see :func:`reference_stats`).

    Per response i: ``token_ids[i]`` (its response tokens, to check alignment), ``logp[i]`` =
    ln pi_ref(a_t|s_t), ``logz[i]`` = logsumexp l_ref(s_t), and the reference's own top
    ``candidates`` tokens per state (``cand_ids[i]``, ``cand_logp[i]``, [n, K]) from which top-k
    alternatives of the policy get their reference log-probability.
    """

    token_ids: list[list[int]]
    logp: list[np.ndarray]
    logz: list[np.ndarray]
    cand_ids: list[np.ndarray]
    cand_logp: list[np.ndarray]


class _LogitSource:
    """Per-token statistics of one model (:func:`shiq_lab.lm.stats.token_stats`) plus its states' full logits.

    ``adapters_off``: the model's reference (a peft model with its adapters disabled, see
    :func:`shiq_lab.lm.modes.as_reference`).
    """

    def __init__(self, model: torch.nn.Module, *, adapters_off: bool = False) -> None:
        self.model = model
        self.adapters_off = adapters_off
        self.device = device_of(model)
        self.mode = resolve_logits_mode(model)
        self.head_ok = self.mode == "chunked"  # False: the model's own logits are kept (more memory)
        if not self.head_ok:
            warnings.warn(f"{type(model).__name__}: its logits are not a plain output layer applied to its last hidden "
                          "state (or it is not a Hugging Face causal LM); using the full logits (more memory)",
                          stacklevel=3)

    def context(self) -> contextlib.AbstractContextManager:
        return as_reference(self.model) if self.adapters_off else contextlib.nullcontext(self.model)

    @torch.no_grad()
    def states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rb: torch.Tensor, rt: torch.Tensor) -> _States:
        """Run the model once; keep logp / logz of the actions after states (rb, rt) and those states' logits.

        (rb, rt) index the [B, T-1] layout of :class:`shiq_lab.data.inspect.PaddedBatch` (state t is
        followed by token t+1), row-major, as ``torch.nonzero`` gives them.
        """
        L = input_ids.shape[1]
        states = rb * L + rt
        action_mask = torch.zeros(input_ids.shape, dtype=torch.long)
        action_mask.view(-1)[states + 1] = 1
        dev = self.device
        ids, am = input_ids.to(dev), attention_mask.to(dev)
        with self.context() as model:
            logp, logz, cap = token_stats(model, ids, am, action_mask.to(dev), logits_mode=self.mode,
                                          positions=(states + 1).to(dev), return_capture=True)
        flat = states.to(dev) + 1
        return _States(logp.view(-1)[flat], logz.view(-1)[flat], StateLogits(self.model, cap, states.to(dev)))


class _States:
    """logp / logz of N selected actions (from the kernel) and their states' fp32 logits chunk by chunk."""

    def __init__(self, logp: torch.Tensor, logz: torch.Tensor, logits: StateLogits) -> None:
        self.logp, self.logz, self._logits = logp, logz, logits
        self.hidden, self.full = logits.hidden, logits.full

    def __len__(self) -> int:
        return len(self.logp)

    def logits(self, i0: int, i1: int, device: torch.device) -> torch.Tensor:
        """fp32 [i1 - i0, V] logits of states i0..i1-1."""
        return self._logits(i0, i1, device)


def _resolve_reference(model: torch.nn.Module, reference: Any) -> Any:
    if reference is model:
        return "same"
    if isinstance(reference, ReferenceStats):
        return reference
    if reference is None or (isinstance(reference, str) and reference == "disable_adapter"):
        if is_peft(model):
            return _LogitSource(model, adapters_off=True)
        raise ValueError("reference=None needs a peft model (the reference is the model with its adapters disabled); "
                         "pass reference=<a second model> (e.g. the checkpoint before fine-tuning), reference=model "
                         "(itself: every value is 0), or reference=reference_stats(...)")
    if isinstance(reference, torch.nn.Module):
        return _LogitSource(reference)
    raise TypeError(f"reference of type {type(reference).__name__}: give a model, the model itself, None / "
                    "'disable_adapter' for a peft model, or ReferenceStats")


def resolve_rewards(rewards: Rewards, encoded: Sequence[EncodedResponse]) -> list[np.ndarray]:
    """Per-response token rewards (0 on environment tokens) from any accepted form.

    ``None``: the encoding's own rewards (a chat message's ``reward``, as in training; else 0). A
    number, or one number per response: a sequence score on the last policy token. One sequence
    per response: per-token rewards (length = response tokens). A callable
    ``fn(token_ids) -> per-token rewards``, called on each response's tokens.
    """
    n = len(encoded)
    out: list[np.ndarray] = []
    if rewards is None:
        return [np.asarray(e.rewards, dtype=np.float64) for e in encoded]
    if callable(rewards):
        per = [np.asarray(rewards(e.row_ids), dtype=np.float64) for e in encoded]
    elif isinstance(rewards, (int, float)):
        per = [float(rewards)] * n
    else:
        rewards = list(rewards)
        if len(rewards) != n:
            raise ValueError(f"rewards has {len(rewards)} entries for {n} responses: give one per response")
        per = [float(r) if isinstance(r, (int, float, np.floating, np.integer)) else np.asarray(r, dtype=np.float64) for r in rewards]
    for i, (e, r) in enumerate(zip(encoded, per)):
        policy = np.asarray(e.policy, dtype=bool)
        if isinstance(r, float):
            arr = np.zeros(e.n_rows)
            arr[np.flatnonzero(policy)[-1]] = r
        else:
            if r.shape != (e.n_rows,):
                raise ValueError(f"rewards for response {i} have shape {r.shape}, but it has {e.n_rows} tokens "
                                 "(from its first to its last policy token)")
            arr = np.where(policy, r, 0.0)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"rewards for response {i} are not finite")
        out.append(arr)
    return out


def _chunk_stats(pl: torch.Tensor, rl: torch.Tensor | None, top_k: int) -> dict[str, torch.Tensor]:
    """Full-vocabulary numbers of one chunk of fp32 state logits (policy ``pl``, reference ``rl`` or None):
    top-k alternatives and the per-state KL. The taken tokens' logp / logz come from ``token_stats``."""
    logp_all = pl - torch.logsumexp(pl, -1)[:, None]
    out: dict[str, torch.Tensor] = {}
    k = min(top_k, pl.shape[-1])
    out["topk_logp"], out["topk_ids"] = logp_all.topk(k, dim=-1)
    if rl is not None:
        ref_all = rl - torch.logsumexp(rl, -1)[:, None]
        out["topk_ref_logp"] = ref_all.gather(1, out["topk_ids"])
        out["kl"] = (logp_all.exp() * (logp_all - ref_all)).sum(-1)
    return out


def _score(
    policy: _LogitSource,
    reference: Any,
    encoded: Sequence[EncodedResponse],
    pad_id: int,
    *,
    top_k: int,
    batch_size: int,
    chunk_tokens: int,
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yield (first response index of the batch, flat per-state arrays) batch by batch."""
    for b0 in range(0, len(encoded), batch_size):
        group = encoded[b0 : b0 + batch_size]
        batch = batch_responses(group, pad_id)
        rb, rt = torch.nonzero(batch.rows, as_tuple=True)  # row-major: response by response, in order
        actions = batch.actions[rb, rt].to(policy.device)
        pol = policy.states(batch.input_ids, batch.attention_mask, rb, rt)
        ref = None
        if isinstance(reference, _LogitSource):
            ref = reference.states(batch.input_ids, batch.attention_mask, rb, rt)
        elif reference == "same":
            ref = pol
        parts: dict[str, list[torch.Tensor]] = {"logp": [pol.logp.cpu()], "logz": [pol.logz.cpu()]}
        if ref is not None:
            parts.update(ref_logp=[ref.logp.cpu()], ref_logz=[ref.logz.cpu()])
        for i0 in range(0, len(pol), chunk_tokens):
            i1 = min(i0 + chunk_tokens, len(pol))
            pl = pol.logits(i0, i1, policy.device)
            rl = pl if ref is pol else (ref.logits(i0, i1, policy.device) if ref is not None else None)
            for key, value in _chunk_stats(pl, rl, top_k).items():
                parts.setdefault(key, []).append(value.cpu())
            del pl, rl
        flat = {k: torch.cat(v).numpy() for k, v in parts.items()}
        flat["token_id"] = actions.cpu().numpy()
        yield b0, flat


def _lookup_reference(stats: ReferenceStats, idx: Sequence[int], encoded: Sequence[EncodedResponse], flat: dict[str, np.ndarray]) -> None:
    """Fill the reference columns of ``flat`` from precomputed stats (in place)."""
    for i, e in zip(idx, encoded):
        if i >= len(stats.token_ids) or list(stats.token_ids[i]) != e.row_ids:
            raise ValueError(f"ReferenceStats entry {i} was computed for other tokens than response {i}: recompute it "
                             "with reference_stats() on the same prompt(s), responses and tokenizer")
    flat["ref_logp"] = np.concatenate([stats.logp[i] for i in idx])
    flat["ref_logz"] = np.concatenate([stats.logz[i] for i in idx])
    cand_ids = np.concatenate([stats.cand_ids[i] for i in idx])
    cand_logp = np.concatenate([stats.cand_logp[i] for i in idx])
    hit = flat["topk_ids"][:, :, None] == cand_ids[:, None, :]
    found = np.where(hit, cand_logp[:, None, :], 0.0).sum(-1)
    flat["topk_ref_logp"] = np.where(hit.any(-1), found, np.nan)
    flat["kl"] = np.full(len(flat["logp"]), np.nan)


def _decoder(tokenizer: PreTrainedTokenizerBase) -> Callable[[int], str]:
    cache: dict[int, str] = {}

    def decode(i: int) -> str:
        if i not in cache:
            cache[i] = tokenizer.decode([int(i)], skip_special_tokens=False)
        return cache[i]

    return decode


def _check_sizes(beta: float, top_k: int, batch_size: int, chunk_tokens: int) -> None:
    if not (isinstance(beta, (int, float)) and beta > 0):
        raise ValueError(f"beta={beta!r}: must be a number > 0 (the KL weight)")
    if not (isinstance(top_k, int) and top_k >= 1):
        raise ValueError(f"top_k={top_k!r}: must be an int >= 1")
    if batch_size < 1 or chunk_tokens < 1:
        raise ValueError(f"batch_size={batch_size}, chunk_tokens={chunk_tokens}: both must be >= 1")


def token_values(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: Prompt | Sequence[Prompt],
    responses: Response | Sequence[Response],
    *,
    reference: Any = None,
    beta: float = 0.1,
    rewards: Rewards = None,
    top_k: int = 5,
    horizon: int | None = None,
    batch_size: int = 8,
    chunk_tokens: int = 512,
    add_eos: bool = False,
    end_of_turn: str | None = None,
) -> pd.DataFrame:
    """Per-token Q, V, advantage, reward, residual, KL and top-k alternatives of responses to a prompt.

    Args:
        model: the causal LM (any ``AutoModelForCausalLM``, peft models included), in eval mode.
        tokenizer: its tokenizer (a chat template for chat messages).
        prompt: text or chat messages, or one of those per response.
        responses: one response or a list; text or chat messages (multi-turn: assistant turns
            are the policy's tokens, user / tool turns environment tokens).
        reference: see the module docstring (second model, ``model`` itself, None for a peft
            model's base, or :class:`ReferenceStats`).
        beta: KL weight; Q, V, A and the residual are in reward units.
        rewards: see :func:`resolve_rewards` (default: the chat messages' ``reward`` values, else 0).
        top_k: alternatives kept per position, by policy probability.
        horizon: residual horizon, as in :func:`shiq_lab.losses.shiq_loss` (None: full path).
        batch_size: responses per forward pass; chunk_tokens: states per output-head chunk.
        add_eos: for plain-text responses, append EOS (a finished response).
        end_of_turn: for chat, the string that ends an assistant turn (default: the EOS token).

    Returns:
        One row per response token, from the first to the last policy token of each response:
        ``response, step, position, token_id, token, segment, role, is_policy, reward, logp,
        ref_logp, logz, ref_logz, prob, ref_prob, log_ratio, q, v, advantage, residual, kl,
        topk_ids, topk_tokens, topk_prob, topk_ref_prob, topk_logp, topk_ref_logp, topk_q``
        (``residual`` is NaN on environment tokens). ``attrs`` holds beta, horizon, top_k.
    """
    _check_sizes(beta, top_k, batch_size, chunk_tokens)
    encoded = encode_responses(tokenizer, prompt, responses, add_eos=add_eos, end_of_turn=end_of_turn)
    reward_rows = resolve_rewards(rewards, encoded)
    ref = _resolve_reference(model, reference)
    policy = _LogitSource(model)
    flats = []
    with eval_mode(model, ref.model if isinstance(ref, _LogitSource) else None):
        for b0, flat in _score(policy, ref, encoded, pad_token_id(tokenizer), top_k=top_k, batch_size=batch_size,
                               chunk_tokens=chunk_tokens):
            if isinstance(ref, ReferenceStats):
                idx = list(range(b0, min(b0 + batch_size, len(encoded))))
                _lookup_reference(ref, idx, encoded[b0 : b0 + batch_size], flat)
            flats.append(flat)
    flat = {k: np.concatenate([f[k] for f in flats]) for k in flats[0]}
    df = _frame(flat, encoded, reward_rows, _decoder(tokenizer))
    df.attrs.update({"top_k": top_k, "reference": "stats" if isinstance(ref, ReferenceStats) else
                     ("self" if ref == "same" else ("adapters disabled" if ref.adapters_off else "model"))})
    return with_beta(df, beta, horizon=horizon)


def _frame(flat: dict[str, np.ndarray], encoded: Sequence[EncodedResponse], reward_rows: list[np.ndarray],
           decode: Callable[[int], str]) -> pd.DataFrame:
    n_rows = [e.n_rows for e in encoded]
    topk_ids = flat["topk_ids"].astype(np.int64)
    cols: dict[str, Any] = {
        "response": np.repeat(np.arange(len(encoded)), n_rows),
        "step": np.concatenate([np.arange(n) for n in n_rows]),
        "position": np.concatenate([np.arange(e.start, len(e.input_ids)) for e in encoded]),
        "token_id": flat["token_id"].astype(np.int64),
        "segment": np.concatenate([e.segment for e in encoded]).astype(np.int64),
        "role": np.concatenate([e.role for e in encoded]),
        "is_policy": np.concatenate([e.policy for e in encoded]).astype(bool),
        "reward": np.concatenate(reward_rows),
    }
    for key in ("logp", "ref_logp", "logz", "ref_logz", "kl"):
        cols[key] = flat[key].astype(np.float64)
    cols["token"] = [decode(i) for i in cols["token_id"]]
    cols["prob"] = np.exp(cols["logp"])
    cols["ref_prob"] = np.exp(cols["ref_logp"])
    cols["topk_ids"] = list(topk_ids)
    cols["topk_tokens"] = [[decode(i) for i in row] for row in topk_ids]
    cols["topk_logp"] = list(flat["topk_logp"].astype(np.float64))
    cols["topk_ref_logp"] = list(flat["topk_ref_logp"].astype(np.float64))
    cols["topk_prob"] = [np.exp(x) for x in cols["topk_logp"]]
    cols["topk_ref_prob"] = [np.exp(x) for x in cols["topk_ref_logp"]]
    return pd.DataFrame(cols)


def with_beta(df: pd.DataFrame, beta: float, *, horizon: int | None = None) -> pd.DataFrame:
    """Copy of a :func:`token_values` frame with beta-dependent columns recomputed for ``beta``.

    Q, V, A and top-k Q scale with beta; the residual also depends on the rewards, so it is
    recomputed by :func:`shiq_lab.losses.shiq_loss` on the frame's own numbers.
    """
    if not (isinstance(beta, (int, float)) and beta > 0):
        raise ValueError(f"beta={beta!r}: must be a number > 0 (the KL weight)")
    missing = {"response", "logp", "ref_logp", "logz", "ref_logz", "reward", "is_policy", "topk_logp", "topk_ref_logp"} - set(df.columns)
    if missing:
        raise ValueError(f"not a token_values frame: missing columns {sorted(missing)}")
    out = df.copy()
    out["log_ratio"] = out["logp"] - out["ref_logp"]
    out["v"] = beta * (out["logz"] - out["ref_logz"])
    out["advantage"] = beta * out["log_ratio"]
    # l = ln pi + logsumexp l, so Q = beta*(l - l_ref) = A + V without the raw logits
    out["q"] = out["advantage"] + out["v"]
    v = out["v"].to_numpy()
    out["topk_q"] = [beta * (a - b) + vi for a, b, vi in zip(out["topk_logp"], out["topk_ref_logp"], v)]
    out["residual"] = _residuals(out, beta, horizon)
    out.attrs.update(df.attrs)
    out.attrs.update({"beta": float(beta), "horizon": horizon})
    return out


def _residuals(df: pd.DataFrame, beta: float, horizon: int | None) -> np.ndarray:
    """ShiQ residuals of every response in the frame (NaN on environment tokens)."""
    responses = df["response"].to_numpy()
    order = np.unique(responses)
    lengths = [int((responses == r).sum()) for r in order]
    B, T = len(order), max(lengths)
    names = ("logp", "logz", "ref_logp", "ref_logz", "reward")
    grids = {k: torch.zeros((B, T), dtype=torch.float64) for k in names}
    mask = torch.zeros((B, T), dtype=torch.long)
    where = []
    for b, r in enumerate(order):
        rows = np.flatnonzero(responses == r)
        n = len(rows)
        for k in names:
            grids[k][b, :n] = torch.from_numpy(df[k].to_numpy()[rows].astype(np.float64))
        mask[b, :n] = torch.from_numpy(df["is_policy"].to_numpy()[rows].astype(np.int64))
        where.append(rows)
    res = shiq_loss(grids["logp"], grids["logz"], grids["ref_logp"], grids["ref_logz"], grids["reward"], mask,
                    beta=float(beta), horizon=horizon).residuals.numpy()
    out = np.full(len(df), np.nan)
    for b, rows in enumerate(where):
        vals = res[b, : len(rows)]
        out[rows] = np.where(mask[b, : len(rows)].numpy() == 1, vals, np.nan)
    return out


def reference_stats(
    reference: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: Prompt | Sequence[Prompt],
    responses: Response | Sequence[Response],
    *,
    candidates: int = 50,
    batch_size: int = 8,
    chunk_tokens: int = 512,
    add_eos: bool = False,
    end_of_turn: str | None = None,
) -> ReferenceStats:
    """Precompute what :func:`token_values` needs from a reference, so the reference can be unloaded.

    Stores ln pi_ref and logsumexp l_ref per response token, and the reference's ``candidates``
    most likely tokens per state (for the top-k alternatives' Q-values).
    """
    _check_sizes(1.0, candidates, batch_size, chunk_tokens)
    encoded = encode_responses(tokenizer, prompt, responses, add_eos=add_eos, end_of_turn=end_of_turn)
    source = _LogitSource(reference)
    stats = ReferenceStats([], [], [], [], [])
    with eval_mode(reference):
        for b0, flat in _score(source, None, encoded, pad_token_id(tokenizer), top_k=candidates, batch_size=batch_size,
                               chunk_tokens=chunk_tokens):
            group = encoded[b0 : b0 + batch_size]
            splits = np.cumsum([e.n_rows for e in group])[:-1]
            for e, lp, lz, ci, cl in zip(group, *(np.split(flat[k], splits) for k in ("logp", "logz", "topk_ids", "topk_logp"))):
                stats.token_ids.append(e.row_ids)
                stats.logp.append(lp.astype(np.float64))
                stats.logz.append(lz.astype(np.float64))
                stats.cand_ids.append(ci.astype(np.int64))
                stats.cand_logp.append(cl.astype(np.float64))
    return stats
