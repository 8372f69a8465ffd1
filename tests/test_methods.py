"""The method registry (moeprune.methods) is the single source of methods for the CLI, the API, the
sweep and the default job; `random` plans without statistics through the common path; the CLI's
help and argument errors import neither torch nor transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeprune import api
from moeprune.cli import build_parser, main
from moeprune.errors import MoePruneError, PlanError
from moeprune.methods import (IMPLEMENTED_OPS, IMPLEMENTED_SELECTORS, OPS, SELECTORS, Method, get_method,
                              method_names, methods, register_method, unregister_method)
from moeprune.scoring import SCORERS, _layer_seed
from moeprune.sweep import SweepSettings, _runs

ROOT = Path(__file__).resolve().parent.parent
BUILT_IN = {"random", "frequency", "soft_count", "tcess", "ean", "ean_mean", "reap", "easy_ep"}
#: built-in methods with their own planner instead of a per-expert scorer: merging, STUN/DERN, dense pruning
PLANNED = {"hc_smoe", "m_smoe", "ream", "stun", "dern", "magnitude", "wanda_sp", "flap", "taylor", "dense_random", "angular",
           "replaceme", "naee",
           "camera_p", "wanda_neuron", "random_neuron", "heapr"}


def _subparser(parser, *path: str):
    """The (sub-)subparser reached by ``path`` (e.g. "profile", "build")."""
    for name in path:
        action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = action.choices[name]
    return parser


def _choices(parser, *path: str, option: str = "--method") -> list[str]:
    sub = _subparser(parser, *path)
    return list(next(a for a in sub._actions if option in a.option_strings).choices)


def _by_index(stats, *, num_experts, **_):
    """score_j = j (test only): the last experts are kept."""
    return torch.arange(num_experts, dtype=torch.float64)


@pytest.fixture
def throwaway():
    """A method registered for one test only (no statistics needed), then unregistered."""
    method = register_method(Method("test_only_last", _by_index, requires=(), description="keeps the last experts",
                                    reference="none (test)"))
    try:
        yield method
    finally:
        unregister_method("test_only_last")


def test_builtin_entries_are_complete():
    assert set(method_names()) == BUILT_IN | PLANNED and BUILT_IN == set(SCORERS)
    for method in methods().values():
        assert method.description and method.reference
        assert method.selector in SELECTORS and method.op in OPS
        if method.name in PLANNED:  # the planner (and a neuron scorer, if any) is imported on first use
            assert method.plan_fn.__doc__ and (method.scorer is None or method.granularity == "neurons")
            assert method.scorer is None or method.fn.__doc__
            continue
        assert method.fn.__doc__ and "score_j" in method.fn.__doc__  # the scorer is imported on first use
    assert get_method("random").requires == () and not get_method("random").needs_stats
    assert get_method("random").stochastic and not get_method("reap").stochastic
    assert {n for n, m in methods().items() if m.needs_outputs} == {"ean", "ean_mean", "reap", "easy_ep", "ream"}
    assert "arxiv.org/abs/2510.13999" in get_method("reap").reference


def test_registered_method_appears_everywhere(throwaway, tiny_checkpoint, tmp_path):
    parser = build_parser()
    for path in (("prune",), ("demo",), ("profile", "build")):
        assert "test_only_last" in _choices(parser, *path), path
    # the sweep (and so the default job, which runs the sweep's protocol) takes every registered method
    default_runs = {m.name for m, _, _ in _runs(SweepSettings(ratios=(0.0, 0.5)))}
    assert "test_only_last" in default_runs
    # ... except dense methods, whose ratio removes a share of another unit: only when named
    dense = {name for name, method in methods().items() if method.granularity == "dense"}
    assert dense == {"magnitude", "wanda_sp", "flap", "taylor", "dense_random", "angular", "replaceme"} and not dense & default_runs
    assert {m.name for m, _, _ in _runs(SweepSettings(ratios=(0.0, 0.5), methods=("flap",)))} == {"flap"}
    # the API plans with it, through the same path as every method; it needs no statistics
    ckpt = tiny_checkpoint("mixtral")
    plan = api.plan_pruning(ckpt, method="test_only_last", keep=4)
    assert all(kept == [4, 5, 6, 7] for kept in plan.layers.values()) and plan.method == "test_only_last"
    # and `moeprune prune` writes it
    assert main(["-q", "prune", str(ckpt), "--method", "test_only_last", "--keep", "4", "--out", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "moeprune_plan.json").read_text())["layers"]["1"] == [4, 5, 6, 7]


def test_unregistered_method_disappears():
    register_method(Method("test_only_gone", _by_index, requires=()))
    unregister_method("test_only_gone")
    assert "test_only_gone" not in _choices(build_parser(), "prune")
    assert "test_only_gone" not in {m.name for m, _, _ in _runs(SweepSettings(ratios=(0.0, 0.5)))}
    with pytest.raises(ValueError, match="already registered"):
        register_method(Method("reap", _by_index))


def test_unknown_method_lists_the_known_ones(tiny_checkpoint, capsys):
    with pytest.raises(PlanError, match="unknown method 'bogus'; choose one of: .*easy_ep.*random.*reap"):
        get_method("bogus")
    with pytest.raises(PlanError, match="unknown method 'bogus'"):
        api.plan_pruning(tiny_checkpoint("mixtral"), method="bogus", ratio=0.5)
    with pytest.raises(PlanError, match="unknown compression method"):
        _runs(SweepSettings(methods=("bogus",)))
    assert main(["prune", "x", "--method", "bogus", "--ratio", "0.5", "--out", "y"]) == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


def test_declared_but_unimplemented_kinds_are_refused(tiny_checkpoint):
    assert set(IMPLEMENTED_SELECTORS) < set(SELECTORS) and set(IMPLEMENTED_OPS) < set(OPS)
    with pytest.raises(ValueError, match="unknown selector"):
        register_method(Method("test_only_bad", _by_index, selector="nearest"))
    register_method(Method("test_only_cluster", None, requires=(), selector="clustering", op="merge"))
    try:
        with pytest.raises(PlanError, match="not implemented yet"):
            api.plan_pruning(tiny_checkpoint("mixtral"), method="test_only_cluster", ratio=0.5)
    finally:
        unregister_method("test_only_cluster")


def test_a_planner_method_builds_its_own_plan_with_its_options(tiny_checkpoint, tmp_path):
    """A method with a planner gets the model info, the statistics and its options (defaults filled
    in); an option it does not take is refused; its plan is written like any other."""
    calls = []

    def plan_last(info, stats, *, method, ratio, seed, protect_super_experts, keep_last):
        assert method.name == "test_only_planner"
        calls.append((stats, ratio, seed, protect_super_experts, keep_last))
        from moeprune.plan import Plan

        kept = list(range(info.geometry.num_experts))[-keep_last:]
        return Plan(layers={layer: kept for layer in info.geometry.moe_layers}, method="test_only_planner",
                    family=info.geometry.family, num_experts=info.geometry.num_experts)

    register_method(Method("test_only_planner", None, requires=(), planner=plan_last, options=(("keep_last", 2),)))
    try:
        source = tiny_checkpoint("mixtral")
        plan = api.plan_pruning(source, method="test_only_planner", ratio=0.5)
        assert calls[-1] == (None, 0.5, 0, True, 2) and set(map(tuple, plan.layers.values())) == {(6, 7)}
        plan = api.prune(source, tmp_path / "out", method="test_only_planner", ratio=0.5, options={"keep_last": 3})
        assert calls[-1][-1] == 3 and set(map(tuple, plan.layers.values())) == {(5, 6, 7)}
        assert (tmp_path / "out" / "config.json").is_file()
        with pytest.raises(PlanError, match="does not take the option.*keep_first.*it takes: keep_last"):
            api.plan_pruning(source, method="test_only_planner", ratio=0.5, options={"keep_first": 1})
        with pytest.raises(PlanError, match="does not take"):
            api.plan_pruning(source, method="reap", ratio=0.5, options={"keep_last": 1})
    finally:
        unregister_method("test_only_planner")


def test_random_without_statistics_keeps_the_hand_drawn_experts(tiny_checkpoint, family_stats):
    """random plans without statistics through the common path; its kept sets are the top-k of the
    documented draws 1 - u, u ~ U[0, 1) from a generator seeded by hash(seed, layer), as before."""
    ckpt = tiny_checkpoint("mixtral")
    info = api.model_info(ckpt)
    for seed in (0, 3):
        plan = api.plan_pruning(ckpt, method="random", keep=4, seed=seed)
        assert plan.protected == {} and plan.calibration == {}
        for layer in info.geometry.moe_layers:
            generator = torch.Generator().manual_seed(_layer_seed(seed, layer))
            draws = 1.0 - torch.rand(info.geometry.num_experts, generator=generator, dtype=torch.float64)
            assert plan.layers[layer] == sorted(torch.argsort(draws, descending=True)[:4].tolist())
    # a calibration pass for random still collects the frequency it reads when present (unrouted experts
    # score 0), as every method's pass collects what its entry names
    assert "routing" in api.statistics_for("random", protect_super_experts=False)
    assert api.statistics_for("reap", protect_super_experts=False) == ("tokens", "routing", "expert_outputs")
    # needing statistics is a clear error for a method that reads them
    with pytest.raises(MoePruneError, match="needs calibration statistics"):
        api.plan_pruning(ckpt, method="reap", keep=4)
    # with statistics in which every expert is routed and nothing is protected, the same experts
    stats = family_stats("mixtral")
    if all(bool((e["frequency"] > 0).all()) for e in stats.layers.values()):
        with_stats = api.plan_pruning(ckpt, method="random", keep=4, stats=stats, protect_super_experts=False)
        assert with_stats.layers == api.plan_pruning(ckpt, method="random", keep=4).layers


# --------------------------------------------------------------------------------------------------
# start-up: no torch/transformers for help and argument errors

_PROBE = """
import json, sys
from moeprune import cli
argv = json.loads(sys.argv[1])
code = cli.main(argv)  # argparse's exits (help: 0, argument errors: 2) come back as return values
print(json.dumps({"code": code, "heavy": sorted(m for m in ("torch", "transformers") if m in sys.modules)}))
"""


def _probe(argv: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(argv)], capture_output=True, text=True, env=env,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _every_help() -> list[list[str]]:
    parser = build_parser()
    top = _subparser(parser)
    argvs = [["--help"]]
    for name in _subparser_names(parser):
        argvs.append([name, "--help"])
        sub = _subparser(parser, name)
        argvs += [[name, inner, "--help"] for inner in _subparser_names(sub)]
    assert top is parser
    return argvs


def _subparser_names(parser) -> list[str]:
    actions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return list(actions[0].choices) if actions else []


def test_help_and_argument_errors_import_neither_torch_nor_transformers():
    argvs = _every_help()
    assert ["prune", "--help"] in argvs and ["profile", "build", "--help"] in argvs and ["serve", "--help"] in argvs
    errors = [["prune", "m", "--ratio", "0.5", "--out", "o"],  # missing --method
              ["prune", "m", "--method", "bogus", "--ratio", "0.5", "--out", "o"],  # invalid choice
              ["profile", "build", "m", "--task", "t"], ["no-such-command"]]
    for argv in argvs + errors:
        result = _probe(argv)
        assert result["code"] == (0 if argv in argvs else 2), argv
        assert result["heavy"] == [], f"{argv} imported {result['heavy']}"
