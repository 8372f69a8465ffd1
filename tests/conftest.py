"""Shared fixtures: calibration text and tiny random checkpoints of every supported family.

Everything is built locally (no downloads) and cached for the whole session, so a checkpoint or a
statistics artifact is made once however many tests use it. Tests must not modify what these
fixtures return (copy first).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from moeprune.tiny import TINY_FAMILIES, save_tiny_checkpoint
from moeprune.tokenizer import _tiny_corpus

# The models are tiny: extra intra-op threads only add contention (on a shared 2-core machine a
# 2-thread matmul of a 32x16 matrix can wait ~100 ms for a core). Results do not depend on it.
torch.set_num_threads(1)

#: Calibration size used throughout the core tests (small, so the suite stays fast).
SEQ_LEN = 32
SAMPLES = 4


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    """A .txt calibration file: the built-in tiny corpus, one document per blank-line block."""
    path = tmp_path_factory.mktemp("calibration") / "calib.txt"
    path.write_text("\n\n".join(_tiny_corpus()) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory ``tiny_checkpoint(family, seed=0, **config_overrides) -> Path`` (cached per session).

    Saves a tiny random model of ``family`` (safetensors + config + tiny tokenizer) into its own
    temporary folder the first time a combination is asked for.
    """
    cache: dict[tuple, object] = {}

    def make(family: str, seed: int = 0, **overrides):
        key = (family, seed, tuple(sorted(overrides.items())))
        if key not in cache:
            label = "-".join([family, f"seed{seed}", *(f"{k}{v}" for k, v in sorted(overrides.items()))])
            folder = tmp_path_factory.mktemp(re.sub(r"[^\w.-]", "_", label))
            cache[key] = save_tiny_checkpoint(family, folder, seed=seed, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session", params=TINY_FAMILIES)
def family_checkpoint(request, tiny_checkpoint):
    """``(family, checkpoint folder)`` for every family in TINY_FAMILIES (parametrised)."""
    return request.param, tiny_checkpoint(request.param)


@pytest.fixture(scope="session")
def calibration(tiny_checkpoint, calib_file):
    """Factory ``calibration(family) -> CalibrationBatch``: packed SAMPLES x SEQ_LEN tokens (cached)."""
    from moeprune import api

    cache = {}

    def make(family: str):
        if family not in cache:
            cache[family] = api.calibration_data(tiny_checkpoint(family), calib_file, samples=SAMPLES, seq_len=SEQ_LEN)
        return cache[family]

    return make


@pytest.fixture(scope="session")
def family_stats(tiny_checkpoint, calibration):
    """Factory ``family_stats(family, **config_overrides) -> RouterStats`` on the packed batch (cached).

    Whole-model mode (faster for tiny models); sequential == whole is tested separately.
    """
    from moeprune.calibration.engine import collect_stats

    cache = {}

    def make(family: str, **overrides):
        key = (family, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = collect_stats(
                tiny_checkpoint(family, **overrides), calibration(family), mode="whole", batch_size=2, progress=False
            )
        return cache[key]

    return make
