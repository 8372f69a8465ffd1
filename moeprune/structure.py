"""The ``moeprune`` section of config.json: model structure a stock transformers config cannot express.

A vanilla config holds one expert count, one expert width, one head count per model. Outputs that
need more (per-expert widths after neuron slicing, per-layer expert counts after a global merge
budget, a router that keeps every logit and maps it to a merged expert, dynamic expert skipping,
per-layer head counts or MLP widths) keep the stock keys of the source (so transformers still builds
a model of the right class) and add::

    "moeprune": {"format": 1, "<key>": <value>, ...}

Each key is owned by one :class:`StructureHandler`, registered with :func:`register_structure`
next to the op that writes it; :func:`moeprune.loader.load` (``moeprune.load``) applies them:

1. ``prepare(model, family, value) -> set of in-memory names``: on the meta-device skeleton, replace
   or resize modules so the model can hold the stored layout; returns the parameter/buffer names the
   handler fills itself (everything else is filled by name from the checkpoint);
2. ``fill(model, layout, value, dtype) -> set of names``: read those tensors (through the
   :class:`~moeprune.layout.CheckpointLayout`) into the model;
3. ``finish(model, family, value)``: behaviour that needs the loaded weights (hooks, attributes).

A checkpoint whose section has a key this moeprune does not know is refused with a message to
upgrade, never half-applied. Transformers keeps the section as an extra config attribute; each
handler's tests say what a vanilla ``from_pretrained`` of its outputs does (it must fail loudly, or
build a model that is exact without the moeprune behaviour, e.g. without dynamic skipping).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import MoePruneError

#: config.json key of the section.
SECTION = "moeprune"
#: format of the section this moeprune writes and reads.
FORMAT = 1


@dataclass(frozen=True)
class StructureHandler:
    """How :func:`moeprune.load` realises one key of the section (see the module docstring)."""

    key: str
    prepare: Callable[..., set[str]] | None = None
    fill: Callable[..., set[str]] | None = None
    finish: Callable[..., None] | None = None
    #: keys that must be applied before this one (e.g. per-layer counts before a router map)
    after: tuple[str, ...] = ()


HANDLERS: dict[str, StructureHandler] = {}


def register_structure(handler: StructureHandler) -> StructureHandler:
    """Add the handler of one section key (a ValueError if the key is taken)."""
    if handler.key in HANDLERS or handler.key == "format":
        raise ValueError(f"structure key {handler.key!r} is already registered")
    HANDLERS[handler.key] = handler
    return handler


def read_section(config_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The section's keys (without ``format``); empty for a vanilla checkpoint. A newer format, a
    malformed section or a key no handler knows is a MoePruneError saying to upgrade moeprune."""
    section = config_dict.get(SECTION)
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise MoePruneError(f"config.json's {SECTION!r} entry must be an object, got {type(section).__name__}")
    version = section.get("format")
    if version != FORMAT:
        raise MoePruneError(f"config.json's {SECTION!r} section has format {version!r}; this moeprune reads format "
                            f"{FORMAT}: upgrade moeprune (pip install -U moeprune)")
    values = {key: value for key, value in section.items() if key != "format"}
    unknown = sorted(set(values) - set(HANDLERS))
    if unknown:
        raise MoePruneError(f"config.json's {SECTION!r} section has key(s) {unknown} this moeprune cannot load "
                            f"(it knows: {', '.join(sorted(HANDLERS)) or 'none'}); upgrade moeprune")
    return values


def ordered_keys(values: Mapping[str, Any]) -> list[str]:
    """The section's keys in an order where every handler runs after the keys it names in ``after``."""
    order: list[str] = []

    def visit(key: str, path: tuple[str, ...]) -> None:
        if key in order or key not in values:
            return
        if key in path:
            raise MoePruneError(f"structure keys depend on each other in a cycle: {' -> '.join((*path, key))}")
        for before in HANDLERS[key].after:
            visit(before, (*path, key))
        order.append(key)

    for key in sorted(values):
        visit(key, ())
    return order


def section_config(values: Mapping[str, Any], existing: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config.json entries that record ``values`` in the section (merged with an ``existing``
    section of the source), for :func:`moeprune.write.write_config`."""
    merged = {**(read_section({SECTION: existing}) if existing else {}), **values}
    unknown = sorted(set(merged) - set(HANDLERS))
    if unknown:
        raise MoePruneError(f"no structure handler for key(s) {unknown}")
    return {SECTION: {"format": FORMAT, **dict(sorted(merged.items()))}}
