"""moeprune: exact, memory-bounded expert pruning for Mixture-of-Experts language models.

``moeprune.load_profile(model_dir, profile)`` and ``moeprune.load_with_experts(model_dir, kept)``
build a model that holds only the kept experts; ``moeprune.load(model_dir)`` loads any checkpoint
moeprune writes, including layouts a stock config cannot express (:mod:`moeprune.structure`); they
are imported on first use, so ``import moeprune`` stays light.
"""

__version__ = "0.1.0"

_LAZY = {"load": "moeprune.loader", "load_profile": "moeprune.profiles", "load_with_experts": "moeprune.loader"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moeprune' has no attribute {name!r}")
