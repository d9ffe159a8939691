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



class ScriptedLM(torch.nn.Module):
    """A chat "model" that answers from a script: ``answers(context, turn) -> [(probability, text), ...]``.

    ``context`` is the decoded conversation before the current assistant turn and ``turn`` the number of
    assistant turns before it (both read from the tokens: the chat template's generation prompt marks a turn).
    Among the answers whose token ids start with the ids generated so far, the probability is shared by
    their next id (EOS once an answer is complete): a trie policy, so greedy decoding writes the most probable
    answer and sampling picks each answer with its probability. Padding never matters: a row's history is
    its attended tokens (``attention_mask``) and the cache is that history. Only the last position's logits
    are filled (what sampling reads).
    """

    def __init__(self, tokenizer, answers):
        super().__init__()
        self.tokenizer, self.answers, self.vocab = tokenizer, answers, len(tokenizer)
        user = [{"role": "user", "content": "x"}]
        bare = tokenizer.apply_chat_template(user, tokenize=False)
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        self.marker = tokenizer(prompt[len(bare):], add_special_tokens=False)["input_ids"]
        self.eos_id = tokenizer.eos_token_id
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # a device to live on
        self._memo = {}

    def _scripted(self, context):
        key = tuple(context)
        if key not in self._memo:
            m = len(self.marker)
            turn = sum(context[i:i + m] == self.marker for i in range(len(context) - m + 1)) - 1
            text = self.tokenizer.decode(context[:len(context) - m])
            self._memo[key] = [(float(p), self.tokenizer(a, add_special_tokens=False)["input_ids"])
                               for p, a in self.answers(text, turn)]
        return self._memo[key]

    def _next(self, history):
        m = len(self.marker)
        starts = [i + m for i in range(len(history) - m + 1) if history[i:i + m] == self.marker]
        weight = {}
        if starts:
            generated = history[starts[-1]:]
            for p, ids in self._scripted(history[:starts[-1]]):
                if ids[:len(generated)] == generated:
                    token = ids[len(generated)] if len(ids) > len(generated) else self.eos_id
                    weight[token] = weight.get(token, 0.0) + p
        row = torch.full((self.vocab,), NEVER)
        for token, p in (weight or {self.eos_id: 1.0}).items():
            row[token] = float(torch.log(torch.tensor(p)))
        return row

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=False, **kwargs):
        ids = input_ids.tolist()
        if cache is None:
            mask = attention_mask.tolist() if attention_mask is not None else [[1] * len(r) for r in ids]
            history = [[t for t, a in zip(r, mr) if a] for r, mr in zip(ids, mask)]
        else:
            history = [h + r for h, r in zip(cache, ids)]
        logits = torch.zeros(len(ids), len(ids[0]), self.vocab)
        logits[:, -1] = torch.stack([self._next(h) for h in history])
        return SimpleNamespace(logits=logits, cache=history)
