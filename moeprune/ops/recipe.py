"""Tensor recipes: how one output tensor is computed from source tensors.

Ops (keep experts, and later merge, neuron slicing, dense slicing) never touch weights: they return
recipes, and two executors evaluate the same recipes, the streaming writer (:mod:`moeprune.write`,
one output tensor resident at a time, reading only the rows it needs) and the in-memory executor
(:mod:`moeprune.ops.memory`). Five kinds cover every action:

* :class:`Take`: a source tensor, whole;
* :class:`Select`: ``index_select(dim, index)`` of a recipe, any order and repeats (rows, columns,
  permutations);
* :class:`WeightedSum`: ``sum_i w_i * r_i`` of recipes of one shape (computed in float64, then
  cast to the first term's dtype);
* :class:`Concat`: ``torch.cat`` of recipes along a dim;
* :class:`NewTensor`: a tensor given by value (e.g. a new bias);
* :class:`RenumberExpertIds`: a table of expert ids (DeepSeek-V4's hash-routing ``tid2eid``) for a
  layer keeping or merging experts (:func:`moeprune.routing.renumber_expert_ids`).

Sources are named by :data:`Ref`: a full on-disk tensor name (a ``str``: routers, attention, norms,
shared experts, ...) or an :class:`ExpertRef`, one canonical projection of one routed expert (see
:mod:`moeprune.layout`: ``gate``/``up`` [I, H], ``down`` [H, I], biases), so a recipe means the same
thing whether the experts are stored per expert, fused, interleaved or transposed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, Union

import torch

from ..routing import renumber_expert_ids


@dataclass(frozen=True, order=True)
class ExpertRef:
    """One canonical projection (gate, up, down, gate_bias, up_bias, down_bias) of one routed expert."""

    layer: int
    expert: int
    proj: str


Ref = Union[str, ExpertRef]


class Source(Protocol):
    """Where recipes read their source tensors (a checkpoint or a loaded model)."""

    def shape(self, ref: Ref) -> tuple[int, ...]: ...

    def dtype(self, ref: Ref) -> torch.dtype: ...

    def read(self, ref: Ref) -> torch.Tensor: ...

    def read_rows(self, ref: Ref, rows: list[int]) -> torch.Tensor: ...


class Recipe:
    """Base class of the recipe kinds."""

    def shape(self, source: Source) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, source: Source) -> torch.dtype:
        raise NotImplementedError

    def refs(self) -> Iterator[Ref]:
        """Every source tensor the recipe reads."""
        return iter(())

    def evaluate(self, source: Source) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Take(Recipe):
    """Source tensor ``ref``, whole."""

    ref: Ref

    def shape(self, source: Source) -> tuple[int, ...]:
        return tuple(source.shape(self.ref))

    def dtype(self, source: Source) -> torch.dtype:
        return source.dtype(self.ref)

    def refs(self) -> Iterator[Ref]:
        yield self.ref

    def evaluate(self, source: Source) -> torch.Tensor:
        return source.read(self.ref)


@dataclass(frozen=True)
class Select(Recipe):
    """``base.index_select(dim, index)``: rows (dim 0), columns (dim 1), any order, repeats allowed.

    Selecting rows of a :class:`Take` reads only those rows from the source.
    """

    base: Recipe
    dim: int
    index: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", tuple(int(i) for i in self.index))

    def shape(self, source: Source) -> tuple[int, ...]:
        shape = list(self.base.shape(source))
        dim = self.dim % len(shape)
        bad = [i for i in self.index if not 0 <= i < shape[dim]]
        if bad:
            raise IndexError(f"index {bad[0]} out of range for dim {dim} of size {shape[dim]}")
        shape[dim] = len(self.index)
        return tuple(shape)

    def dtype(self, source: Source) -> torch.dtype:
        return self.base.dtype(source)

    def refs(self) -> Iterator[Ref]:
        return self.base.refs()

    def evaluate(self, source: Source) -> torch.Tensor:
        if isinstance(self.base, Take) and self.dim == 0:
            return source.read_rows(self.base.ref, list(self.index))
        tensor = self.base.evaluate(source)
        return tensor.index_select(self.dim, torch.tensor(self.index, dtype=torch.long, device=tensor.device))


@dataclass(frozen=True)
class WeightedSum(Recipe):
    """``sum_i weight_i * recipe_i`` over recipes of one shape, in float64, cast to the first term's dtype."""

    terms: tuple[tuple[float, Recipe], ...]

    def __post_init__(self) -> None:
        if not self.terms:
            raise ValueError("a weighted sum needs at least one term")
        object.__setattr__(self, "terms", tuple((float(w), r) for w, r in self.terms))

    def shape(self, source: Source) -> tuple[int, ...]:
        shapes = {r.shape(source) for _, r in self.terms}
        if len(shapes) != 1:
            raise ValueError(f"weighted sum of tensors of different shapes {sorted(shapes)}")
        return shapes.pop()

    def dtype(self, source: Source) -> torch.dtype:
        return self.terms[0][1].dtype(source)

    def refs(self) -> Iterator[Ref]:
        for _, recipe in self.terms:
            yield from recipe.refs()

    def evaluate(self, source: Source) -> torch.Tensor:
        total = None
        for weight, recipe in self.terms:
            term = recipe.evaluate(source).to(torch.float64) * weight
            total = term if total is None else total + term
        return total.to(self.dtype(source))


