"""An ipywidgets explorer of token values: pick a row or type text, switch quantity, move beta, click tokens.

``TokenValueExplorer(models, tokenizer, reference=..., examples=...)`` is a widget (a VBox):

- *row*: an example of ``examples`` (dicts with ``prompt`` and ``response``, ``responses`` or
  ``chosen``/``rejected``; a DataFrame or a datasets.Dataset works too), or "custom": a typed
  prompt and one response per line, scored with the *Score* button;
- *quantity*: Q, V, advantage, reward, residual, log-ratio, KL (the token strip's colour);
- *beta*: recomputes the beta-dependent columns without a model call (:func:`with_beta`): it
  changes the units of Q, V, A and the residual, never the policy (π and the KL stay as they are);
- *checkpoint*: which of ``models`` is scored against the reference (compare before / after a fit);
  the selected token stays selected when the checkpoint changes;
- *difference*: another checkpoint to subtract, token by token (the strip then shows
  ``checkpoint - other``, on a diverging scale);
- *tokens*: one clickable button per token (coloured like the strip); a click shows that position's
  top-k alternatives and the value lines of its response.

Rows are labelled by their content (the first words of each response). Scores are cached per
(checkpoint, row), so switching back and forth is instant. Figures are shown with the
``plotly_mimetype`` renderer (JupyterLab, Notebook 7, VS Code), without a static copy; for copies
of an executed notebook, where no widget runs, :meth:`TokenValueExplorer.snapshot` gives the
current strip as static HTML.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ipywidgets as widgets
import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from shiq_lab.views.figures import (
    QUANTITIES,
    _scale,
    colour_of,
    display_token,
    token_html,
    token_strip,
    topk_bars,
    value_lines,
)
from shiq_lab.views.style import ENV_COLOUR, format_beta
from shiq_lab.views.token_values import token_values, with_beta

__all__ = ["DIFF_COLUMNS", "TokenValueExplorer", "difference", "normalise_examples"]

#: the renderer the explorer draws with (interactive only: a PNG copy per click would be slow)
EXPLORER_RENDERER = "plotly_mimetype"
_CUSTOM = -1
_NO_DIFF = ""
#: columns of a frame that a difference view subtracts (the others describe the token and stay)
DIFF_COLUMNS = ("q", "v", "advantage", "residual", "log_ratio", "kl", "prob")
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


def _text_of(message: Any) -> str:
    if isinstance(message, str):
        return message
    if isinstance(message, Mapping):
        return str(message.get("content", ""))
    return " ".join(_text_of(m) for m in message)  # a conversation: its turns in order


def _first_words(text: str, n: int) -> str:
    words = text.split()
    return " ".join(words[:n]) + (" …" if len(words) > n else "")


def _label(example: Mapping[str, Any], i: int, width: int = 70) -> str:
    """A row's label: its index and the first words of each response (rows often share their prompt)."""
    responses = [" ".join(_text_of(r).split()) for r in example["responses"]]
    # the words that tell the responses apart come after their common beginning
    common = 0
    if len(responses) > 1:
        for chars in zip(*responses):
            if len(set(chars)) > 1:
                break
            common += 1
        common = responses[0].rfind(" ", 0, common + 1) + 1 if common < min(map(len, responses)) else 0
    head = responses[0][:common]
    parts = [(head if k == 0 else "…") + r[common:] for k, r in enumerate(responses)] if common > 8 else responses
    text = " | ".join(_first_words(p, 6) for p in parts)
    return f"{i}: {text[:width]}{'…' if len(text) > width else ''}"


def _colour(value: float, zmax: float) -> str:
    """RdBu colour of a value on a symmetric scale (white at 0), as the strip draws it."""
    return colour_of(value, -zmax, zmax, "RdBu") if zmax > 0 else colour_of(value, -1.0, 1.0, "RdBu")


