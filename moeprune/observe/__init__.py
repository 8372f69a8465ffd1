"""Observers: one mergeable accumulator per calibration statistic (see :mod:`.base`).

Importing the package registers every observer below; the registration order is the order of
:data:`OBSERVERS` and of a pass's results.
"""

from .base import (  # noqa: F401
    ALWAYS,
    DERIVED_ENTRIES,
    ENTRY_OWNERS,
    ENTRY_RULES,
    OBSERVERS,
    SIGNALS,
    SUPPORTED_SIGNALS,
    LayerContext,
    LayerForward,
    Observer,
    RoutedPairs,
    check_observers_fit,
    observer_names,
    observers_for_entries,
    register_observer,
    resolve_observers,
    signals_needed,
)
from . import tokens, routing, coactivation, expert_outputs, easy_ep, tcess, shared, similarity, heapr  # noqa: F401,E402  (registration)
from . import dense  # noqa: F401,E402  (registration; observers of every decoder layer)
from .dense import DenseInstrumentation, DenseSettings, dense_settings_for, is_dense_observer  # noqa: F401,E402
from . import naee, skip  # noqa: F401,E402  (registration; opt-in)
from . import neurons  # noqa: F401,E402  (registration; opt-in)
from . import taylor  # noqa: F401,E402  (registration; dense, gradients, not mergeable)
from .easy_ep import easy_ep_token_weight  # noqa: F401,E402
from .tcess import (  # noqa: F401,E402
    TCESS_BINS,
    derive_tcess,
    tcess_from_histogram,
    tcess_of_logits,
    tcess_pool_size,
    tcess_transform,
)
