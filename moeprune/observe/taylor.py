"""``taylor``: LLM-Pruner first-order Taylor saliency of every dense unit (opt-in; NOT mergeable).

Per decoder layer, float64, with dL/dW the gradient of the calibration loss (next-token
cross-entropy summed over the valid predicted tokens, :mod:`moeprune.calibration.backward`) over the
WHOLE calibration set, and a unit's elements those :mod:`moeprune.units` defines:

================  =========  ================================================================
entry             shape      value
================  =========  ================================================================
attn_taylor       [KV]       sum over KV group g's q/k/v rows, o columns, biases (and sinks) of |w * dL/dw|
mlp_taylor        [I]        sum over dense-MLP channel c's gate row, up row, down column of |w * dL/dw|
shared_taylor     [1, I_s]   the same for each channel of the layer's shared expert
================  =========  ================================================================

An entry exists on the layers that have such units (no ``attn_taylor`` for attention moeprune cannot
prune by heads: MLA, q/k norms across heads, no attention). Computed by
:class:`moeprune.calibration.taylor.TaylorCallback` in the layer-by-layer backward pass.

|.| of a sum is not the sum of |.|: the saliency of the union of two token sets is NOT a function of
the two sets' saliencies (the gradients would have to be summed first). So these entries do not
merge: ``RouterStats.merge`` (``moeprune stats merge``) refuses statistics holding them, and a
data-parallel (torchrun) pass refuses this observer. The combine rule below only satisfies the
registry.
"""

from __future__ import annotations

from .base import GRADIENTS, register_observer
from .dense import DenseObserver


@register_observer
class TaylorSaliency(DenseObserver):
    name = "taylor"
    entries = {"attn_taylor": "sum", "mlp_taylor": "sum", "shared_taylor": "sum"}
    needs = frozenset({GRADIENTS})
    #: statistics of disjoint token sets cannot be combined (see the module docstring)
    mergeable = False
