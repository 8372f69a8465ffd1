"""``shared_max_abs_output[i]``: largest |output| of shared expert i over valid tokens and channels
(super experts; combine: max). Only layers with shared experts produce it."""

from __future__ import annotations

import torch

from .base import ROUTING, SHARED_OUTPUTS, LayerForward, Observer, register_observer


@register_observer
class SharedOutputPeak(Observer):
    name = "shared_outputs"
    entries = {"shared_max_abs_output": "max"}
    needs = frozenset({ROUTING, SHARED_OUTPUTS})

    def __init__(self, context):
        super().__init__(context)
        self.peak = self.zeros(context.num_shared)

    def update(self, forward: LayerForward) -> None:
        for index, output in enumerate(forward.shared_outputs):
            flat = output.reshape(-1, output.shape[-1])[forward.valid]
            if flat.numel():
                self.peak[index] = torch.maximum(self.peak[index], flat.abs().amax().double().to(self.peak.device))

    def result(self):
        return {"shared_max_abs_output": self.peak.cpu()} if self.context.num_shared else {}
