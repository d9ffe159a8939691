"""The synthetic tasks and behaviour datasets of the benchmark (seeded, regenerated on demand).

Three token-tree tasks, each with a known exact optimum (:func:`shiq_lab.exact.tree.solve`):

- ``sparse``: a single score on the last token of each response (sequence-level reward).
- ``token``: a reward on every token (credit assignment matters).
- ``multiturn``: mixed rewards, and at one response position the environment picks the token
  (mask 0, no choice, no KL): the policy acts, the "user" answers, the policy acts again.

Four behaviour policies produce the offline data: ``reference`` (pi_ref, on-policy for the
sequence methods at the start), ``uniform``, ``skewed`` (pi_ref tilted far away, see
:func:`~shiq_lab.exact.tree.skewed_policy`) and ``mix`` (each path drawn from one of the three
others at random). Datasets are nested: the first n rows of the largest dataset are the dataset of
size n, so a data-efficiency sweep changes only the amount of data.

``python -m shiq_lab.tasks.synthetic synthetic-data`` writes these datasets to ``data/synthetic/`` as
safetensors files (:func:`write_datasets`); :func:`load_datasets` reads them back exactly.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from shiq_lab.exact.tree import (
    OfflineDataset,
    TokenTree,
    make_token_tree,
    sample_dataset,
    skewed_policy,
    uniform_log_probs,
)

__all__ = [
    "TASKS",
    "BEHAVIOURS",
    "TaskSpec",
    "task_specs",
    "make_task_tree",
    "behaviour_log_probs",
    "behaviour_dataset",
    "write_datasets",
    "load_datasets",
    "dataset_fingerprint",
]

TASKS = ("sparse", "token", "multiturn")
BEHAVIOURS = ("reference", "uniform", "skewed", "mix")
_MIX_PARTS = ("reference", "uniform", "skewed")


@dataclass(frozen=True)
class TaskSpec:
    """Arguments of :func:`~shiq_lab.exact.tree.make_token_tree` for one task."""

    name: str
    reward: str
    vocab_size: int
    horizon: int
    num_prompts: int
    env_depths: tuple[int, ...] = ()

    def describe(self) -> str:
        env = f", environment picks position {list(self.env_depths)}" if self.env_depths else ""
        return f"{self.reward} reward, vocab {self.vocab_size} (EOS incl.), horizon {self.horizon}, {self.num_prompts} prompts{env}"


def task_specs(scale: str = "full") -> dict[str, TaskSpec]:
    """The three tasks at ``scale`` ``"full"`` (30-40 states, 62 responses per tree) or ``"quick"`` (14-18 states)."""
    if scale == "full":
        v, h, p, h_env = 3, 4, 2, 5
    elif scale == "quick":
        v, h, p, h_env = 3, 3, 2, 4
    else:
        raise ValueError(f"scale={scale!r}: choose 'full' or 'quick'")
    return {
        "sparse": TaskSpec("sparse", "terminal", v, h, p),
        "token": TaskSpec("token", "token", v, h, p),
        "multiturn": TaskSpec("multiturn", "mixed", v, h_env, p, env_depths=(h_env - 3,)),
    }


def make_task_tree(spec: TaskSpec, seed: int) -> TokenTree:
    """The task's token tree for ``seed`` (a different random tree, references and rewards per seed)."""
    return make_token_tree(spec.vocab_size, spec.horizon, spec.num_prompts, reward=spec.reward,
                           env_depths=spec.env_depths, seed=seed)


def behaviour_log_probs(tree: TokenTree, behaviour: str, *, seed: int = 0) -> torch.Tensor:
    """[N, V] log-probs of a single behaviour policy (``mix`` is a mixture of paths, not of states)."""
    if behaviour == "reference":
        return tree.ref_log_probs
    if behaviour == "uniform":
        return uniform_log_probs(tree)
    if behaviour == "skewed":
        return skewed_policy(tree, strength=3.0, seed=seed + 1)
    raise ValueError(f"behaviour={behaviour!r}: choose one of {list(_MIX_PARTS)} (or 'mix' in behaviour_dataset)")


def behaviour_dataset(tree: TokenTree, behaviour: str, size: int, *, seed: int) -> OfflineDataset:
    """``size`` paths of ``behaviour`` (one of :data:`BEHAVIOURS`); prefixes are the smaller datasets."""
    if behaviour not in BEHAVIOURS:
        raise ValueError(f"behaviour={behaviour!r}: choose one of {list(BEHAVIOURS)}")
    data_seed = 10_000 + 97 * seed + BEHAVIOURS.index(behaviour)
    if behaviour != "mix":
        return sample_dataset(tree, behaviour_log_probs(tree, behaviour, seed=seed), size, seed=data_seed)
    parts = [sample_dataset(tree, behaviour_log_probs(tree, b, seed=seed), size, seed=data_seed + 1 + i)
             for i, b in enumerate(_MIX_PARTS)]
    which = torch.randint(len(parts), (size,), generator=torch.Generator().manual_seed(data_seed))
    rows = torch.arange(size)
    pick = lambda field: torch.stack([getattr(p, field) for p in parts])[which, rows]  # noqa: E731
    return OfflineDataset(*(pick(f) for f in ("states", "actions", "rewards", "mask", "prompts", "lengths")))


