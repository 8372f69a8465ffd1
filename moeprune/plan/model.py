"""The plan artifact: :class:`Plan`, its JSON form (``moeprune_plan.json``, format 2) and I/O.

A plan says what to do to each decoder layer: keep routed experts (:attr:`Plan.layers`, the only
action of format 1) and, from format 2, typed actions (:attr:`Plan.actions`, see
:mod:`moeprune.plan.actions`). Format 1 files load unchanged; a plan that only drops experts is
still written with its ``layers`` object so that every existing reader keeps working.

Example of a format-2 plan with another action (``layers`` is then folded into ``actions``)::

    {"format_version": 2, "method": "manual", "family": "qwen3_moe", "num_experts": 8,
     "actions": {"1": [{"op": "keep_experts", "experts": [0, 2, 3, 5]}],
                 "2": [{"op": "merge_experts", "router": "exact",
                        "clusters": [{"members": [0, 4], "weights": [0.5, 0.5],
                                      "permutations": [null, [1, 0, 2, 3]]}, ...]}]},
     "protected": {}, ...}
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from ..errors import PlanError
from ..io.output import atomic_write_text, final_path
from .actions import Action, KeepExperts, action_from_json

logger = logging.getLogger(__name__)

PLAN_FILENAME = "moeprune_plan.json"
PLAN_FORMAT_VERSION = 2


def utc_timestamp() -> str:
    """Now, UTC, ISO 8601 to the second: the ``created`` field of plans and profiles."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Plan:
    """Which routed experts each MoE layer keeps.

    Attributes:
        layers: decoder-layer index -> sorted kept expert indices (original numbering). MoE layers
            absent from the mapping keep all experts.
        method: scoring method that ranked the experts (or e.g. ``"manual"``).
        budget: the budget as the user gave it, e.g. ``{"ratio": 0.5}``, ``{"keep": 4}`` or
            ``{"per_layer": {3: 4, 5: 0.25}}``.
        protected: layer -> experts that were kept regardless of score (super experts).
        model_fingerprint: fingerprint of the checkpoint the plan was made for ("" = unknown).
        family: routers/ family name of that checkpoint ("" = unknown).
        num_experts: routed experts per layer before pruning (0 = unknown).
        score_summary: per layer, min/max/mean of all scores and of the kept scores.
        collapse_groups: the pruned model routes with ``n_group = topk_group = 1``.
        calibration: where the statistics came from (data file and hash, samples, seq len).
        moeprune_version: version that wrote the plan.
        created: ISO-8601 creation time (UTC).
        actions: decoder-layer index -> typed actions other than keeping experts (merges, neuron
            and channel slicing, head and layer drops; see :mod:`moeprune.plan.actions`). Empty
            for a plan that only drops experts.
    """

    layers: dict[int, list[int]]
    method: str
    budget: dict = field(default_factory=dict)
    protected: dict[int, list[int]] = field(default_factory=dict)
    model_fingerprint: str = ""
    family: str = ""
    num_experts: int = 0
    score_summary: dict[int, dict[str, float]] = field(default_factory=dict)
    collapse_groups: bool = False
    calibration: dict = field(default_factory=dict)
    moeprune_version: str = __version__
    created: str = field(default_factory=utc_timestamp)
    actions: dict[int, list[Action]] = field(default_factory=dict)

    # ---- queries -------------------------------------------------------------------------------

    @property
    def drops_only(self) -> bool:
        """True when the plan only keeps/drops routed experts (no other action)."""
        return not any(self.actions.values())

    def layer_actions(self) -> dict[int, list[Action]]:
        """Every layer's typed actions, ``keep_experts`` (from :attr:`layers`) first."""
        out: dict[int, list[Action]] = {}
        for layer, kept in self.layers.items():
            out.setdefault(layer, []).append(KeepExperts(tuple(kept)))
        for layer, actions in self.actions.items():
            out.setdefault(layer, []).extend(actions)
        return dict(sorted(out.items()))

    def kept_counts(self) -> dict[int, int]:
        """Experts kept per listed layer."""
        return {layer: len(kept) for layer, kept in sorted(self.layers.items())}

    def dropped(self, num_experts: int | None = None) -> dict[int, list[int]]:
        """Experts removed per listed layer (pass ``num_experts`` if the plan lacks it)."""
        total = num_experts or self.num_experts
        if not total:
            raise PlanError("the plan does not record num_experts; pass the model's expert count")
        return {
            layer: sorted(set(range(total)) - set(kept))
            for layer, kept in sorted(self.layers.items())
        }

    # ---- JSON ----------------------------------------------------------------------------------

    def to_json(self) -> dict:
        """A JSON-serialisable dict; layer keys are strings.

        A plan that only drops experts writes ``layers`` (layer -> kept experts), as format 1 did, so
        every reader of format 1 keeps working; any other plan writes ``actions`` (layer -> list of
        ``{"op": ...}`` objects, ``keep_experts`` included) instead.
        """
        budget = dict(self.budget)
        if isinstance(budget.get("per_layer"), Mapping):
            budget["per_layer"] = {str(k): v for k, v in budget["per_layer"].items()}
        data = {
            "format_version": PLAN_FORMAT_VERSION,
            "method": self.method,
            "family": self.family,
            "model_fingerprint": self.model_fingerprint,
            "num_experts": self.num_experts,
            "budget": budget,
            "collapse_groups": self.collapse_groups,
        }
        if self.drops_only:
            data["layers"] = {str(layer): list(kept) for layer, kept in sorted(self.layers.items())}
        else:
            data["actions"] = {
                str(layer): [action.to_json() for action in actions] for layer, actions in self.layer_actions().items()
            }
        data.update({
            "protected": {str(layer): list(p) for layer, p in sorted(self.protected.items())},
            "score_summary": {
                str(layer): dict(s) for layer, s in sorted(self.score_summary.items())
            },
            "calibration": dict(self.calibration),
            "moeprune_version": self.moeprune_version,
            "created": self.created,
        })
        return data

    @classmethod
    def from_json(cls, data: object, *, source: str = "plan") -> "Plan":
        """Rebuild a plan from :meth:`to_json` output; anything malformed is a PlanError.

        Only ``method`` and ``layers`` (or, format 2, ``actions``) are required (a hand-written plan
        may omit the rest). Format 1 plans load unchanged. Expert lists are sorted; duplicates are
        kept so that :func:`validate_plan` can report them.
        """
        if not isinstance(data, Mapping):
            raise PlanError(f"{source}: a plan must be a JSON object, got {type(data).__name__}")
        version = data.get("format_version", PLAN_FORMAT_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise PlanError(f"{source}: 'format_version' must be a positive integer, got {version!r}")
        if version > PLAN_FORMAT_VERSION:
            raise PlanError(
                f"{source}: plan format {version!r} is newer than this moeprune reads "
                f"({PLAN_FORMAT_VERSION}); upgrade moeprune"
            )
        if "method" not in data:
            raise PlanError(f"{source}: the plan lacks the required key 'method'")
        if "layers" not in data and "actions" not in data:
            raise PlanError(f"{source}: the plan lacks the required key 'layers' (or, format 2, 'actions')")
        if not isinstance(data["method"], str):
            raise PlanError(f"{source}: 'method' must be a string")
        budget = data.get("budget", {})
        if not isinstance(budget, Mapping):
            raise PlanError(f"{source}: 'budget' must be an object")
        budget = dict(budget)
        _check_budget_types(budget, source)
        if isinstance(budget.get("per_layer"), Mapping):
            budget["per_layer"] = {
                _layer_key(k, f"{source}: budget.per_layer"): v
                for k, v in budget["per_layer"].items()
            }
        summary = data.get("score_summary", {})
        if not isinstance(summary, Mapping) or not all(isinstance(v, Mapping) for v in summary.values()):
            raise PlanError(f"{source}: 'score_summary' must be an object of layer -> object")
        num_experts = data.get("num_experts", 0)
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 0:
            raise PlanError(f"{source}: 'num_experts' must be a non-negative integer, got {num_experts!r}")
        for key in ("model_fingerprint", "family", "moeprune_version", "created"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise PlanError(f"{source}: {key!r} must be a string, got {data[key]!r}")
        if data.get("calibration") is not None and not isinstance(data["calibration"], Mapping):
            raise PlanError(f"{source}: 'calibration' must be an object, got {data['calibration']!r}")
        collapse = data.get("collapse_groups", False)
        if not isinstance(collapse, bool):
            raise PlanError(f"{source}: 'collapse_groups' must be true or false")
        layers = _expert_mapping(data.get("layers", {}), f"{source}: 'layers'")
        actions = _action_mapping(data.get("actions", {}), f"{source}: 'actions'")
        for layer, listed in list(actions.items()):
            for action in [a for a in listed if isinstance(a, KeepExperts)]:
                if layer in layers:
                    raise PlanError(f"{source}: layer {layer} keeps experts twice ('layers' and 'actions', or two "
                                    "keep_experts actions); list them once")
                layers[layer] = list(action.experts)
                listed.remove(action)
            if not listed:
                del actions[layer]
        return cls(
            layers=dict(sorted(layers.items())),
            actions=actions,
            method=data["method"],
            budget=budget,
            protected=_expert_mapping(data.get("protected", {}), f"{source}: 'protected'"),
            model_fingerprint=str(data.get("model_fingerprint", "") or ""),
            family=str(data.get("family", "") or ""),
            num_experts=num_experts,
            score_summary={_layer_key(k, f"{source}: 'score_summary'"): dict(v) for k, v in summary.items()},
            collapse_groups=collapse,
            calibration=dict(data.get("calibration", {}) or {}),
            moeprune_version=str(data.get("moeprune_version", "unknown")),
            created=str(data.get("created", "")),
        )

    def save(self, path: str | os.PathLike, *, announce: bool = True) -> Path:
        """Write the plan as JSON, atomically (:func:`moeprune.io.output.atomic_write_text`).

        ``path`` may be a file or an existing directory (then ``<dir>/moeprune_plan.json``); an
        existing plan there is replaced. Logs the path written unless ``announce`` is False (callers
        writing into a temporary output folder log the final folder themselves). Returns the file.
        """
        path = Path(path)
        if path.is_dir():
            path = path / PLAN_FILENAME
        text = json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n"
        atomic_write_text(path, text, overwrite=True)
        if announce:
            logger.info("wrote plan to %s", final_path(path))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        """Read a plan written by :meth:`save` (a file, or a directory with moeprune_plan.json)."""
        path = Path(path)
        if path.is_dir():
            path = path / PLAN_FILENAME
        if not path.is_file():
            raise PlanError(f"plan file not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise PlanError(
                f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                "fix or regenerate the plan"
            ) from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise PlanError(f"cannot read plan {path}: {exc}") from exc
        return cls.from_json(data, source=str(path))


def _check_budget_types(budget: dict, source: str) -> None:
    """PlanError unless the budget's known fields have JSON types a budget can hold: ``ratio`` a
    number, ``keep`` an integer, ``per_layer`` an object of layer -> number."""
    def number(value: object, integer: bool) -> bool:
        kinds = (int,) if integer else (int, float)
        return isinstance(value, kinds) and not isinstance(value, bool)

    if "ratio" in budget and budget["ratio"] is not None and not number(budget["ratio"], False):
        raise PlanError(f"{source}: budget 'ratio' must be a number, got {budget['ratio']!r}")
    if "keep" in budget and budget["keep"] is not None and not number(budget["keep"], True):
        raise PlanError(f"{source}: budget 'keep' must be an integer, got {budget['keep']!r}")
    per_layer = budget.get("per_layer")
    if per_layer is not None and (not isinstance(per_layer, Mapping)
                                  or not all(number(v, False) for v in per_layer.values())):
        raise PlanError(f"{source}: budget 'per_layer' must be an object of layer -> count, got {per_layer!r}")


def _layer_key(key: object, where: str) -> int:
    """A layer index from a JSON key (``"3"``) or an int; anything else is a PlanError."""
    if isinstance(key, bool):
        raise PlanError(f"{where}: layer key {key!r} is not a layer index")
    try:
        return int(key)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise PlanError(f"{where}: layer key {key!r} is not a layer index") from None


def _expert_mapping(raw: object, where: str) -> dict[int, list[int]]:
    """``{"3": [0, 2]}`` -> ``{3: [0, 2]}`` with sorted integer lists; malformed -> PlanError."""
    if not isinstance(raw, Mapping):
        raise PlanError(f"{where} must be an object mapping layer index to a list of experts")
    out: dict[int, list[int]] = {}
    for key, experts in raw.items():
        layer = _layer_key(key, where)
        if not isinstance(experts, list) or not all(
            isinstance(e, int) and not isinstance(e, bool) for e in experts
        ):
            raise PlanError(
                f"{where}: layer {layer} must list integer expert indices, got {experts!r}"
            )
        out[layer] = sorted(experts)
    return dict(sorted(out.items()))


def _action_mapping(raw: object, where: str) -> dict[int, list[Action]]:
    """``{"3": [{"op": ...}, ...]}`` -> ``{3: [Action, ...]}``; malformed -> PlanError."""
    if not isinstance(raw, Mapping):
        raise PlanError(f"{where} must be an object mapping layer index to a list of actions")
    out: dict[int, list[Action]] = {}
    for key, actions in raw.items():
        layer = _layer_key(key, where)
        if not isinstance(actions, list):
            raise PlanError(f"{where}: layer {layer} must list its actions, got {actions!r}")
        out[layer] = [action_from_json(a, f"{where}[{layer}][{i}]") for i, a in enumerate(actions)]
    return dict(sorted(out.items()))
