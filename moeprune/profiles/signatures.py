"""Router signatures of token sets: PreMoe's TCESS vector and the mean router logits (pure), the
:class:`SignatureExtractor` that computes them from the first decoder layers only, and the
calibration windows a profile stores.

The extractor runs the calibration engine's prologue (:func:`moeprune.arch.build_skeleton`,
:func:`moeprune.calibration.engine.load_module_weights` and
:func:`moeprune.calibration.engine.capture_layer_inputs`) and the collector's TCESS formula
(:func:`moeprune.observe.tcess.tcess_of_logits`, same pool and probability grid), so a signature
equals the statistics' ``tcess / tokens`` on the same tokens (tested).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..api import load_tokenizer
from ..arch import build_skeleton, decoder_layers, family_for_model_type, moe_layer_indices, read_config
from ..calibration.engine import (LayerCarry, LayerLoop, capture_layer_inputs, layer_accumulator, load_input_embeddings,
                                  load_module_weights)
from ..collect import prepare_experts_implementation
from ..io.checkpoint import LazyCheckpoint
from ..observe.tcess import TCESS_BINS, tcess_of_logits
from .settings import SIGNATURE_KINDS, ProfileError

logger = logging.getLogger(__name__)


def tcess_signature(logits: torch.Tensor, pool: int, r: float | None = None, bins: int = TCESS_BINS) -> torch.Tensor:
    """PreMoe's TCESS vector of one token set, the retrieval key of a prompt or a task.

    ``sig[j] = (1/T) sum_t 1[j in P_t and p_tj >= r] f(z_tj)`` with z_t the router logits of token
    t ([T, E]), P_t its top-``pool`` experts by logit, p_t = softmax over the pooled logits,
    f(s) = max(s, sigmoid(s)) and, unless given, r = the mean over the T tokens of max_j p_tj
    (PreMoe v3), with p and r compared on the collector's grid of ``bins`` probability bins: the
    collector's own formula (:func:`moeprune.observe.tcess.tcess_of_logits`) divided by T, so it
    equals the statistics' ``tcess / tokens`` on the same tokens. Returns float64 [E].
    """
    z = logits.detach().reshape(-1, logits.shape[-1])
    if z.shape[0] == 0:
        raise ValueError("no tokens: a signature needs at least one token")
    return tcess_of_logits(z, pool, r, bins) / z.shape[0]


def mean_logit_signature(logits: torch.Tensor) -> torch.Tensor:
    """The mean raw router logits of one token set, ``sig[j] = (1/T) sum_t z_tj`` (float64 [E]).

    Unlike TCESS, which credits only the pooled experts above the threshold, the mean logit keeps
    every expert's evidence; it is the feature the matcher's classifier is trained on.
    """
    z = logits.detach().double().reshape(-1, logits.shape[-1])
    if z.shape[0] == 0:
        raise ValueError("no tokens: a signature needs at least one token")
    return z.mean(dim=0)


def token_set_signature(logits: torch.Tensor, kind: str, pool: int, r: float | None = None,
                        bins: int = TCESS_BINS) -> torch.Tensor:
    """:func:`tcess_signature` (``kind="tcess"``) or :func:`mean_logit_signature` (``"logits"``)."""
    if kind == "tcess":
        return tcess_signature(logits, pool, r, bins)
    if kind == "logits":
        return mean_logit_signature(logits)
    raise ProfileError(f"unknown signature kind {kind!r}; choose one of {', '.join(SIGNATURE_KINDS)}")



class SignatureExtractor:
    """Router signatures of token sequences at a few early MoE layers.

    Holds the embedding table and decoder layers ``0 .. max(layers)`` only (read lazily from the
    safetensors shards, as the sequential calibration engine does); later layers, the final norm and
    the LM head are never loaded.
    """

    def __init__(self, model_dir: str | Path, layers: Sequence[int], *, tcess_pool: int, tcess_r: float | None = None,
                 tcess_bins: int = TCESS_BINS, dtype: torch.dtype = torch.float32):
        self.model_dir = Path(model_dir)
        config = read_config(self.model_dir)
        self.family = family_for_model_type(config.model_type)
        model = build_skeleton(config)
        prepare_experts_implementation(model)
        moe = moe_layer_indices(self.family, model)
        self.layers = sorted(set(int(x) for x in layers))
        bad = [layer for layer in self.layers if layer not in moe]
        if not self.layers or bad:
            raise ProfileError(f"signature layers {bad or 'none'} are not MoE layers of {self.model_dir} (MoE layers: {moe})")
        self.tcess_pool = int(tcess_pool)
        self.tcess_r = tcess_r
        self.tcess_bins = int(tcess_bins)
        self.max_positions = int(getattr(config, "max_position_embeddings", 0) or 0) or None
        checkpoint = LazyCheckpoint(self.model_dir)
        load_input_embeddings(model, self.family, checkpoint, dtype)
        self.depth = max(self.layers)
        self.accumulate = layer_accumulator(self.family)  # Inkling-2: block_states grown layer by layer
        loop = LayerLoop.of(self.family, config)
        if loop is not None and self.depth >= loop.start:
            raise ProfileError(f"signature layers {self.layers} of {self.model_dir} reach its looped layers "
                               f"({loop.start}..{loop.end - 1}, run {loop.passes} times per forward); choose layers "
                               f"before {loop.start}")
        blocks = decoder_layers(model)
        for index in range(self.depth + 1):
            load_module_weights(blocks[index], self.family.layer_state_dict(checkpoint, index, blocks[index], dtype=dtype))
        checkpoint.close()
        self.model = model
        self._tokenizer = None
        logger.debug("signature extractor: embeddings + decoder layers 0..%d of %s", self.depth, self.model_dir)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_dir, "matching prompts needs the checkpoint's tokenizer files")
        return self._tokenizer

    @torch.no_grad()
    def router_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[int, torch.Tensor]:
        """Raw router logits [B, S, E] of every signature layer for one batch."""
        carry = LayerCarry.of(self.family)  # a value each layer hands to the next (GLM-5, HY-V4, ZAYA)
        initial: list[torch.Tensor] = []  # Inkling-2: block_states grown layer by layer
        first, kwargs = capture_layer_inputs(self.model, [(input_ids, attention_mask)], carry, accumulate=self.accumulate,
                                             initial=initial)
        hidden = first[0]
        first.close()
        state = initial[0] if initial else None
        captured: dict[int, torch.Tensor] = {}
        blocks = decoder_layers(self.model)

        def hook(layer):
            def record(module, args, output):
                logits = self.family.logits_of(output, self.family.expert_count(blocks[layer]))
                captured[layer] = logits.detach().reshape(*input_ids.shape, logits.shape[-1])
            return record

        handles = [self.family.router(blocks[layer]).register_forward_hook(hook(layer)) for layer in self.layers]
        try:
            carried = None
            for index in range(self.depth + 1):
                extra = {carry.argument: carried} if carry is not None else {}
                if self.accumulate is None:
                    output = blocks[index](hidden, **kwargs[0][index], **extra)
                else:
                    output = blocks[index](hidden, state, **kwargs[0][index], **extra)
                    state = self.accumulate.grow(blocks[index], state, hidden)
                hidden = output
                if carry is not None:
                    hidden, carried = output[0], output[carry.output]
        finally:
            for handle in handles:
                handle.remove()
        return captured

    def signatures_of_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          batch_size: int = 8, progress: bool = False,
                          kinds: Sequence[str] = ("tcess",)) -> torch.Tensor | dict[str, torch.Tensor]:
        """One signature per row: [N, len(layers), E] float64 (padding, mask 0, never counts).

        ``kinds`` (see :data:`SIGNATURE_KINDS`): one kind gives its tensor, several a dict kind ->
        tensor, all from one forward pass.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rows: dict[str, list[torch.Tensor]] = {kind: [] for kind in kinds}
        starts = range(0, input_ids.shape[0], batch_size)
        for start in tqdm(starts, desc="signatures", disable=not progress, leave=False):
            ids, mask = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
            logits = self.router_logits(ids, mask)
            for row in range(ids.shape[0]):
                valid = mask[row].bool()
                for kind in kinds:
                    rows[kind].append(torch.stack([
                        token_set_signature(logits[layer][row][valid], kind, self.tcess_pool, self.tcess_r,
                                            self.tcess_bins)
                        for layer in self.layers]))
        stacked = {kind: torch.stack(values) for kind, values in rows.items()}
        return stacked[kinds[0]] if len(kinds) == 1 else stacked

    def encode(self, texts: Sequence[str], max_tokens: int | None = None) -> list[list[int]]:
        """Token ids of each text (the tokenizer's own special tokens), cut to ``max_tokens``."""
        limits = [x for x in (max_tokens, self.max_positions) if x]
        limit = min(limits) if limits else None
        encoded = []
        for index, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ProfileError(f"prompt {index} is empty; give a non-empty --prompt (or non-empty rows in --prompts)")
            ids = self.tokenizer(text)["input_ids"]
            encoded.append(ids[:limit] if limit else ids)
        return encoded

    def signatures(self, texts: Sequence[str], max_tokens: int | None = None, batch_size: int = 8,
                   progress: bool = False, kind: str = "tcess") -> tuple[torch.Tensor, list[int]]:
        """Signatures [N, len(layers), E] of texts (``kind``: tcess or logits) and their token counts
        (right-padded batches)."""
        if not texts:
            raise ProfileError("no prompts given; pass --prompt TEXT or a --prompts file with rows")
        encoded = self.encode(texts, max_tokens)
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, index in enumerate(order):
            input_ids[row, :len(encoded[index])] = torch.tensor(encoded[index])
            mask[row, :len(encoded[index])] = 1
        chunks = []
        for start in range(0, len(order), batch_size):
            stop = start + batch_size
            used = int(mask[start:stop].sum(dim=1).max())
            chunks.append(self.signatures_of_ids(input_ids[start:stop, :used], mask[start:stop, :used], batch_size,
                                                 kinds=(kind,)))
        stacked = torch.cat(chunks)
        result = torch.empty_like(stacked)
        result[torch.tensor(order)] = stacked
        return result, [len(ids) for ids in encoded]


