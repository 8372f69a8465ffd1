"""Data-parallel calibration on ``torch.distributed`` (launched by torchrun or ``accelerate launch``).

Both launchers start one process per rank and set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``. With ``WORLD_SIZE > 1``, :func:`distributed_pass` joins the
process group (``init_method="env://"``: gloo for a CPU pass, NCCL for a CUDA one) unless one is
initialised already, and destroys only the group it created.

* **Sharding rule** (:func:`shard_batches`): the calibration rows are cut into batches of
  ``batch_size`` rows exactly as a single process cuts them, and batch ``b`` goes to rank
  ``b mod WORLD_SIZE`` (round-robin by whole batches). Every batch's forward is therefore the
  forward of the single-process run, bit for bit; only the order in which the float64 accumulators
  add the batches up differs. A rank without a batch (fewer batches than ranks) contributes its
  observers' initial state: zeros, which is the neutral element of the sums and of the maxima
  (every ``max`` entry is a maximum of absolute values, initialised to 0 as in a single process).
* **All-reduce point** (:func:`all_reduce_layers`): once, at the end of the pass, every raw entry
  of every MoE layer is all-reduced in float64 by its observer's declared combine rule
  (:data:`moeprune.observe.ENTRY_RULES`): the ``sum`` entries of all layers in one flat
  ``SUM`` all-reduce, the ``max`` entries in one flat ``MAX`` all-reduce. Any observer added later
  (gradient sums for HEAPr/Taylor included) follows the same path without code here.
* **Who writes** (:func:`is_writer`): every rank returns the same statistics; rank 0 alone writes
  statistics, plans and checkpoints.

The metadata (``samples``, ``num_tokens``, ``data_hash``) describe the whole calibration set: every
rank loads it whole and runs only its shard; :func:`check_same_on_all_ranks` refuses ranks that
hold different data or models.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import MoePruneError
from ..observe import ENTRY_RULES

logger = logging.getLogger(__name__)

#: Environment variables torchrun and ``accelerate launch`` set for every rank.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: How long a rank waits in a collective for the others. The one all-reduce comes at the end of the
#: pass, after ranks whose work differs by one batch per layer (torch's defaults, 10-30 min, could
#: expire on a large model); a crashed rank still ends the others at once (torchrun stops them).
COLLECTIVE_TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in a data-parallel pass (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    created_group: bool = False

    @property
    def active(self) -> bool:
        """True when several ranks share the pass (collectives are needed)."""
        return self.world_size > 1


def env_int(name: str, default: int) -> int:
    """Integer environment variable ``name`` (``default`` when unset); a MoePruneError otherwise."""
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise MoePruneError(f"environment variable {name}={value!r} is not an integer; "
                            "launch with torchrun or accelerate launch, or unset it") from None


def launch_world_size() -> int:
    """Processes the launcher started: the initialised group's size, else ``WORLD_SIZE`` (default 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return env_int("WORLD_SIZE", 1)


def launch_rank() -> int:
    """This process's rank: the initialised group's, else ``RANK`` (default 0)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return env_int("RANK", 0)


def is_writer() -> bool:
    """True on the process that writes files: rank 0 (a single process is rank 0)."""
    return launch_rank() == 0


def backend_for(device: torch.device) -> str:
    """The collective backend of a pass on ``device``: NCCL for CUDA, gloo for the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, context: DistributedContext) -> torch.device:
    """The device this rank computes on: ``cuda`` without an index becomes ``cuda:LOCAL_RANK``
    (one GPU per rank, as torchrun places them); an explicit ``cuda:N`` is kept (every rank shares
    it: a warning says so); the CPU stays the CPU."""
    if device.type != "cuda" or not context.active:
        return device
    if device.index is not None:
        logger.warning("--device %s with %d ranks: every rank computes on that one GPU; pass --device cuda to "
                       "give each rank its own (cuda:LOCAL_RANK)", device, context.world_size)
        return device
    count = torch.cuda.device_count()
    if context.local_rank >= count:
        raise MoePruneError(f"rank {context.rank} has LOCAL_RANK {context.local_rank}, but this node has {count} "
                            "CUDA device(s); start at most one process per GPU (--nproc_per_node)")
    return torch.device("cuda", context.local_rank)


def missing_launcher_variables() -> list[str]:
    """The launcher variables ``env://`` initialisation needs that are unset."""
    return [name for name in LAUNCHER_VARIABLES if name != "LOCAL_RANK" and not os.environ.get(name)]