def dataset_fingerprint(data: OfflineDataset) -> str:
    """Short sha256 of a dataset's paths (states, actions), to tell datasets apart in results."""
    h = hashlib.sha256()
    h.update(data.states.to(torch.int64).numpy().tobytes())
    h.update(data.actions.to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


def _canonical_header(path: Path) -> None:
    """Rewrite a safetensors header with its metadata keys sorted, in place.

    safetensors serialises the metadata from a Rust ``HashMap``, whose order changes from one process
    to the next: without this the same tensors give different bytes (and a dirty tree) on every run.
    The reordered header has the same length, so the data offsets do not move.
    """
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:  # cannot happen for a permutation of the same keys; keep the file as written
        return
    path.write_bytes(raw[:8] + text + b" " * (n - len(text)) + raw[8 + n:])


_TREE_FIELDS = ("ref_logits", "rewards", "next_state", "depth", "prompt", "roots", "env_action")


def write_datasets(out_dir: str | Path, *, scale: str = "full", seeds: list[int] = [0, 1, 2], size: int = 2048) -> Path:  # noqa: B006
    """Write every task's tree and behaviour datasets, one safetensors file per (task, seed).

    Each file holds the tree tables (``tree.*``) and, per behaviour, the paths (``<behaviour>.states``,
    ``.actions``, ``.prompts``, ``.lengths``; rewards and masks follow from the tree). A
    ``manifest.json`` lists the task arguments and each dataset's fingerprint. Returns the manifest path.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"scale": scale, "seeds": list(seeds), "size": size, "behaviours": list(BEHAVIOURS), "files": {},
                      "torch": torch.__version__.split("+")[0]}
    for name, spec in task_specs(scale).items():
        for seed in seeds:
            tree = make_task_tree(spec, seed)
            tensors = {f"tree.{f}": getattr(tree, f).contiguous() for f in _TREE_FIELDS}
            prints = {}
            for b in BEHAVIOURS:
                data = behaviour_dataset(tree, b, size, seed=seed)
                tensors[f"{b}.states"] = data.states.to(torch.int16)
                tensors[f"{b}.actions"] = data.actions.to(torch.int8)
                tensors[f"{b}.prompts"] = data.prompts.to(torch.int16)
                tensors[f"{b}.lengths"] = data.lengths.to(torch.int8)
                prints[b] = dataset_fingerprint(data)
            fname = f"{name}_seed{seed}.safetensors"
            save_file(tensors, str(out / fname), metadata={"task": json.dumps(asdict(spec)), "seed": str(seed)})
            _canonical_header(out / fname)
            manifest["files"][fname] = {"task": asdict(spec), "seed": seed, "fingerprints": prints}
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def _prefixes(next_state: torch.Tensor, roots: torch.Tensor, num_states: int) -> list[tuple[int, ...]]:
    prefixes: list[tuple[int, ...] | None] = [None] * num_states
    stack = [(int(r), ()) for r in roots]
    while stack:
        s, pre = stack.pop()
        prefixes[s] = pre
        for a, child in enumerate(next_state[s].tolist()):
            if child >= 0:
                stack.append((child, pre + (a,)))
    return [p if p is not None else () for p in prefixes]


def load_datasets(path: str | Path) -> tuple[TokenTree, dict[str, OfflineDataset]]:
    """Read one file of :func:`write_datasets`: the tree and its datasets by behaviour."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- safe_open is not iterable
    spec = json.loads(meta["task"])
    tab = {k: t[f"tree.{k}"] for k in _TREE_FIELDS}
    eos = spec["vocab_size"] - 1
    tree = TokenTree(prefixes=_prefixes(tab["next_state"], tab["roots"], tab["ref_logits"].shape[0]),
                     eos=eos, horizon=spec["horizon"], **tab)
    datasets = {}
    for b in BEHAVIOURS:
        states = t[f"{b}.states"].long()
        actions = t[f"{b}.actions"].long()
        live = states >= 0
        safe = states.clamp(min=0)
        rewards = torch.where(live, tree.rewards[safe, actions], torch.zeros((), dtype=tree.rewards.dtype))
        mask = (live & tree.policy_states[safe]).to(tree.rewards.dtype)
        datasets[b] = OfflineDataset(states, actions, rewards, mask, t[f"{b}.prompts"].long(), t[f"{b}.lengths"].long())
    return tree, datasets