@dataclass(frozen=True)
class Concat(Recipe):
    """``torch.cat(parts, dim)``."""

    parts: tuple[Recipe, ...]
    dim: int = 0

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError("a concatenation needs at least one part")
        object.__setattr__(self, "parts", tuple(self.parts))

    def shape(self, source: Source) -> tuple[int, ...]:
        shapes = [list(p.shape(source)) for p in self.parts]
        dim = self.dim % len(shapes[0])
        rest = {tuple(s[:dim] + s[dim + 1:]) for s in shapes}
        if len(rest) != 1:
            raise ValueError(f"cannot concatenate shapes {shapes} along dim {dim}")
        out = shapes[0]
        out[dim] = sum(s[dim] for s in shapes)
        return tuple(out)

    def dtype(self, source: Source) -> torch.dtype:
        return self.parts[0].dtype(source)

    def refs(self) -> Iterator[Ref]:
        for part in self.parts:
            yield from part.refs()

    def evaluate(self, source: Source) -> torch.Tensor:
        return torch.cat([part.evaluate(source) for part in self.parts], dim=self.dim)


@dataclass(frozen=True, eq=False)
class NewTensor(Recipe):
    """A tensor given by value (e.g. a new bias); returned as is."""

    value: torch.Tensor

    def shape(self, source: Source) -> tuple[int, ...]:
        return tuple(self.value.shape)

    def dtype(self, source: Source) -> torch.dtype:
        return self.value.dtype

    def evaluate(self, source: Source) -> torch.Tensor:
        return self.value.detach().clone()


@dataclass(frozen=True)
class RenumberExpertIds(Recipe):
    """``base``, a table of expert ids, with each original expert e renumbered to its new id (``new_ids``:
    (original, new) pairs: a kept expert's new index, a merged member's cluster); experts without one are
    dropped and remapped first (:func:`moeprune.routing.renumber_expert_ids`)."""

    base: Recipe
    new_ids: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "new_ids", tuple((int(e), int(i)) for e, i in self.new_ids))

    def shape(self, source: Source) -> tuple[int, ...]:
        return self.base.shape(source)

    def dtype(self, source: Source) -> torch.dtype:
        return self.base.dtype(source)

    def refs(self) -> Iterator[Ref]:
        return self.base.refs()

    def evaluate(self, source: Source) -> torch.Tensor:
        return renumber_expert_ids(self.base.evaluate(source), dict(self.new_ids))
