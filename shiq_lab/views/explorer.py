"""An ipywidgets explorer of token values: pick a row or type text, switch quantity, move beta, click tokens.

``TokenValueExplorer(models, tokenizer, reference=..., examples=...)`` is a widget (a VBox):

- *row*: an example of ``examples`` (dicts with ``prompt`` and ``response``, ``responses`` or
  ``chosen``/``rejected``; a DataFrame or a datasets.Dataset works too), or "custom": a typed
  prompt and one response per line, scored with the *Score* button;
- *quantity*: Q, V, advantage, reward, residual, log-ratio, KL (the token strip's colour);
- *beta*: recomputes the beta-dependent columns without a model call (:func:`with_beta`);
- *checkpoint*: which of ``models`` is scored against the reference (compare before / after a fit);
- *tokens*: one clickable button per token (coloured like the strip); a click shows that position's
  top-k alternatives and the value lines of its response.

Scores are cached per (checkpoint, row), so switching back and forth is instant. Figures are shown
with the ``plotly_mimetype`` renderer (JupyterLab, Notebook 7, VS Code), without a PNG copy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ipywidgets as widgets
import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from shiq_lab.views.figures import QUANTITIES, display_token, token_strip, topk_bars, value_lines
from shiq_lab.views.token_values import token_values, with_beta

__all__ = ["TokenValueExplorer", "normalise_examples"]

#: the renderer the explorer draws with (interactive only: a PNG copy per click would be slow)
EXPLORER_RENDERER = "plotly_mimetype"
_CUSTOM = -1
_MAX_BUTTONS = 400  # tokens per response with a clickable button; longer responses are cut in the picker


def normalise_examples(examples: Any) -> list[dict[str, Any]]:
    """Examples as dicts ``{"prompt", "responses", "titles", "rewards"}``, whatever their input form."""
    if examples is None:
        return []
    if isinstance(examples, pd.DataFrame):
        examples = examples.to_dict("records")
    out = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, Mapping) or "prompt" not in ex:
            raise ValueError(f"examples[{i}] must be a mapping with a 'prompt' and 'response', 'responses' or "
                             "'chosen'/'rejected'")
        if "chosen" in ex and "rejected" in ex:
            responses, titles = [ex["chosen"], ex["rejected"]], ["chosen", "rejected"]
        elif "responses" in ex:
            responses = list(ex["responses"])
            titles = [f"response {k}" for k in range(len(responses))]
        elif "response" in ex:
            responses, titles = [ex["response"]], ["response"]
        else:
            raise ValueError(f"examples[{i}] has no 'response', 'responses' or 'chosen'/'rejected'")
        out.append({"prompt": ex["prompt"], "responses": responses, "titles": titles, "rewards": ex.get("rewards")})
    return out


def _label(example: Mapping[str, Any], i: int) -> str:
    prompt = example["prompt"]
    text = prompt if isinstance(prompt, str) else str(prompt[-1].get("content", ""))
    text = " ".join(text.split())
    return f"{i}: {text[:50]}{'…' if len(text) > 50 else ''}"


def _colour(value: float, zmax: float) -> str:
    """RdBu-like colour of a value on a symmetric scale (white at 0)."""
    if not np.isfinite(value):
        return "#d9d9d9"
    x = float(np.clip(value / zmax, -1.0, 1.0)) if zmax > 0 else 0.0
    red, blue = np.array([178, 24, 43]), np.array([33, 102, 172])
    end = blue if x > 0 else red
    rgb = (255 + (end - 255) * abs(x)).round().astype(int)
    return "#%02x%02x%02x" % tuple(rgb)


class TokenValueExplorer(widgets.VBox):
    """Interactive view of a model's token values against a reference (see the module docstring)."""

    def __init__(
        self,
        models: Mapping[str, torch.nn.Module] | torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        reference: Any = None,
        examples: Any = None,
        prompt: str | None = None,
        responses: Sequence[str] | None = None,
        rewards: Callable[[Sequence[int]], Sequence[float]] | None = None,
        beta: float = 0.1,
        top_k: int = 5,
        quantity: str = "advantage",
        chat: bool | None = None,
    ) -> None:
        if quantity not in QUANTITIES:
            raise ValueError(f"quantity={quantity!r}: choose one of {', '.join(QUANTITIES)}")
        self.models = dict(models) if isinstance(models, Mapping) else {"model": models}
        if not self.models:
            raise ValueError("models is empty: give a model, or a dict name -> model")
        self.tokenizer = tokenizer
        self.reference = reference
        self.rewards = rewards
        self.top_k = top_k
        self.chat = chat if chat is not None else getattr(tokenizer, "chat_template", None) is not None
        self.examples = normalise_examples(examples)
        self._cache: dict[tuple[str, Any], pd.DataFrame] = {}
        self._custom: dict[str, Any] | None = None
        self.frame: pd.DataFrame | None = None
        self.figure = None
        self.detail_figure = None
        self.lines_figure = None
        self.selected: tuple[int, int] = (0, 0)
        self.token_buttons: list[list[widgets.Button]] = []

        options = [(_label(ex, i), i) for i, ex in enumerate(self.examples)] + [("custom (type below)", _CUSTOM)]
        self.row = widgets.Dropdown(options=options, value=options[0][1], description="row")
        self.prompt_box = widgets.Textarea(value=prompt or "", description="prompt", placeholder="prompt",
                                           layout=widgets.Layout(width="95%"))
        self.response_box = widgets.Textarea(value="\n".join(responses or []), description="responses",
                                             placeholder="one response per line", layout=widgets.Layout(width="95%"))
        self.score_button = widgets.Button(description="Score", button_style="primary", icon="play")
        self.quantity = widgets.ToggleButtons(options=[(label, key) for key, label in QUANTITIES.items()], value=quantity,
                                              description="quantity", style={"button_width": "auto"})
        self.beta = widgets.FloatLogSlider(value=beta, base=10, min=-3, max=1, step=0.05, description="β",
                                           readout_format=".3g", continuous_update=False)
        names = list(self.models)
        self.checkpoint = widgets.Dropdown(options=names, value=names[-1], description="checkpoint")
        self.status = widgets.HTML()
        self.picker = widgets.VBox()
        self.strip_out = widgets.Output()
        self.detail_out = widgets.Output()
        self.strip_out.add_class("shiq-strip")
        self.detail_out.add_class("shiq-detail")
        self.custom_box = widgets.VBox([self.prompt_box, self.response_box, self.score_button])

        self.row.observe(lambda _: self._refresh(), names="value")
        self.checkpoint.observe(lambda _: self._refresh(), names="value")
        self.quantity.observe(lambda _: self._redraw(), names="value")
        self.beta.observe(lambda _: self._rebeta(), names="value")
        self.score_button.on_click(lambda _: self._score_custom())

        controls = widgets.HBox([self.row, self.checkpoint])
        super().__init__([controls, self.custom_box, self.quantity, self.beta, self.status, self.strip_out,
                          widgets.HTML("<b>click a token</b> to see its alternatives"), self.picker, self.detail_out])
        self.add_class("shiq-explorer")
        if self.row.value == _CUSTOM and self.response_box.value.strip():
            self._score_custom()
        else:
            self._refresh()

    # -- data -----------------------------------------------------------------------------------
    def _source(self) -> dict[str, Any] | None:
        if self.row.value == _CUSTOM:
            return self._custom
        return self.examples[self.row.value]

    def _score_custom(self) -> None:
        responses = [line for line in self.response_box.value.splitlines() if line.strip()]
        if not responses:
            self.status.value = "<span style='color:#b2182b'>type at least one response (one per line)</span>"
            return
        prompt = self.prompt_box.value
        if self.chat:
            prompt = [{"role": "user", "content": prompt}]
        self._custom = {"prompt": prompt, "responses": responses, "titles": [f"response {k}" for k in range(len(responses))],
                        "rewards": None, "key": ("custom", self.prompt_box.value, tuple(responses))}
        if self.row.value != _CUSTOM:
            self.row.value = _CUSTOM  # triggers _refresh
        else:
            self._refresh()

    def _refresh(self) -> None:
        """Score the current row with the current checkpoint (cached), then redraw."""
        self.custom_box.layout.display = "" if self.row.value == _CUSTOM else "none"
        source = self._source()
        if source is None:
            self.frame = None
            self.status.value = "type a prompt and responses, then press <b>Score</b>"
            return
        key = (self.checkpoint.value, source.get("key", self.row.value))
        if key not in self._cache:
            self.status.value = "scoring…"
            self._cache[key] = token_values(
                self.models[self.checkpoint.value], self.tokenizer, source["prompt"], source["responses"],
                reference=self.reference, beta=self.beta.value, top_k=self.top_k,
                rewards=source["rewards"] if source["rewards"] is not None else self.rewards,
            )
        self.frame = with_beta(self._cache[key], self.beta.value, horizon=self._cache[key].attrs.get("horizon"))
        self.selected = (0, 0)
        self.status.value = f"{len(self.frame)} tokens · checkpoint <b>{self.checkpoint.value}</b> against the reference"
        self._build_picker()
        self._redraw()

    def _rebeta(self) -> None:
        if self.frame is not None:
            self.frame = with_beta(self.frame, self.beta.value, horizon=self.frame.attrs.get("horizon"))
            self._redraw()

    # -- views ----------------------------------------------------------------------------------
    def _titles(self) -> list[str]:
        source = self._source()
        return list(source["titles"]) if source else []

    def _build_picker(self) -> None:
        self.token_buttons = []
        rows = []
        for r, title in enumerate(self._titles()):
            sub = self.frame[self.frame["response"] == r].sort_values("step").head(_MAX_BUTTONS)
            buttons = []
            for step, token in zip(sub["step"], sub["token"]):
                b = widgets.Button(description=display_token(token), layout=widgets.Layout(width="auto", height="26px",
                                                                                           margin="1px", padding="0 4px"))
                b.on_click(lambda _, r=r, s=int(step): self.select(r, s))
                buttons.append(b)
            self.token_buttons.append(buttons)
            rows.append(widgets.VBox([widgets.HTML(f"<i>{title}</i>"),
                                      widgets.HBox(buttons, layout=widgets.Layout(flex_flow="row wrap"))]))
        self.picker.children = rows

    def _colour_picker(self) -> None:
        q = self.quantity.value
        shown = self.frame.loc[self.frame["is_policy"], q].to_numpy(dtype=float)
        finite = np.abs(shown[np.isfinite(shown)])
        zmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        for r, buttons in enumerate(self.token_buttons):
            sub = self.frame[self.frame["response"] == r].sort_values("step")
            for b, value, pol, step in zip(buttons, sub[q].to_numpy(dtype=float), sub["is_policy"], sub["step"]):
                b.style.button_color = _colour(value, zmax) if pol else "#d9d9d9"
                b.tooltip = f"{QUANTITIES[q]} = {value:+.4f}" if np.isfinite(value) else "environment token"
                b.style.font_weight = "bold" if (r, int(step)) == self.selected else "normal"

    def _redraw(self) -> None:
        if self.frame is None:
            return
        self.figure = token_strip(self.frame, self.quantity.value, titles=self._titles())
        self._colour_picker()
        self._show(self.strip_out, [self.figure])
        self._redraw_detail()

    def _redraw_detail(self) -> None:
        r, s = self.selected
        self.detail_figure = topk_bars(self.frame, r, s)
        self.lines_figure = value_lines(self.frame, r)
        self._show(self.detail_out, [self.detail_figure, self.lines_figure])

    def select(self, response: int, step: int) -> None:
        """Show the alternatives at ``step`` of ``response`` (what a token click does)."""
        if self.frame is None:
            return
        if not ((self.frame["response"] == response) & (self.frame["step"] == step)).any():
            raise ValueError(f"no token at response={response}, step={step}")
        self.selected = (response, step)
        self._colour_picker()
        self._redraw_detail()

    @staticmethod
    def _show(out: widgets.Output, figures: list) -> None:
        from IPython import get_ipython

        if get_ipython() is None:  # outside a kernel there is nothing to draw into; the figures stay as attributes
            return
        with out:
            out.clear_output(wait=True)
            for fig in figures:
                fig.show(renderer=EXPLORER_RENDERER)
