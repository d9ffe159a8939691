"""A causal-LM stand-in for sampling / evaluation tests: its logits depend only on the position.

``FakeLM(table)`` returns ``table[position]`` as the logits of the state at that position (the
state before the token at ``position + 1``), so token distributions, and hence exact KLs and
where EOS falls, are known in closed form.
"""

from types import SimpleNamespace

import torch

#: a logit that makes a token impossible without producing inf - inf = nan in log-ratios
NEVER = -1e9


class FakeLM(torch.nn.Module):
    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.float(), requires_grad=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=False, **kwargs):
        if position_ids is None:
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.table[position_ids.clamp(max=self.table.shape[0] - 1)]
        return SimpleNamespace(logits=logits, cache=("unused",))


def constant_table(probs: dict[int, float], vocab: int, positions: int = 256) -> torch.Tensor:
    """[positions, vocab] logits giving the same distribution ``{token: prob}`` at every position."""
    row = torch.full((vocab,), NEVER)
    for token, p in probs.items():
        row[token] = float(torch.log(torch.tensor(p)))
    return row.expand(positions, vocab).clone()
