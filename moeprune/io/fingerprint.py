"""Architecture fingerprint of a checkpoint: its config and tensor layout, independent of its weights.

The weights fingerprint (:meth:`moeprune.io.checkpoint.LazyCheckpoint.fingerprint`) also samples
tensor bytes, so two trainings of one architecture differ; profiles (:mod:`moeprune.profiles`) check
this architecture fingerprint strictly and the weights fingerprint with a warning only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .checkpoint import CONFIG_NAME, LazyCheckpoint, config_bytes


def architecture_fingerprint(model_dir: str | Path) -> str:
    """16 hex digits of sha256 over config.json (volatile keys left out) and every tensor's
    (name, shape, dtype): the model's architecture, independent of its weights."""
    with LazyCheckpoint(model_dir) as checkpoint:
        config = config_bytes(checkpoint.path / CONFIG_NAME)
        listing = [[n, list(checkpoint.shape(n)), str(checkpoint.dtype(n))] for n in checkpoint.keys()]
    digest = hashlib.sha256(b"moeprune-architecture-v1\0")
    digest.update(config)
    digest.update(json.dumps(listing, separators=(",", ":")).encode("utf-8"))
    return digest.hexdigest()[:16]