@contextmanager
def distributed_pass(device: torch.device) -> Iterator[DistributedContext]:
    """The data-parallel context of one calibration pass on ``device``.

    Uses an initialised process group as it is; otherwise, with ``WORLD_SIZE > 1``, initialises one
    from the launcher's environment (gloo on the CPU, NCCL on CUDA) and destroys it on exit. With
    ``WORLD_SIZE`` unset or 1 nothing is initialised (a single process, rank 0 of 1).
    """
    if dist.is_available() and dist.is_initialized():
        yield DistributedContext(dist.get_rank(), dist.get_world_size(), env_int("LOCAL_RANK", 0),
                                 dist.get_backend(), created_group=False)
        return
    world_size = env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        yield DistributedContext()
        return
    if not dist.is_available():
        raise MoePruneError(f"WORLD_SIZE={world_size} asks for a multi-process pass, but this torch has no "
                            "torch.distributed; unset WORLD_SIZE or install a torch build with it")
    missing = missing_launcher_variables()
    if missing:
        raise MoePruneError(f"WORLD_SIZE={world_size} but {', '.join(missing)} unset: launch with "
                            "`torchrun --nproc_per_node N -m moeprune.cli ...` (or accelerate launch)")
    backend = backend_for(device)
    local_rank = env_int("LOCAL_RANK", 0)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://", timeout=COLLECTIVE_TIMEOUT)
    context = DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, backend, created_group=True)
    logger.info("data-parallel calibration: rank %d of %d (%s)", context.rank, context.world_size, backend)
    try:
        yield context
    finally:
        dist.destroy_process_group()


def shard_batches(num_batches: int, rank: int, world_size: int) -> list[int]:
    """Indices of the batches rank ``rank`` of ``world_size`` runs: ``b`` with ``b mod world_size == rank``
    (round-robin by whole batches; disjoint, together every batch once, counts differ by at most 1)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    return list(range(rank, num_batches, world_size))


def _collective_device(context: DistributedContext, device: torch.device) -> torch.device:
    """Where the flat buffers live for the backend: the rank's GPU for NCCL, else the CPU."""
    return device if context.backend == "nccl" else torch.device("cpu")


def all_reduce_layers(layers: dict[int, dict[str, torch.Tensor]], context: DistributedContext,
                      device: torch.device = torch.device("cpu")) -> dict[int, dict[str, torch.Tensor]]:
    """Every rank's raw entries combined over the ranks by their declared rule, in float64.

    The ``sum`` entries of every layer go in one flat float64 buffer (all-reduced with SUM), the
    ``max`` entries in another (MAX); entries are walked in sorted (layer, name) order, so the
    buffers line up on every rank. Returns new float64 CPU tensors (the input unchanged when the
    pass is not distributed).
    """
    if not context.active:
        return layers
    keys = [(layer, name) for layer in sorted(layers) for name in sorted(layers[layer])]
    unknown = [name for _, name in keys if name not in ENTRY_RULES]
    if unknown:
        raise MoePruneError(f"entries {sorted(set(unknown))} declare no combine rule; register their observer")
    where = _collective_device(context, device)
    out: dict[int, dict[str, torch.Tensor]] = {layer: {} for layer in layers}
    for rule, op in (("sum", dist.ReduceOp.SUM), ("max", dist.ReduceOp.MAX)):
        chosen = [(layer, name) for layer, name in keys if ENTRY_RULES[name] == rule]
        if not chosen:
            continue
        tensors = [layers[layer][name].detach().to(device="cpu", dtype=torch.float64) for layer, name in chosen]
        flat = torch.cat([t.reshape(-1) for t in tensors]).to(where)
        dist.all_reduce(flat, op=op)
        flat = flat.cpu()
        start = 0
        for (layer, name), tensor in zip(chosen, tensors):
            out[layer][name] = flat[start:start + tensor.numel()].reshape(tensor.shape).clone()
            start += tensor.numel()
    return {layer: {name: out[layer][name] for name in layers[layer]} for layer in layers}


def check_same_on_all_ranks(context: DistributedContext, what: dict[str, object]) -> None:
    """Refuse a pass whose ranks disagree on ``what`` (data hash, model fingerprint, MoE layers,
    entry shapes, settings): a MoePruneError naming the first differing key."""
    if not context.active:
        return
    gathered: list = [None] * context.world_size
    dist.all_gather_object(gathered, what)
    for rank, theirs in enumerate(gathered):
        for key in what:
            if theirs.get(key) != what.get(key):
                raise MoePruneError(f"rank {rank} has {key} {theirs.get(key)!r}, rank {context.rank} has "
                                    f"{what.get(key)!r}: every rank must run the same model on the same data "
                                    "with the same options")


def entry_shapes(layers: dict[int, dict[str, torch.Tensor]]) -> dict[str, list[int]]:
    """``"layer.entry" -> shape`` of a pass's raw entries (what the all-reduce lines up)."""
    return {f"{layer}.{name}": list(value.shape) for layer, entries in sorted(layers.items())
            for name, value in sorted(entries.items())}


def rank_batches(batches: Sequence, context: DistributedContext) -> list:
    """The batches this rank runs (:func:`shard_batches`), in their single-process order."""
    return [batches[b] for b in shard_batches(len(batches), context.rank, context.world_size)]
