"""Tests of the offline testbed corpus, the testbed recipes and the training pieces (no full training)."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest

from moeprune.testbed.corpus import (
    DOMAINS,
    HELD_OUT_SPLITS,
    MATH_RE,
    SPLITS,
    build_corpus,
    chunk_text,
    corpus_is_built,
    format_math,
    load_domain,
    load_manifest,
    manifest_hash,
    math_answer,
    math_prompt,
    parse_math,
    parse_math_answer,
    split_of,
)

SMALL_CAP = 120_000  # bytes per domain: keeps a build around a second


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus_a")
    build_corpus(out, seed=0, max_domain_bytes=SMALL_CAP)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_corpus(corpus, tmp_path):
    other = tmp_path / "corpus_b"
    build_corpus(other, seed=0, max_domain_bytes=SMALL_CAP)
    a, b = _files(corpus), _files(other)
    expected = {"manifest.json"} | {f"{d}/{s}.jsonl" for d in DOMAINS for s in SPLITS}
    assert set(a) == expected
    assert set(b) == expected
    for name in expected:
        assert a[name] == b[name], f"{name} differs between two builds with the same seed"
    assert manifest_hash(corpus) == manifest_hash(other)


def test_other_seed_changes_only_math(corpus, tmp_path):
    other = tmp_path / "corpus_seed1"
    build_corpus(other, seed=1, max_domain_bytes=SMALL_CAP, domains=("code", "math"))
    assert (other / "code" / "train.jsonl").read_bytes() == (corpus / "code" / "train.jsonl").read_bytes()
    assert (other / "math" / "train.jsonl").read_bytes() != (corpus / "math" / "train.jsonl").read_bytes()
    assert load_manifest(other).seed == 1


def test_every_domain_and_split_non_empty_and_manifest_matches(corpus):
    manifest = load_manifest(corpus)
    assert manifest.seed == 0
    assert set(manifest.domains) == set(DOMAINS)
    for d in DOMAINS:
        assert manifest.domains[d]["sources"], d
        for s in SPLITS:
            docs = load_domain(corpus, d, s)
            info = manifest.domains[d]["splits"][s]
            assert docs, f"{d}/{s} is empty"
            assert all(isinstance(t, str) and t.strip() for t in docs)
            assert info["docs"] == len(docs)
            assert info["bytes"] == sum(len(t.encode("utf-8")) for t in docs)
            assert info["sha256"] == hashlib.sha256((corpus / info["path"]).read_bytes()).hexdigest()
        # the train split is the bulk of every domain
        assert len(load_domain(corpus, d, "train")) > len(load_domain(corpus, d, "test"))
    assert corpus_is_built(corpus)


def test_jsonl_lines_are_text_objects(corpus):
    for line in (corpus / "prose" / "train.jsonl").read_text(encoding="utf-8").splitlines():
        obj = json.loads(line)
        assert list(obj) == ["text"]


def test_held_out_splits_disjoint_from_train(corpus):
    train_all = {t for d in DOMAINS for t in load_domain(corpus, d, "train")}
    for d in DOMAINS:
        train = set(load_domain(corpus, d, "train"))
        val = set(load_domain(corpus, d, "validation"))
        test = set(load_domain(corpus, d, "test"))
        assert not (train & val), d
        assert not (train & test), d
        assert not (val & test), d
        for s in HELD_OUT_SPLITS:
            assert not (set(load_domain(corpus, d, s)) & train_all), f"{d}/{s} text appears in training"
    # math: no held-out *question* was trained on, even inside another document
    def questions(split):
        return {p for doc in load_domain(corpus, "math", split) for p, _ in parse_math(doc)}

    train_q = questions("train")
    for s in HELD_OUT_SPLITS:
        held = questions(s)
        assert held and not (held & train_q)


def test_split_assignment_is_stable_and_roughly_90_5_5():
    keys = [f"stdlib/mod{i}.py" for i in range(4000)]
    splits = [split_of(k) for k in keys]
    assert splits == [split_of(k) for k in keys]
    frac = splits.count("train") / len(splits)
    assert 0.87 < frac < 0.93
    assert splits.count("validation") > 100 and splits.count("test") > 100


def test_math_answers_correct(corpus):
    n = 0
    for s in SPLITS:
        for doc in load_domain(corpus, "math", s):
            for line in doc.splitlines():
                m = MATH_RE.match(line)
                assert m, f"bad math line {line!r}"
                a, op, b, ans = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
                expected = {"+": a + b, "-": a - b, "*": a * b}[op]
                assert ans == expected, line
                assert ans >= 0
                n += 1
    assert n > 100


def test_math_format_helpers():
    line = format_math(37, "+", 48)
    assert line == "Q: 37+48=? A: 85"
    assert math_prompt(line) == "Q: 37+48=? A:"
    assert parse_math(line + "\nnot a question\n" + format_math(12, "*", 3)) == [
        ("Q: 37+48=? A:", 85),
        ("Q: 12*3=? A:", 36),
    ]
    assert math_answer(9, "-", 4) == 5
    assert parse_math_answer(" 85\nQ: 1+1=? A: 2") == 85
    assert parse_math_answer(" no digits") is None


def test_chunk_text_bounds():
    text = "\n\n".join(("para %d " % i) * 40 for i in range(30)) + "\n\n" + "x" * 5000
    chunks = chunk_text(text, max_chars=500, min_chars=10)
    assert chunks
    assert all(len(c) <= 500 for c in chunks)
    assert sum(c.count("x") for c in chunks) == 5000


# --------------------------------------------------------------------------- recipes / training


def test_recipes_registry_and_configs():
    from moeprune.testbed.models import RECIPES, build_config, get_recipe, recipe_hash

    assert {"mixtral", "qwen3moe", "deepseekv3", "tiny"} <= set(RECIPES)
    mix = build_config("mixtral")
    assert type(mix).__name__ == "MixtralConfig"
    assert (mix.num_local_experts, mix.num_experts_per_tok, mix.hidden_size, mix.num_hidden_layers) == (16, 2, 256, 4)
    assert mix.vocab_size == 4096
    assert 0.01 <= mix.router_aux_loss_coef <= 0.02

    qwen = build_config("qwen3moe")
    assert type(qwen).__name__ == "Qwen3MoeConfig"
    assert 32 <= qwen.num_experts <= 64 and 4 <= qwen.num_experts_per_tok <= 8
    assert qwen.moe_intermediate_size < qwen.hidden_size
    assert 0.01 <= qwen.router_aux_loss_coef <= 0.02

    ds = build_config("deepseekv3")
    assert type(ds).__name__ == "DeepseekV3Config"
    assert ds.n_shared_experts == 1 and ds.first_k_dense_replace == 1
    assert ds.n_group > 1 and ds.topk_group < ds.n_group
    assert ds.n_routed_experts % ds.n_group == 0 and ds.n_routed_experts // ds.n_group >= 2
    assert get_recipe("deepseekv3").bias_update_gamma == pytest.approx(1e-3)

    for name, r in RECIPES.items():
        assert r.steps > 0 and r.name == name
        assert not build_config(name).output_router_logits  # saved checkpoints do not emit router logits
    hashes = {recipe_hash(n) for n in RECIPES}
    assert len(hashes) == len(RECIPES)
    assert recipe_hash("tiny") == recipe_hash(get_recipe("tiny"))
    with pytest.raises(KeyError):
        get_recipe("nope")


def test_tiny_recipe_builds_and_runs_forward_backward():
    import torch

    from moeprune.testbed.models import build_model, count_parameters, get_recipe

    recipe = get_recipe("tiny")
    model = build_model(recipe, seed=0)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert 100_000 < count_parameters(model) < 1_000_000
    model.train()
    ids = torch.randint(0, recipe.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    assert out.aux_loss is not None and torch.isfinite(out.aux_loss)
    assert torch.isfinite(out.loss)
    # near-uniform logits at init: LM loss close to log(vocab)
    lm = float(out.loss.detach()) - recipe.router_aux_loss_coef * float(out.aux_loss.detach())
    assert abs(lm - math.log(recipe.vocab_size)) < 0.5
    out.loss.backward()
    layer = model.model.layers[0].mlp
    assert layer.gate.weight.grad is not None and layer.gate.weight.grad.abs().sum() > 0
    assert layer.experts.gate_up_proj.grad is not None and layer.experts.gate_up_proj.grad.abs().sum() > 0
    # same seed -> same initial weights
    again = build_model(recipe, seed=0)
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_deepseek_bias_update_moves_against_load():
    import torch

    from moeprune.testbed.models import build_model, get_recipe
    from moeprune.testbed.train import BiasBalancer

    r = get_recipe("deepseekv3")
    small = replace(r, config={**r.config, "hidden_size": 32, "intermediate_size": 32,
                               "moe_intermediate_size": 8, "num_hidden_layers": 2})
    model = build_model(small, vocab_size=64, seed=0)
    bal = BiasBalancer(model, gamma=1e-3)
    assert len(bal.routers) == 1  # layer 0 is dense (first_k_dense_replace=1)
    router = bal.routers[0]
    with torch.no_grad():
        model(input_ids=torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1)))
    load = bal._loads[id(router)].float().clone()
    assert load.sum() == 2 * 16 * small.config["num_experts_per_tok"]
    bal.step()
    bias = router.e_score_correction_bias
    expected = 1e-3 * torch.sign(load.mean() - load)
    assert torch.allclose(bias, expected)
    assert (bias[load > load.mean()] < 0).all() and (bias[load < load.mean()] > 0).all()
    bal.remove()


def test_train_testbed_two_steps_saves_checkpoint(corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moeprune.testbed.train import train_testbed

    out = train_testbed("tiny", corpus, tmp_path / "tiny", steps=2, seed=0, threads=1, progress=False)
    info = json.loads((out / "testbed.json").read_text())
    assert info["recipe"] == "tiny" and info["steps"] == 2 and info["seed"] == 0
    assert info["tokens_seen"] == 2 * 16 * 128
    assert math.isfinite(info["final_train_loss"])
    assert info["corpus_manifest_sha256"] == manifest_hash(corpus)
    assert set(info["validation_loss"]) == set(DOMAINS)
    assert (out / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.vocab_size == len(tok)
    assert not model.config.output_router_logits
    assert tok.decode(tok("Q: 12+7=? A: 19")["input_ids"]) == "Q: 12+7=? A: 19"
    # digits are one token each
    assert "19" not in tok.convert_ids_to_tokens(tok("19")["input_ids"])
    assert re.fullmatch(r"[0-9a-f]{12}", info["recipe_hash"])


def test_per_layer_balance_loss_matches_transformers_on_one_layer_and_is_per_layer():
    import torch
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from moeprune.testbed.train import per_layer_balance_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 8, generator=g)
    ours = per_layer_balance_loss([logits], top_k=2)
    theirs = load_balancing_loss_func((logits,), num_experts=8, top_k=2)
    assert torch.allclose(ours, theirs, atol=1e-5)

    # Two layers that each route every token to experts {0,1} and {6,7}: transformers' loss
    # (counts summed over layers) sees a half-balanced picture; the per-layer loss sees collapse.
    a = torch.full((32, 8), -10.0)
    a[:, :2] = 10.0
    b = torch.full((32, 8), -10.0)
    b[:, 6:] = 10.0
    collapsed = per_layer_balance_loss([a, b], top_k=2)
    assert float(collapsed) > float(load_balancing_loss_func((a, b), num_experts=8, top_k=2)) * 1.5
    assert float(collapsed) == pytest.approx(8.0, rel=1e-3)  # E * (1 * 0.5 + 1 * 0.5)
    # uniform probabilities with balanced top-k -> the optimum, top_k
    uniform = torch.zeros(8, 8)
    uniform += torch.eye(8) * 1e-3 + torch.roll(torch.eye(8), 1, dims=1) * 1e-3
    assert float(per_layer_balance_loss([uniform], top_k=2)) == pytest.approx(2.0, rel=1e-2)