def difference(frame: pd.DataFrame, other: pd.DataFrame) -> pd.DataFrame:
    """``frame - other`` on the value columns, token by token (both frames score the same responses)."""
    if len(frame) != len(other) or not (frame["token_id"].to_numpy() == other["token_id"].to_numpy()).all():
        raise ValueError("the two frames do not score the same tokens: compare two checkpoints on the same row")
    out = frame.copy()
    for col in DIFF_COLUMNS:
        if col in out:
            out[col] = frame[col].to_numpy(dtype=float) - other[col].to_numpy(dtype=float)
    out.attrs.update(frame.attrs)
    return out


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
        self.shown: pd.DataFrame | None = None  # what the strip draws: the frame, or its difference to another checkpoint
        self.figure = None
        self.detail_figure = None
        self.lines_figure = None
        self.selected: tuple[int, int] = (0, 0)
        self.token_buttons: list[list[widgets.Button]] = []

        options = [(_label(ex, i), i) for i, ex in enumerate(self.examples)] + [("custom (type below)", _CUSTOM)]
        wide = widgets.Layout(width="auto", min_width="420px")
        self.row = widgets.Dropdown(options=options, value=options[0][1], description="row", layout=wide)
        self.prompt_box = widgets.Textarea(value=prompt or "", description="prompt", placeholder="prompt",
                                           layout=widgets.Layout(width="95%"))
        self.response_box = widgets.Textarea(value="\n".join(responses or []), description="responses",
                                             placeholder="one response per line", layout=widgets.Layout(width="95%"))
        self.score_button = widgets.Button(description="Score", button_style="primary", icon="play")
        self.quantity = widgets.ToggleButtons(options=[(label, key) for key, label in QUANTITIES.items()], value=quantity,
                                              description="quantity", style={"button_width": "auto"})
        self.beta = widgets.FloatLogSlider(value=beta, base=10, min=-3, max=1, step=0.05, description="β (units)",
                                           readout_format=".3g", continuous_update=False,
                                           style={"description_width": "initial"}, layout=widgets.Layout(width="420px"))
        self.beta_note = widgets.HTML(
            "<span style='font-size:13px;color:#555'>β only rescales Q, V, A and the residual into reward units "
            "(Q = β·(l − l<sub>ref</sub>)); the policy, its probabilities and its KL are unchanged.</span>")
        names = list(self.models)
        self.checkpoint = widgets.Dropdown(options=names, value=names[-1], description="checkpoint")
        self.compare = widgets.Dropdown(options=[("none", _NO_DIFF)] + [(f"minus {n}", n) for n in names], value=_NO_DIFF,
                                        description="difference", layout=widgets.Layout(width="auto"))
        self.status = widgets.HTML()
        self.picker = widgets.VBox()
        self.strip_out = widgets.Output()
        self.detail_out = widgets.Output()
        self.strip_out.add_class("shiq-strip")
        self.detail_out.add_class("shiq-detail")
        self.custom_box = widgets.VBox([self.prompt_box, self.response_box, self.score_button])

        self.row.observe(lambda _: self._refresh(keep_selection=False), names="value")
        self.checkpoint.observe(lambda _: self._refresh(keep_selection=True), names="value")
        self.compare.observe(lambda _: self._refresh(keep_selection=True), names="value")
        self.quantity.observe(lambda _: self._redraw(), names="value")
        self.beta.observe(lambda _: self._rebeta(), names="value")
        self.score_button.on_click(lambda _: self._score_custom())

        controls = widgets.HBox([self.row, self.checkpoint, self.compare], layout=widgets.Layout(flex_flow="row wrap"))
        super().__init__([controls, self.custom_box, self.quantity, widgets.HBox([self.beta, self.beta_note]),
                          self.status, self.strip_out,
                          widgets.HTML("<b>click a token</b> to see its alternatives (grey, dashed: environment tokens)"),
                          self.picker, self.detail_out])
        self.add_class("shiq-explorer")
        if self.row.value == _CUSTOM and self.response_box.value.strip():
            self._score_custom()
        else:
            self._refresh(keep_selection=False)

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
            self._refresh(keep_selection=False)

    def _scored(self, checkpoint: str, source: dict[str, Any]) -> pd.DataFrame:
        """The token values of ``source`` under ``checkpoint`` (cached), at the slider's beta."""
        key = (checkpoint, source.get("key", self.row.value))
        if key not in self._cache:
            self.status.value = "scoring…"
            self._cache[key] = token_values(
                self.models[checkpoint], self.tokenizer, source["prompt"], source["responses"],
                reference=self.reference, beta=self.beta.value, top_k=self.top_k,
                rewards=source["rewards"] if source["rewards"] is not None else self.rewards,
            )
        return with_beta(self._cache[key], self.beta.value, horizon=self._cache[key].attrs.get("horizon"))

    def _refresh(self, *, keep_selection: bool = True) -> None:
        """Score the current row with the current checkpoint (cached), then redraw.

        ``keep_selection``: keep the selected token when it exists in the new frame (a checkpoint
        switch scores the same tokens); a new row starts at its first token.
        """
        self.custom_box.layout.display = "" if self.row.value == _CUSTOM else "none"
        source = self._source()
        if source is None:
            self.frame = self.shown = None
            self.status.value = "type a prompt and responses, then press <b>Score</b>"
            return
        self.frame = self._scored(self.checkpoint.value, source)
        self._update_shown(source)
        r, s = self.selected
        if not (keep_selection and ((self.frame["response"] == r) & (self.frame["step"] == s)).any()):
            self.selected = (0, 0)
        diff = f" minus <b>{self.compare.value}</b>" if self.compare.value else " against the reference"
        self.status.value = f"{len(self.frame)} tokens · checkpoint <b>{self.checkpoint.value}</b>{diff}"
        self._build_picker()
        self._redraw()

    def _update_shown(self, source: dict[str, Any] | None = None) -> None:
        if self.frame is None:
            self.shown = None
            return
        if self.compare.value:
            other = self._scored(self.compare.value, source if source is not None else self._source())
            self.shown = difference(self.frame, other)
        else:
            self.shown = self.frame

    def _rebeta(self) -> None:
        if self.frame is not None:
            self.frame = with_beta(self.frame, self.beta.value, horizon=self.frame.attrs.get("horizon"))
            self._update_shown()
            self._redraw()

    # -- views ----------------------------------------------------------------------------------
    def _titles(self) -> list[str]:
        source = self._source()
        return list(source["titles"]) if source else []

    def _strip_title(self) -> str:
        q = QUANTITIES[self.quantity.value]
        beta = format_beta(self.beta.value)
        if self.compare.value:
            return f"Δ {q} (β={beta})<br><sup>{self.checkpoint.value} minus {self.compare.value}; grey: environment tokens</sup>"
        return f"{q} per token (β={beta})<br><sup>checkpoint {self.checkpoint.value}; grey: environment tokens</sup>"

    def _build_picker(self) -> None:
        self.token_buttons = []
        rows = []
        for r, title in enumerate(self._titles()):
            sub = self.frame[self.frame["response"] == r].sort_values("step").head(_MAX_BUTTONS)
            buttons = []
            for step, token in zip(sub["step"], sub["token"]):
                b = widgets.Button(description=display_token(token), layout=widgets.Layout(
                    width="auto", height="auto", margin="2px", padding="1px 6px"))
                b.style.font_size = "14px"
                b.on_click(lambda _, r=r, s=int(step): self.select(r, s))
                buttons.append(b)
            self.token_buttons.append(buttons)
            rows.append(widgets.VBox([widgets.HTML(f"<i>{title}</i>"),
                                      widgets.HBox(buttons, layout=widgets.Layout(flex_flow="row wrap"))]))
        self.picker.children = rows

    def _scale(self) -> tuple[float, float, str]:
        q = self.quantity.value
        shown = self.shown.loc[self.shown["is_policy"], q].to_numpy(dtype=float)
        return _scale(shown, q, None, signed=bool(self.compare.value) or None)

    def _colour_picker(self) -> None:
        q = self.quantity.value
        cmin, cmax, colorscale = self._scale()
        for r, buttons in enumerate(self.token_buttons):
            sub = self.shown[self.shown["response"] == r].sort_values("step")
            for b, value, pol, step in zip(buttons, sub[q].to_numpy(dtype=float), sub["is_policy"], sub["step"]):
                b.style.button_color = colour_of(value, cmin, cmax, colorscale) if pol else ENV_COLOUR
                b.style.font_style = "normal" if pol else "italic"  # environment tokens: grey and italic, never a value
                prefix = "Δ " if self.compare.value else ""
                b.tooltip = f"{prefix}{QUANTITIES[q]} = {value:+.4f}" if pol and np.isfinite(value) else "environment token"
                b.style.font_weight = "bold" if (r, int(step)) == self.selected else "normal"

    def _redraw(self) -> None:
        if self.frame is None:
            return
        self.figure = token_strip(self.shown, self.quantity.value, titles=self._titles(), title=self._strip_title(),
                                  signed=bool(self.compare.value) or None)
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

    def snapshot(self) -> Any:
        """The current strip as static HTML (an ``IPython.display.HTML``): what copies of an executed notebook show.

        Widgets need a live kernel; this needs nothing, so display it next to the explorer.
        """
        from IPython.display import HTML

        if self.shown is None:
            return HTML("<i>the explorer has nothing scored yet</i>")
        what = self._strip_title().replace("<br><sup>", "; ").replace("</sup>", "")
        caption = (f"Static snapshot of the explorer (row {self.row.label}; {what}). "
                   "The interactive explorer above needs a running kernel.")
        return HTML(token_html(self.shown, self.quantity.value, titles=self._titles(), caption=caption,
                               signed=bool(self.compare.value) or None))

    @staticmethod
    def _show(out: widgets.Output, figures: list) -> None:
        from IPython import get_ipython

        if get_ipython() is None:  # outside a kernel there is nothing to draw into; the figures stay as attributes
            return
        with out:
            out.clear_output(wait=True)
            for fig in figures:
                fig.show(renderer=EXPLORER_RENDERER)
