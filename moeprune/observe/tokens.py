"""``tokens``: the number of valid (non-padding) tokens the layer saw (combine: sum)."""

from __future__ import annotations

from .base import ROUTING, LayerForward, Observer, register_observer


@register_observer
class TokenCount(Observer):
    """tokens = |{t : attention_mask_t = 1}|, float64 scalar."""

    name = "tokens"
    entries = {"tokens": "sum"}
    needs = frozenset({ROUTING})

    def __init__(self, context):
        super().__init__(context)
        self.tokens = self.zeros()

    def update(self, forward: LayerForward) -> None:
        self.tokens += forward.num_valid.to(self.tokens.device)

    def result(self):
        return {"tokens": self.tokens.cpu()}
