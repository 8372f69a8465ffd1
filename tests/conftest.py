"""Shared fixtures: calibration text and tiny random checkpoints of every supported family.

Everything is built locally (no downloads) and cached for the whole session, so a checkpoint or a
statistics artifact is made once however many tests use it. Tests must not modify what these
fixtures return (copy first).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import MethodType

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from moeprune import api
from moeprune.arch import (config_value, decoder_layers, extended_spec, family_for_model_type, known_families,
                           moe_layer_indices, text_model)
from moeprune.calibration.engine import fp32_pattern
from moeprune.errors import PlanError
from moeprune.io.checkpoint import LazyCheckpoint
from moeprune.plan import PLAN_FILENAME, Plan
from moeprune.routing import mlp_router_logits, route, route_with_shared, sorted_dispatch, topk_of_sorted_dispatch
from moeprune.stats import RouterStats
from moeprune.tiny import TINY_FAMILIES, save_tiny_checkpoint
from moeprune.tokenizer import _tiny_corpus

REPO = Path(__file__).resolve().parents[1]

# The models are tiny: extra intra-op threads only add contention (on a shared 2-core machine a
# 2-thread matmul of a 32x16 matrix can wait ~100 ms for a core). Results do not depend on it.
torch.set_num_threads(1)

#: Calibration size used throughout the core tests (small, so the suite stays fast).
SEQ_LEN = 32
SAMPLES = 4


# --------------------------------------------------------------------------------------------------
# helpers shared by the test modules (the conformance suite, test_core, test_loader)


def moe_layers(model):
    """(family spec, [(decoder-layer index, layer module)] of the MoE layers)."""
    family = family_for_model_type(model.config.model_type)
    layers = decoder_layers(model)
    return family, [(index, layers[index]) for index in moe_layer_indices(family, model)]


def router_logits(family, router, hidden_states):
    """The router's own logits: x @ W^T (+ bias); DeepSeek-style routers compute them in float32,
    GraniteMoE casts them to float32 (``[routing] router_logits`` in the spec)."""
    routing = family.spec["routing"]
    if routing.get("router_logits") == "mlp":  # ZAYA: moeprune's MLP router, without a carried state
        return mlp_router_logits(router, hidden_states)[0].reshape(-1, router.router_mlp.out_proj.weight.shape[0])
    linear = family.spec["modules"].get("router_linear")  # AFMoE: the router's nn.Linear is router.gate
    if linear:
        router = router.get_submodule(linear)
    x = hidden_states.reshape(-1, router.weight.shape[-1])
    weight = router.weight
    routing = family.spec["routing"]
    mode = routing.get("router_logits", "float32_inputs" if routing["rule"].startswith("deepseek") else "native")
    if mode == "float32_inputs":
        x, weight = x.type(torch.float32), weight.type(torch.float32)
    logits = F.linear(x, weight, getattr(router, "bias", None))
    return logits.float() if mode == "float32_outputs" else logits


def patch_routers(model, keep: dict[int, list[int]] | None = None, params=None):
    """Route every MoE layer of ``model`` with moeprune.routing.route, dropped experts masked out.

    ``keep`` maps a decoder layer to its kept experts (None: nothing masked); ``params`` overrides
    the routing parameters read from the config (e.g. collapsed groups).
    """
    family, layers = moe_layers(model)
    params = params or family.routing_params(model.config)
    for index, layer in layers:
        router = family.router(layer)
        mask = None
        if keep is not None:
            mask = torch.zeros(family.expert_count(layer), dtype=torch.bool)
            mask[keep[index]] = True
        if family.block_route(layer) is not None:  # DBRX: the router returns logits; the MoE block routes them
            owner, _, attribute = family.spec["modules"]["route"].rpartition(".")
            setattr(layer.get_submodule(owner), attribute,
                    lambda logits, _mask=mask: route(logits, params, None, expert_mask=_mask))
            continue

        def forward(self, hidden_states, *bias_argument, _mask=mask, _layer=layer, **state):
            if family.spec["routing"].get("router_state"):  # ZAYA: the MLP router and its carried state
                logits, next_state = mlp_router_logits(self, hidden_states, state.get(family.spec["routing"]["router_state"]))
                logits = logits.reshape(-1, logits.shape[-1])
                weights, indices = route(logits, params, family.correction_bias(_layer), expert_mask=_mask)
                return logits, weights, indices, next_state
            logits = router_logits(family, self, hidden_states)
            bias = family.correction_bias(_layer)
            scale = family.router_scale(_layer)
            table = family.expert_table(_layer)
            if table is not None:  # DeepSeek-V4's hash-routed layers: the token's table row (remapped under the mask)
                weights, indices = route(logits, params, None, expert_mask=_mask, expert_ids=table[bias_argument[0].reshape(-1)])
                return logits, weights, indices
            if params.shared_in_router:  # Inkling: routed logits, weights, indices and the shared experts' gammas
                weights, indices, gammas = route_with_shared(logits, params, bias, _mask, hidden_states.dtype, scale)
                return logits[..., :-params.shared_in_router], weights, indices, gammas
            weights, indices = route(logits, params, bias, expert_mask=_mask, hidden_dtype=hidden_states.dtype,
                                     router_scale=scale)
            if family.gate_on_input:  # Llama 4: dense scores (0 off the top-k) and the logits
                return dense_scores(logits, weights, indices), logits
            if family.sorted_dispatch:  # JetMoE: the pairs grouped by expert, then the logits
                return (*sorted_dispatch(indices, weights, logits.shape[-1]), logits)
            return logits, weights, indices

        router.forward = MethodType(forward, router)
    return model


def dense_scores(logits, weights, indices) -> torch.Tensor:
    """[T, E] scores: the top-k weights at their experts, 0 elsewhere (Llama 4's router output)."""
    return torch.zeros_like(logits).scatter(1, indices, weights)


def model_inputs() -> dict[str, torch.Tensor]:
    """Two rows of 20 tokens, the second right-padded (6 padding positions)."""
    generator = torch.Generator().manual_seed(7)
    input_ids = torch.randint(3, 500, (2, 20), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -6:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def vanilla_class(path: Path):
    """The transformers class that loads a checkpoint folder whole: a multimodal wrapper's own class
    (``[text] model_class``: its towers too), else AutoModelForCausalLM."""
    import transformers

    family = family_for_model_type(json.loads((Path(path) / "config.json").read_text())["model_type"])
    wrapper = family.spec.get("text", {}).get("model_class")
    return getattr(transformers, wrapper) if wrapper else AutoModelForCausalLM


def vanilla(path: Path):
    """A checkpoint loaded by plain transformers (float32, eval; a multimodal wrapper with its own class,
    towers included); loading must be clean."""
    model, info = vanilla_class(path).from_pretrained(
        str(path), local_files_only=True, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def text_runner(model):
    """What runs ``model`` on text only: the model itself (a multimodal wrapper's own class too), except
    Llama4ForConditionalGeneration, whose forward fails in transformers 5.24 (it builds its output from an
    ``image_outputs`` its language model does not return): its text-only forward is its causal-LM
    submodule ``language_model`` on the same inputs, called directly."""
    return model.language_model if type(model).__name__ == "Llama4ForConditionalGeneration" else model


def logits_of(model) -> torch.Tensor:
    """The model's logits on :func:`model_inputs` (text only)."""
    with torch.no_grad():
        return text_runner(model)(**model_inputs(), use_cache=False).logits


def assert_written_equals_in_memory(source, out, plan) -> None:
    """The checkpoint written at ``out`` (loaded with moeprune.load) gives the logits of ``plan``
    applied in memory to ``source``'s model, and holds fewer parameters than ``source``."""
    import moeprune
    from moeprune.apply import apply_plan_in_memory
    from moeprune.calibration.engine import load_full_model

    loaded = moeprune.load(out)
    in_memory = apply_plan_in_memory(load_full_model(source), plan)
    ids = torch.randint(1, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = in_memory(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in load_full_model(source).parameters())


def text_section(family_name: str, config: dict) -> dict:
    """The part of a config.json dict holding the MoE keys: a multimodal wrapper's text config, else all of it."""
    key = known_families()[family_name].text_key
    return config[key] if key and key in config else config  # a text config holds the keys itself


def num_experts_in_config(family_name: str, config: dict) -> list[int]:
    return [config_value(text_section(family_name, config), key) for key in known_families()[family_name].num_experts_keys]


def router_spec(family_name: str) -> dict:
    """routers/<family>.toml as written (a spec that ``extends`` another: merged into it, as moeprune reads it)."""
    spec = tomllib.loads((REPO / "routers" / f"{family_name}.toml").read_text(encoding="utf-8"))
    return extended_spec(spec, known_families()) if "extends" in spec else spec


def leftovers(out: Path) -> list[str]:
    """Temporary / set-aside folders next to ``out`` (``.{name}.tmp-*``, ``.{name}.old-*``)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def assert_output_folder(out: Path, plan: Plan, source: Path) -> None:
    """moeprune_plan.json with a "layers" map, companion files and a model card; no temp folders."""
    saved = json.loads((out / PLAN_FILENAME).read_text(encoding="utf-8"))
    assert isinstance(saved["layers"], dict)
    assert saved["layers"] == {str(layer): list(kept) for layer, kept in plan.layers.items()}
    assert all(key.isdigit() for key in saved["layers"])
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    card = (out / "README.md").read_text(encoding="utf-8")
    assert plan.method in card and "moeprune" in card
    assert leftovers(out) == []


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():
                assert key not in tensors, f"{key} appears in two shards"
                tensors[key] = handle.get_tensor(key)
    return tensors


def as_loaded_in(model, dtype: torch.dtype):
    """``model`` cast to ``dtype`` as ``from_pretrained(dtype=...)`` loads it: the parameters and buffers
    the model keeps in float32 (``_keep_in_fp32_modules_strict``, e.g. DeepSeek's and Inkling-2's router
    weight, whose router cannot run on a bf16 weight) stay in float32."""
    keep = fp32_pattern(model, dtype)
    model.to(dtype)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if keep is not None and keep.search(name) and tensor.is_floating_point():
            tensor.data = tensor.data.float()
    return model


def assert_routing_is_the_models(model) -> None:
    """moeprune.routing on the router's own logits equals the router's weights and indices bitwise,
    on random inputs (two scales), in every MoE layer; the group limit and the correction bias are
    checked to matter where the family has them."""
    family, layers = moe_layers(model)
    assert layers
    params = family.routing_params(model.config)
    dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(1)
    for index, layer in layers:
        router = family.router(layer)
        bias = family.correction_bias(layer)
        if bias is not None:
            assert bias.abs().sum() > 0  # the correction bias is exercised
        table = family.expert_table(layer)  # DeepSeek-V4's hash-routed layers: experts by token id
        state_key = family.spec["routing"].get("router_state")  # ZAYA: the previous layer's router state
        for scale in (1.0, 5.0):
            x = (scale * torch.randn(97, text_model(model).config.hidden_size, generator=generator)).to(dtype)
            if table is not None:
                token_ids = torch.randint(0, table.shape[0], (97,), generator=generator)
                with torch.no_grad():
                    logits, weights, indices = router(x, token_ids)
                assert torch.equal(router_logits(family, router, x), logits)
                ours_weights, ours_indices = route(logits, params, None, expert_ids=table[token_ids])
                assert torch.equal(ours_indices, indices) and torch.equal(ours_weights, weights), (family.name, index)
                assert ours_weights.dtype == weights.dtype
                continue
            if state_key:
                state = torch.randn(1, 97, router.down_proj.weight.shape[0], generator=generator).to(dtype)
                with torch.no_grad():
                    outputs = router(*family.router_inputs(layer, x), **{state_key: state})
                    ours_logits, ours_state = mlp_router_logits(router, x.unsqueeze(0), state)
                assert torch.equal(ours_state, outputs[3]), (family.name, index)
                assert torch.equal(ours_logits.reshape(outputs[0].shape), outputs[0]), (family.name, index)
                ours_weights, ours_indices = route(outputs[0], params, bias)
                assert torch.equal(ours_indices, outputs[2]) and torch.equal(ours_weights, outputs[1]), (family.name, index)
                assert ours_weights.dtype == outputs[1].dtype
                continue
            with torch.no_grad():
                outputs = router(*family.router_inputs(layer, x))
                if family.block_route(layer) is not None:  # DBRX: logits only; the MoE block routes them
                    outputs = (outputs, *family.block_route(layer)(outputs))
            if family.gate_on_input:  # dense scores: compared as such, every expert's entry
                scores, logits = outputs
                assert torch.equal(router_logits(family, router, x), logits)
                ours_weights, ours_indices = route(logits, params, bias, hidden_dtype=x.dtype)
                assert (ours_weights > 0).all() and scores.dtype == ours_weights.dtype
                assert torch.equal(dense_scores(logits, ours_weights, ours_indices), scores), (family.name, index)
                continue
            if family.sorted_dispatch:  # JetMoE: the rule's indices and weights, grouped by expert as the model does
                logits = outputs[4]
                assert torch.equal(router_logits(family, router, x), logits)
                ours_weights, ours_indices = route(logits, params, bias, hidden_dtype=x.dtype)
                ours = sorted_dispatch(ours_indices, ours_weights, logits.shape[-1])
                assert all(torch.equal(a, b) for a, b in zip(ours[:3], outputs[:3])) and ours[3] == outputs[3], (family.name, index)
                assert ours_weights.dtype == outputs[2].dtype == x.dtype
                back = topk_of_sorted_dispatch(outputs[0], outputs[2], outputs[3], params.top_k)
                assert torch.equal(back[0], ours_indices) and torch.equal(back[1], ours_weights)
                continue
            logits, weights, indices = outputs[:3]  # Inkling's router also returns the shared experts' gammas
            full = router_logits(family, router, x)  # Inkling: its shared experts' logits follow the routed ones
            assert torch.equal(full[..., :logits.shape[-1]], logits)
            ours_weights, ours_indices = route(full, params, bias, hidden_dtype=x.dtype, router_scale=family.router_scale(layer))
            if params.shared_in_router:
                assert torch.equal(route_with_shared(full, params, bias, None, x.dtype, family.router_scale(layer))[2], outputs[3])
            assert ours_weights.dtype == weights.dtype
            assert torch.equal(ours_indices, indices), (family.name, index)
            assert torch.equal(ours_weights, weights), (family.name, index)
            binding = params.rule == "deepseek_v3" or params.top_k > params.topk_group
            if family.group_limited(model.config) and binding and scale == 1.0:
                # the group limit matters on these inputs, so the test would catch ignoring it
                flat = dataclasses.replace(params, n_group=1, topk_group=1)
                _, flat_indices = route(logits, flat, bias)
                assert not torch.equal(flat_indices.sort(dim=-1).values, indices.sort(dim=-1).values)


def assert_same_stats(a: RouterStats, b: RouterStats) -> None:
    assert a.layers.keys() == b.layers.keys() and a.layers
    for layer in a.layers:
        assert a.layers[layer].keys() == b.layers[layer].keys()
        for name, value in a.layers[layer].items():
            assert torch.equal(value, b.layers[layer][name]), (layer, name)


def uniform_kept(geometry, drop_every: int = 4) -> dict[int, list[int]]:
    """A valid uniform kept set (equal per routing group where routing is group-limited)."""
    if geometry.grouped:
        size = geometry.experts_per_group
        return {layer: [e for e in range(geometry.num_experts) if e % size != 1] for layer in geometry.moe_layers}
    return {layer: [e for e in range(geometry.num_experts) if e % drop_every != 1] for layer in geometry.moe_layers}


@pytest.fixture
def read_log(monkeypatch):
    """Record every tensor read of LazyCheckpoint: (name, rows or None)."""
    log: list[tuple[str, tuple[int, ...] | None]] = []
    get, get_rows = LazyCheckpoint.get, LazyCheckpoint.get_rows

    def logged_get(self, name):
        log.append((name, None))
        return get(self, name)

    def logged_rows(self, name, indices):
        log.append((name, tuple(indices)))
        return get_rows(self, name, indices)

    monkeypatch.setattr(LazyCheckpoint, "get", logged_get)
    monkeypatch.setattr(LazyCheckpoint, "get_rows", logged_rows)
    return log


# --------------------------------------------------------------------------------------------------
# fixtures


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


# --------------------------------------------------------------------------------------------------
# pruned checkpoints loaded by vanilla transformers (conformance test 3 and test_core's group cases)

VANILLA_SCRIPT = r"""
import json, sys
import torch
torch.set_num_threads(1)
import transformers
from transformers import AutoModelForCausalLM

jobs_path, inputs_path, results_path = sys.argv[1:4]
jobs = json.load(open(jobs_path))
inputs = torch.load(inputs_path, weights_only=True)
results = {}
for name, path in jobs.items():
    try:
        architecture = (json.load(open(path + "/config.json")).get("architectures") or [""])[0]
        # a multimodal wrapper loads with its own class, towers included; its text logits are compared
        cls = getattr(transformers, architecture) if architecture.endswith("ForConditionalGeneration") else AutoModelForCausalLM
        model, info = cls.from_pretrained(path, local_files_only=True, dtype=torch.float32, output_loading_info=True)
        model.eval()
        modules = list(model.named_modules())
        if any("language_model" in name for name, _ in modules):  # a tower's experts (dots.3 note's vision MoE) are not pruned
            modules = [(name, m) for name, m in modules if "language_model" in name]
        runner = model.language_model if architecture == "Llama4ForConditionalGeneration" else model  # conftest.logits_of
        with torch.no_grad():
            logits = runner(**inputs, use_cache=False).logits
        results[name] = {
            "logits": logits,
            "info": {key: sorted(str(v) for v in value) for key, value in info.items()},
            "experts": [int(getattr(m, "num_experts", getattr(m, "num_routed_experts", -1)))  # fused routed expert blocks
                        for _, m in modules  # (not a shared expert's Linear); LongCat-Flash: num_routed_experts;
                        if (any(isinstance(getattr(m, n, None), torch.nn.Parameter) for n in ("gate_up_proj", "up_proj"))
                            or isinstance(getattr(getattr(m, "mlp", None), "w1", None), torch.nn.Parameter))  # DBRX: mlp.w1
                        and (hasattr(m, "num_experts") or hasattr(m, "num_routed_experts"))],  # Nemotron-H: ungated up_proj
        }
    except Exception as exc:
        results[name] = {"error": repr(exc)}
results["__moeprune_imported__"] = any(m == "moeprune" or m.startswith("moeprune.") for m in sys.modules)
torch.save(results, results_path)
"""

#: (family, method) pruned 50% by the conformance suite's vanilla-load test, for every family
PRUNE_CASES = [(name, method) for name in TINY_FAMILIES for method in ("reap", "frequency")]
# name: (family, checkpoint config overrides, plan_pruning budget). The first two collapse the groups
# with budgets that do not divide evenly into them; the third keeps group-limited routing where it
# binds (DeepSeek-V2 scores a group by its best expert: only top_k > topk_group makes the limit bite).
GROUP_CASES = {
    "deepseek_v3-collapse6": ("deepseek_v3", {}, {"keep": 6, "collapse_groups": True}),
    "deepseek_v2-collapse3": ("deepseek_v2", {}, {"keep": 3, "collapse_groups": True}),
    "deepseek_v2-2groups-topkgroup1": ("deepseek_v2", {"n_group": 2, "topk_group": 1}, {"keep": 4}),
}


@pytest.fixture(scope="session")
def vanilla_pruned(tmp_path_factory, tiny_checkpoint, family_stats):
    """Prune every case, then load all outputs in ONE subprocess that never imports moeprune.

    Returns {case name: {"family", "overrides", "out", "plan", "collapse", "result"}}; a case whose
    pruning failed holds "exception" instead (re-raised by its test).
    """
    root = tmp_path_factory.mktemp("vanilla")
    cases: dict[str, dict] = {}
    for family_name, method in PRUNE_CASES:
        name = f"{family_name}-{method}"
        out = root / name
        try:
            source = tiny_checkpoint(family_name)
            plan = api.prune(source, out, method=method, ratio=0.5, stats=family_stats(family_name), progress=False)
            cases[name] = {"family": family_name, "overrides": {}, "out": out, "plan": plan, "collapse": False}
        except Exception as exc:  # reported by the test of this case
            cases[name] = {"exception": exc}
    for name, (family_name, overrides, budget) in GROUP_CASES.items():
        out = root / name
        try:
            source = tiny_checkpoint(family_name, **overrides)
            stats = family_stats(family_name, **overrides)
            if budget.get("collapse_groups"):
                plain = {k: v for k, v in budget.items() if k != "collapse_groups"}
                with pytest.raises(PlanError, match="collapse"):  # not without the explicit option
                    api.plan_pruning(source, method="frequency", stats=stats, **plain)
            plan = api.plan_pruning(source, method="frequency", stats=stats, **budget)
            api.apply(source, plan, out, progress=False)
            cases[name] = {"family": family_name, "overrides": overrides, "out": out, "plan": plan,
                           "collapse": bool(budget.get("collapse_groups"))}
        except Exception as exc:
            cases[name] = {"exception": exc}

    jobs = {name: str(case["out"]) for name, case in cases.items() if "out" in case}
    (root / "jobs.json").write_text(json.dumps(jobs))
    torch.save(model_inputs(), root / "inputs.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", VANILLA_SCRIPT, str(root / "jobs.json"), str(root / "inputs.pt"), str(root / "results.pt")],
        capture_output=True, text=True, env=env, cwd=root, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = torch.load(root / "results.pt", weights_only=True)
    assert results.pop("__moeprune_imported__") is False
    for name in jobs:
        cases[name]["result"] = results[name]
    return cases


def needs_moeprune_load(family_name: str) -> bool:
    """The family's pruned outputs load with ``moeprune.load`` only: its expert-count key also sizes modules
    moeprune keeps whole (JetMoE's attention experts; ``[config] num_experts_shared_with``)."""
    return bool(known_families()[family_name].expert_count_shared)


def load_output(family_name: str, path: Path):
    """A pruned output loaded as its users load it: vanilla transformers, or ``moeprune.load`` for the
    families whose outputs need it (:func:`needs_moeprune_load`)."""
    if needs_moeprune_load(family_name):
        import moeprune

        return moeprune.load(path)
    return vanilla(path)


def check_expert_counts_in_config(family_name: str, config: dict, counts: dict[int, int], original: int) -> None:
    """config.json's expert counts: every stock key at the kept count (the same in every layer), or, for the
    families whose key also sizes other modules, the stock keys at the ``original`` count and the per-layer
    counts in the ``moeprune`` section (none when nothing is dropped)."""
    keys = len(known_families()[family_name].num_experts_keys)
    if not needs_moeprune_load(family_name):
        assert num_experts_in_config(family_name, config) == [next(iter(counts.values()))] * keys
        return
    assert num_experts_in_config(family_name, config) == [original] * keys
    if set(counts.values()) == {original}:
        assert "moeprune" not in config
    else:
        assert config["moeprune"] == {"format": 1, "experts_per_layer": {str(k): v for k, v in sorted(counts.items())}}


def check_vanilla_case(case, tiny_checkpoint):
    """Clean vanilla load, config and output folder; logits equal the masked original's. A family whose
    outputs need ``moeprune.load`` (:func:`needs_moeprune_load`): vanilla transformers must refuse the output
    loudly (the expert tensors' shapes differ from the config's), and ``moeprune.load`` gives the logits."""
    if "exception" in case:
        raise case["exception"]
    family_name, out, plan, result = case["family"], case["out"], case["plan"], case["result"]
    family = known_families()[family_name]
    source = tiny_checkpoint(family_name, **case["overrides"])
    kept_count = len(next(iter(plan.layers.values())))
    config = json.loads((out / "config.json").read_text())
    if needs_moeprune_load(family_name):
        assert "error" in result and "mismatch" in result["error"], result  # refused loudly, never loaded wrong
        check_expert_counts_in_config(family_name, config, {k: len(v) for k, v in plan.layers.items()}, plan.num_experts)
        loaded = load_output(family_name, out)
        assert {family.expert_count(layer) for _, layer in moe_layers(loaded)[1]} == {kept_count}
        result = {"logits": logits_of(loaded)}
    else:
        assert "error" not in result, result.get("error")
        assert result["info"]["missing_keys"] == []
        assert result["info"]["unexpected_keys"] == []
        assert result["info"]["mismatched_keys"] == []
        assert result["experts"] and set(result["experts"]) == {kept_count}
        assert num_experts_in_config(family_name, config) == [kept_count] * len(family.num_experts_keys)
    assert_output_folder(out, plan, source)

    original = vanilla(source)
    reference = logits_of(original)
    params = family.routing_params(original.config)
    # the patched router (un-masked) is the model's router: identical logits
    assert torch.equal(logits_of(patch_routers(original)), reference)
    if case["collapse"]:
        params = dataclasses.replace(params, n_group=1, topk_group=1)
    masked = logits_of(patch_routers(original, keep=plan.layers, params=params))
    assert not torch.allclose(masked, reference, atol=1e-3)  # the dropped experts did matter
    torch.testing.assert_close(result["logits"], masked, atol=1e-5, rtol=1e-4)
    return config


def per_group_counts(kept: list[int], n_group: int, per_group: int) -> list[int]:
    return [sum(1 for e in kept if e // per_group == g) for g in range(n_group)]


def script_module(name: str):
    """Generator for a module-scoped fixture: scripts/<name>.py imported as a module (scripts/ is not
    a package), with scripts/ on sys.path while the fixture lives."""
    import importlib

    scripts = str(Path(__file__).resolve().parents[1] / "scripts")
    sys.path.insert(0, scripts)
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(scripts)