def _spread(count: int, wanted: int) -> torch.Tensor:
    """At most ``wanted`` evenly spread indices of ``range(count)``."""
    if count <= wanted:
        return torch.arange(count)
    return torch.linspace(0, count - 1, wanted).round().long().unique()


def calibration_windows(input_ids: torch.Tensor, length: int, max_windows: int,
                        eos_token_id: int | None = None) -> torch.Tensor:
    """``length``-token windows of the packed calibration rows [N, S], [n <= max_windows, length].

    With ``eos_token_id``, up to half are document starts (the ``length`` tokens after an eos, evenly
    spread over those that fit in their row: prompts usually open a document); the rest are evenly
    spread non-overlapping windows of the rows. Empty when rows are shorter than ``length``.
    """
    rows, width = input_ids.shape
    per_row = width // length
    if per_row == 0 or max_windows < 1:
        return input_ids.new_empty(0, length)
    chosen: list[tuple[int, int]] = []
    if eos_token_id is not None:
        after_eos = (input_ids[:, :width - length] == eos_token_id).nonzero().tolist()
        starts = [(row, position + 1) for row, position in after_eos]
        chosen = [starts[i] for i in _spread(len(starts), max_windows // 2).tolist()]
    taken = set(chosen)
    grid = [(row, k * length) for row in range(rows) for k in range(per_row)]
    grid = [cell for cell in grid if cell not in taken]
    chosen += [grid[i] for i in _spread(len(grid), max_windows - len(chosen)).tolist()]
    chosen.sort()
    return torch.stack([input_ids[row, start:start + length] for row, start in chosen])
