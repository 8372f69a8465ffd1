"""Task profiles (issue 4): formulas by hand, JSON store, build == plan_pruning, retrieval, export, CLI."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from pathlib import Path

import pytest
import torch

from conftest import SAMPLES, SEQ_LEN
from moeprune import api
from moeprune.cli import main
from moeprune.errors import OutputExistsError, PlanError
from moeprune.plan import PLAN_FILENAME, Plan
from moeprune.scoring import score_all
from moeprune.profiles import (
    GENERAL,
    PROFILE_FORMAT_VERSION,
    Profile,
    ProfileError,
    ProfileMatcher,
    ProfileStore,
    SignatureExtractor,
    build_profile,
    calibration_windows,
    check_profile_model,
    export_profile,
    fallback_threshold,
    intersect_profiles,
    knn_distances,
    load_profile,
    match_confidence,
    mean_logit_signature,
    mix_profiles,
    mix_scores,
    rebudget_profile,
    signature_distances,
    tcess_signature,
    union_profiles,
)
from moeprune.tokenizer import _tiny_corpus

SMALL = dict(samples=SAMPLES, seq_len=SEQ_LEN, window_lengths=(8, 16), max_windows=8, progress=False)
#: the constructed domains: enough windows of prompt-like lengths to calibrate the fallback threshold
DOMAIN = dict(samples=8, seq_len=64, window_lengths=(16, 32, 64), max_windows=16, progress=False)


# --------------------------------------------------------------------------------------------------
# hand-computed formulas


def test_tcess_signature_by_hand():
    # token 1: pool {0: 2, 2: 1}, p = softmax(2, 1) = (0.7311, 0.2689)
    # token 2: pool {1: 3, 3: 1}, p = softmax(3, 1) = (0.8808, 0.1192)
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0], [0.0, 3.0, -1.0, 1.0]])
    # r = mean max pooled probability = (0.7311 + 0.8808) / 2 = 0.8059: only token 2's expert 1 passes,
    # credited f(3) = max(3, sigmoid(3)) = 3, divided by T = 2 tokens
    assert torch.allclose(tcess_signature(logits, pool=2), torch.tensor([0.0, 1.5, 0.0, 0.0], dtype=torch.float64))
    # fixed r = 0.5: token 1 credits expert 0 with f(2) = 2, token 2 expert 1 with 3
    assert torch.allclose(tcess_signature(logits, pool=2, r=0.5), torch.tensor([1.0, 1.5, 0.0, 0.0], dtype=torch.float64))
    # a negative logit is credited sigmoid(z) > 0, never a negative score
    negative = tcess_signature(torch.tensor([[-2.0, -5.0, -6.0]]), pool=2, r=0.5)
    assert torch.allclose(negative, torch.tensor([1 / (1 + math.exp(2.0)), 0.0, 0.0], dtype=torch.float64))


def test_tcess_signature_uses_the_collectors_probability_grid():
    # token 1 pools experts (0, 1) with p = (0.6, 0.4); token 2 pools (1, 0) with p = (0.8, 0.2);
    # r = (0.6 + 0.8) / 2 = 0.7. On a grid of B = 4 bins, p >= r means bin(p) >= bin(0.7) = 2, i.e.
    # p >= 0.5: token 1's expert 0 is credited f(ln 1.5) = sigmoid(ln 1.5) = 0.6, token 2's expert 1
    # f(ln 4) = ln 4; divided by T = 2. With the default 1024 bins, bin(0.7) = 716 (p >= 0.6992):
    # only token 2's expert 1. The collector's TCESS (tcess_of_logits) is the same sum.
    from moeprune.observe.tcess import tcess_of_logits

    logits = torch.tensor([[math.log(1.5), 0.0, -5.0], [0.0, math.log(4.0), -5.0]], dtype=torch.float64)
    coarse = torch.tensor([0.6 / 2, math.log(4.0) / 2, 0.0], dtype=torch.float64)
    assert torch.allclose(tcess_signature(logits, pool=2, bins=4), coarse, atol=1e-12)
    assert torch.allclose(tcess_signature(logits, pool=2), torch.tensor([0.0, math.log(4.0) / 2, 0.0],
                                                                        dtype=torch.float64), atol=1e-12)
    assert torch.equal(tcess_signature(logits, pool=2, bins=4), tcess_of_logits(logits, pool=2, bins=4) / 2)


def test_mean_logit_signature_by_hand():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0], [0.0, 3.0, -1.0, 1.0]])
    assert torch.allclose(mean_logit_signature(logits), torch.tensor([1.0, 1.5, 0.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="at least one token"):
        mean_logit_signature(torch.empty(0, 4))


def test_calibration_windows_by_hand():
    eos = 99
    # row 0: a document ends at position 2, the next starts at 3; row 1: ends at 0 and 5 (too late for 4 tokens)
    rows = torch.tensor([[1, 2, eos, 3, 4, 5, 6, 7],
                         [eos, 10, 11, 12, 13, eos, 14, 15]])
    # without eos: the non-overlapping windows, evenly spread when there are more than asked
    assert calibration_windows(rows, 4, 8).tolist() == [[1, 2, eos, 3], [4, 5, 6, 7],
                                                         [eos, 10, 11, 12], [13, eos, 14, 15]]
    assert calibration_windows(rows, 4, 2).tolist() == [[1, 2, eos, 3], [13, eos, 14, 15]]
    # with eos: up to half are the document starts that fit in their row (after positions 2 and 0)
    assert calibration_windows(rows, 4, 4, eos_token_id=eos).tolist() == [
        [1, 2, eos, 3], [3, 4, 5, 6], [10, 11, 12, 13], [13, eos, 14, 15]]
    assert calibration_windows(rows, 9, 4).shape == (0, 9)


def test_mix_scores_by_hand():
    a = {0: [4.0, 3.0, 0.0, 1.0]}  # sum 8 -> (0.5, 0.375, 0, 0.125)
    b = {0: [0.0, 10.0, 70.0, 20.0]}  # sum 100 -> (0, 0.1, 0.7, 0.2)
    mixed = mix_scores([a, b])[0]
    assert torch.allclose(mixed, torch.tensor([0.25, 0.2375, 0.35, 0.1625], dtype=torch.float64))
    weighted = mix_scores([a, b], weights=[3, 1])[0]  # 0.75 a + 0.25 b
    assert torch.allclose(weighted, torch.tensor([0.375, 0.30625, 0.175, 0.14375], dtype=torch.float64))
    with pytest.raises(ProfileError, match="weight"):
        mix_scores([a, b], weights=[1.0])


def test_distances_threshold_and_confidence_by_hand():
    q = torch.tensor([[3.0, 4.0]])
    refs = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    assert torch.allclose(signature_distances(q, refs, "l2"), torch.tensor([[5.0, 4.0]], dtype=torch.float64))
    cos = signature_distances(q, refs[1:], "cosine")
    assert torch.allclose(cos, torch.tensor([[1.0 - 3.0 / 5.0]], dtype=torch.float64))
    # quantile 0.5 of (1, 2, 3, 4) is 2.5 (linear interpolation), times margin 2
    assert fallback_threshold(torch.tensor([4.0, 1.0, 3.0, 2.0]), quantile=0.5, margin=2.0) == pytest.approx(5.0)
    assert match_confidence(1.0, 4.0, 2.0) == pytest.approx(0.5)  # 1 - 1 / min(4, 2)
    assert match_confidence(1.0, 1.25, 10.0) == pytest.approx(0.2)  # 1 - 1 / 1.25
    assert match_confidence(4.0, 5.0, 2.0) == pytest.approx(0.5)  # fallback: 1 - 2 / 4
    assert match_confidence(3.0, 3.0, 10.0) == 0.0  # a tie
    windows = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 8.0]])
    # distances from (3, 4): 5, 4, 5 -> the 2 nearest average 4.5
    assert knn_distances(q, windows, k=2).tolist() == pytest.approx([4.5])
    # leave-one-out among the windows: (0,0): 3, 8 -> 5.5; (3,0): 3, sqrt(73); (0,8): 8, sqrt(73)
    spread = knn_distances(windows, windows, k=2, leave_one_out=True)
    assert spread.tolist() == pytest.approx([5.5, (3 + math.sqrt(73)) / 2, (8 + math.sqrt(73)) / 2])


def _geometry(num=4, top_k=2) -> dict:
    return dict(family="mixtral", model_type="mixtral", num_hidden_layers=1, moe_layers=[0], num_experts=num,
                top_k=top_k, n_group=1, topk_group=1, min_experts_per_group=1, has_shared_experts=False,
                routing="softmax_topk")


def _hand_profile(task, scores, kept, signature=None, windows=None) -> Profile:
    metadata = {"format_version": PROFILE_FORMAT_VERSION, "model_fingerprint": "w" * 16,
                "architecture_fingerprint": "a" * 16, "family": "mixtral", "num_experts": 4, "top_k": 2,
                "geometry": _geometry(), "tcess_pool": 4, "tcess_r": None, "samples": 1, "data_hash": task}
    return Profile(task=task, method="tcess", budget={"keep": len(kept)}, scores={0: scores}, kept={0: kept},
                   signature={0: signature or scores}, metadata=metadata, windows=windows or {})


def test_mix_union_intersection_by_hand():
    a = _hand_profile("a", [4.0, 3.0, 0.0, 1.0], [0, 1], windows={16: torch.zeros(2, 1, 4, dtype=torch.float64)})
    b = _hand_profile("b", [0.0, 10.0, 70.0, 20.0], [2, 3], windows={16: torch.ones(3, 1, 4, dtype=torch.float64)})
    mixed = mix_profiles([a, b], name="ab")
    # normalised average (0.25, 0.2375, 0.35, 0.1625): keep 2 -> experts 0 and 2; the raw average
    # (2, 6.5, 35, 10.5) would have kept 2 and 3
    assert mixed.kept == {0: [0, 2]}
    assert mixed.budget == {"keep": 2} and mixed.metadata["sources"] == ["a", "b"]
    assert mixed.signature[0] == pytest.approx([2.0, 6.5, 35.0, 10.5])  # mean of the signatures
    assert mixed.windows[16].shape == (5, 1, 4)  # both profiles' windows
    assert mix_profiles([a, b], name="ab3", keep=3).kept == {0: [0, 1, 2]}
    assert union_profiles([a, b], name="u").kept == {0: [0, 1, 2, 3]}
    c = _hand_profile("c", [0.0, 5.0, 4.0, 1.0], [1, 2])
    with pytest.raises(ProfileError, match="top_k=2"):
        intersect_profiles([a, c], name="i")
    d = _hand_profile("d", [1.0, 5.0, 4.0, 0.0], [0, 1, 2])
    e = _hand_profile("e", [0.0, 5.0, 4.0, 1.0], [1, 2, 3])
    assert intersect_profiles([d, e], name="i").kept == {0: [1, 2]}
    other = _hand_profile("o", [1.0, 1.0, 1.0, 1.0], [0, 1])
    other.metadata["architecture_fingerprint"] = "b" * 16
    with pytest.raises(ProfileError, match="different models"):
        mix_profiles([a, other])


# --------------------------------------------------------------------------------------------------
# store and format


def _refused_when_edited(store: ProfileStore, profile: Profile, edit, match: str) -> None:
    """Edit the stored JSON of ``profile`` with ``edit(data)``: loading it is a ProfileError matching
    ``match``; the profile is saved again afterwards."""
    path = store.path(profile.task)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=match):
        store.load(profile.task)
    store.save(profile, overwrite=True)


def test_store_round_trip_and_validation(tmp_path):
    store = ProfileStore(tmp_path / "store")
    windows = {16: torch.rand(3, 1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))}
    profile = _hand_profile("code", [0.1, 0.2, 0.3, 1.0 / 3.0], [2, 3], windows=windows)
    path = store.save(profile)
    assert store.names() == ["code"]
    loaded = store.load("code")
    assert loaded.kept == profile.kept and loaded.scores == profile.scores and loaded.signature == profile.signature
    # window signatures are stored in float16
    assert torch.equal(loaded.windows[16], windows[16].half().double())
    assert loaded.metadata["format_version"] == PROFILE_FORMAT_VERSION
    assert '"0": [0.1, 0.2, 0.3, 0.3333333333333333]' in path.read_text()  # human-readable vectors
    with pytest.raises(OutputExistsError, match="--overwrite"):
        store.save(profile)
    store.save(profile, overwrite=True)
    # both files are written atomically (no temporary file left) and the JSON records the window file's sha256
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["code.json", "code.safetensors"]
    recorded = json.loads(path.read_text())["windows"]["sha256"]
    assert recorded == hashlib.sha256((tmp_path / "store" / "code.safetensors").read_bytes()).hexdigest()

    def broken(edit, match):
        _refused_when_edited(store, profile, edit, match)

    broken(lambda d: d.update(format_version=99), "format version 99")
    broken(lambda d: d.pop("kept"), "lacks")
    broken(lambda d: d["kept"].update({"0": [3, 2]}), "sorted distinct")
    broken(lambda d: d["kept"].update({"0": [3]}), "top_k")
    broken(lambda d: d["scores"].update({"0": [1.0]}), "4 finite numbers")
    broken(lambda d: d["metadata"].pop("architecture_fingerprint"), "metadata lacks")
    broken(lambda d: d.update(format="something"), "not a moeprune profile")
    path.write_text(path.read_text()[:50])
    with pytest.raises(ProfileError, match="corrupt"):
        store.load("code")
    store.save(profile, overwrite=True)
    (tmp_path / "store" / "code.safetensors").write_bytes(b"garbage")
    with pytest.raises(ProfileError, match="checksum"):
        store.load("code")
    with pytest.raises(ProfileError, match="no profile 'math'"):
        store.load("math")
    with pytest.raises(ProfileError, match="does not exist"):
        ProfileStore(tmp_path / "nowhere").names()
    with pytest.raises(ProfileError, match="not allowed"):
        store.load("../etc")


# --------------------------------------------------------------------------------------------------
# building and model identity


@pytest.fixture(scope="module")
def domain_files(tmp_path_factory):
    """Two constructed domains (word prose, arithmetic) as jsonl: train and held-out queries."""
    folder = tmp_path_factory.mktemp("domains")

    def lines(kind, seed):
        return [t for i, t in enumerate(_tiny_corpus(600, seed)) if i % 3 == kind]

    files = {}
    for name, kind in (("prose", 0), ("math", 2)):
        files[name] = folder / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"text": t}) + "\n" for t in lines(kind, 1)))
        files[f"{name}-test"] = [" ".join(lines(kind, 2)[i:i + 4]) for i in range(0, 40, 4)]
    return files


@pytest.fixture(scope="module")
def routed_checkpoint(tmp_path_factory) -> Path:
    """A tiny random Mixtral whose first router sends arithmetic tokens (digits, operators) to
    experts 0-3 and every other token to experts 4-7 (a constructed case for retrieval)."""
    from moeprune.tiny import build_tiny_model
    from moeprune.tokenizer import tiny_tokenizer

    model, tokenizer = build_tiny_model("mixtral"), tiny_tokenizer()
    arithmetic = torch.tensor([all(c in "0123456789+-*=" for c in tokenizer.decode([i]).strip() or "x")
                               for i in range(model.config.vocab_size)])
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = torch.where(arithmetic, 4.0, -4.0)
        router = model.model.layers[0].mlp.gate.weight
        router[:, 0] = torch.tensor([2.0] * 4 + [-2.0] * 4)
    folder = tmp_path_factory.mktemp("routed")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_store(routed_checkpoint, domain_files, tmp_path_factory):
    """prose, math and general (their mix) profiles of the constructed Mixtral."""
    ckpt = routed_checkpoint
    store = ProfileStore(tmp_path_factory.mktemp("store"))
    built = {name: build_profile(ckpt, name, domain_files[name], ratio=0.5, **DOMAIN) for name in ("prose", "math")}
    for profile in built.values():
        store.save(profile)
    store.save(mix_profiles(list(built.values()), name=GENERAL))
    return store


@pytest.mark.parametrize("family,method,budget", [("mixtral", "tcess", {"ratio": 0.5}),
                                                  ("deepseek_v3", "reap", {"keep": 8})])
def test_build_equals_plan_pruning(family, method, budget, tiny_checkpoint, calib_file, family_stats):
    ckpt = tiny_checkpoint(family)
    profile = build_profile(ckpt, "calib", calib_file, method=method, **budget, **SMALL)
    # statistics of an independent whole-model pass on the same tokens
    stats = family_stats(family)
    plan = api.plan_pruning(ckpt, method=method, stats=stats, **budget)
    assert profile.kept == plan.layers
    assert profile.protected == plan.protected
    assert profile.metadata["data_hash"] == stats.metadata["data_hash"]
    # the signature is the collector's TCESS mean ...
    for layer, vector in profile.signature.items():
        expected = stats.layers[layer]["tcess"] / stats.layers[layer]["tokens"]
        assert torch.allclose(torch.tensor(vector, dtype=torch.float64), expected, atol=1e-9)
    # ... and the extractor (first layers only) computes the same vector from router logits
    extractor = SignatureExtractor(ckpt, profile.signature_layers, tcess_pool=profile.metadata["tcess_pool"])
    calibration = api.calibration_data(ckpt, calib_file, samples=SAMPLES, seq_len=SEQ_LEN)
    logits = extractor.router_logits(calibration.input_ids, calibration.attention_mask)
    for layer in profile.signature_layers:
        mine = tcess_signature(logits[layer].reshape(-1, logits[layer].shape[-1]), extractor.tcess_pool)
        assert torch.allclose(mine, torch.tensor(profile.signature[layer], dtype=torch.float64), atol=1e-9)
    # window signatures (both kinds) are those of windows cut from the window rows: 256 rows of the same
    # data and seed when the file holds them (a superset of the calibration rows), else the calibration rows
    rows = profile.metadata["window_rows"]
    source = calibration if rows == SAMPLES else api.calibration_data(ckpt, calib_file, samples=rows, seq_len=SEQ_LEN)
    ids = calibration_windows(source.input_ids, 16, SMALL["max_windows"], eos_token_id=extractor.tokenizer.eos_token_id)
    both = extractor.signatures_of_ids(ids, kinds=("tcess", "logits"))
    assert torch.allclose(profile.windows[16], both["tcess"]) and torch.allclose(profile.logit_windows[16], both["logits"])
    with pytest.raises(ProfileError, match="--window-samples"):
        build_profile(ckpt, "calib", calib_file, method=method, window_samples=0, **budget, **SMALL)
    # rebudgeting re-selects from the scores as plan_pruning does
    if family == "mixtral":
        assert rebudget_profile(profile, keep=3).kept == api.plan_pruning(ckpt, method=method, stats=stats, keep=3).layers


def test_model_identity(tiny_store, routed_checkpoint, tiny_checkpoint, caplog):
    profile = tiny_store.load("prose")
    check_profile_model(profile, routed_checkpoint)
    with caplog.at_level(logging.WARNING, logger="moeprune.profiles"):
        check_profile_model(profile, tiny_checkpoint("mixtral", seed=1))  # same architecture, other weights
    assert "other weights" in caplog.text
    with pytest.raises(ProfileError, match="another model"):
        check_profile_model(profile, tiny_checkpoint("mixtral", intermediate_size=24))
    with pytest.raises(ProfileError, match="qwen3_moe"):
        check_profile_model(profile, tiny_checkpoint("qwen3_moe"))
    with pytest.raises(ProfileError, match="another model"):  # validated before the loader is imported
        load_profile(tiny_checkpoint("mixtral", intermediate_size=24), profile)
    with pytest.raises(ProfileError, match="another model"):
        ProfileMatcher(tiny_checkpoint("mixtral", intermediate_size=24), tiny_store)


# --------------------------------------------------------------------------------------------------
# retrieval


def test_matcher_retrieves_the_source_domain(tiny_store, routed_checkpoint, domain_files):
    ckpt = routed_checkpoint
    matcher = ProfileMatcher(ckpt, tiny_store, layers=1)
    # only the embeddings and decoder layer 0 are loaded
    layers = matcher.extractor.model.model.layers
    assert all(p.device.type != "meta" for p in layers[0].parameters())
    assert all(p.device.type == "meta" for p in layers[1].parameters())
    assert matcher.names == ["math", "prose"]
    assert matcher.reference == "classifier"
    others = [ProfileMatcher(ckpt, tiny_store, layers=1, reference=reference, extractor=matcher.extractor)
              for reference in ("windows", "centroid")]
    for domain in ("prose", "math"):
        prompts = domain_files[f"{domain}-test"]
        for chosen in [matcher, *others]:
            for match in chosen.match_many(prompts):
                assert (match.profile, match.fallback) == (domain, False)
                assert 0.0 < match.confidence <= 1.0
    # batched signatures equal one-at-a-time signatures
    prompts = domain_files["math-test"][:3] + domain_files["prose-test"][:2]
    batched, tokens = matcher.signatures(prompts)
    for prompt, row, count in zip(prompts, batched, tokens):
        assert torch.allclose(matcher.signature(prompt), row, atol=1e-6)
        ids = torch.tensor([matcher.extractor.encode([prompt])[0]])
        assert torch.allclose(matcher.signatures_of_ids(ids)[0], row, atol=1e-6)
    cosine = ProfileMatcher(ckpt, tiny_store, layers=2, metric="cosine", extractor=SignatureExtractor(
        ckpt, [0, 1], tcess_pool=4))
    assert cosine.match(domain_files["math-test"][0]).profile == "math"


def test_classifier_rule_on_hand_made_windows(tiny_store, routed_checkpoint):
    """Two profiles whose mean-logit windows differ in one feature only: the classifier sends a
    signature to the side of that feature, its probabilities sum to 1 and the confidence is the
    probability margin."""
    a, b = copy.deepcopy(tiny_store.load("math")), copy.deepcopy(tiny_store.load("prose"))
    a.task, b.task = "a", "b"
    layers, experts = len(a.signature), a.geometry.num_experts
    noise = torch.Generator().manual_seed(0)
    for profile, centre in ((a, -3.0), (b, 3.0)):
        windows = torch.randn(40, layers, experts, generator=noise, dtype=torch.float64)
        windows[:, 0, 0] += centre
        profile.logit_windows = {16: windows}
    matcher = ProfileMatcher(routed_checkpoint, [a, b], fallback=None)
    assert matcher._classifiers == {}  # trained on first use, or all at once by fit()
    assert matcher.fit() is matcher and set(matcher._classifiers) == {16}
    queries = torch.zeros(2, layers, experts, dtype=torch.float64)
    queries[0, 0, 0], queries[1, 0, 0] = -4.0, 4.0
    probabilities = matcher.probabilities(queries, [16, 20])
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(2, dtype=torch.float64))
    matches = matcher.match_signatures(queries, [16, 20])
    assert [m.profile for m in matches] == ["a", "b"]
    for match, p in zip(matches, probabilities):
        assert match.confidence == pytest.approx(float(p.max() - p.min()))
        assert match.distances["a"] != match.distances["b"]  # k-nearest-window distances (the fallback measure)
    # the classifier needs a window length every candidate has
    b.logit_windows = {32: b.logit_windows[16]}
    with pytest.raises(ProfileError, match="share no calibration window length"):
        ProfileMatcher(routed_checkpoint, [a, b], fallback=None)
    # a profile without mean-logit windows cannot take part in the classifier rule
    b.logit_windows = {}
    with pytest.raises(ProfileError, match="--reference classifier"):
        ProfileMatcher(routed_checkpoint, [a, b], fallback=None)


def test_matcher_falls_back_far_from_every_profile(tiny_store, routed_checkpoint, domain_files):
    ckpt = routed_checkpoint
    math_profile = tiny_store.load("math")
    # move the math profile (signature and its calibration windows alike) far from any prompt
    far = copy.deepcopy(math_profile)
    far.task = "far"
    far.signature = {layer: [x + 5.0 for x in v] for layer, v in far.signature.items()}
    far.windows = {length: w + 5.0 for length, w in far.windows.items()}
    far.logit_windows = {length: w + 5.0 for length, w in far.logit_windows.items()}
    general = tiny_store.load(GENERAL)
    for reference in ("classifier", "windows"):
        matcher = ProfileMatcher(ckpt, [far, general], reference=reference)
        match = matcher.match(domain_files["math-test"][0])
        assert match.fallback and match.profile == GENERAL and match.nearest == "far"
        assert match.distance > match.threshold
        assert match.confidence == pytest.approx(1.0 - match.threshold / match.distance)
    assert not ProfileMatcher(ckpt, [far, general], fallback=None).match(domain_files["math-test"][0]).fallback
    # the same prompt against the real math profile stays within its threshold
    near = ProfileMatcher(ckpt, [math_profile, general]).match(domain_files["math-test"][0])
    assert near.profile == "math" and not near.fallback and near.distance <= near.threshold
    with pytest.raises(ProfileError, match="no fallback profile"):
        ProfileMatcher(ckpt, [math_profile])
    with pytest.raises(ProfileError, match="--layers"):
        ProfileMatcher(ckpt, tiny_store, layers=7)
    centroid = ProfileMatcher(ckpt, [far, general], reference="centroid").match(domain_files["math-test"][0])
    assert centroid.fallback and centroid.profile == GENERAL
    with pytest.raises(ProfileError, match="empty"):
        matcher.match("   ")


# --------------------------------------------------------------------------------------------------
# export


def test_export_is_vanilla_and_equals_in_memory_apply(tiny_store, routed_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    from moeprune.apply import apply_plan_in_memory
    from moeprune.calibration.engine import load_full_model

    ckpt = routed_checkpoint
    profile = tiny_store.load("math")
    out = export_profile(ckpt, profile, tmp_path / "math-model", progress=False)
    plan = Plan.load(out / PLAN_FILENAME)
    assert plan.layers == profile.kept and plan.calibration["profile"] == "math"
    vanilla = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    assert vanilla.config.num_local_experts == 4
    reference = apply_plan_in_memory(copy.deepcopy(load_full_model(ckpt)), profile.to_plan())
    ids = torch.randint(0, vanilla.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    partial = load_profile(ckpt, profile)  # moeprune's partial loader: only the kept experts read
    with torch.no_grad():
        logits = vanilla(input_ids=ids).logits
        assert torch.equal(logits, reference(input_ids=ids).logits)
        assert torch.allclose(partial(input_ids=ids).logits, logits, atol=1e-6)
    with pytest.raises(OutputExistsError):
        export_profile(ckpt, profile, out, progress=False)
    other = tiny_store.load("prose")
    other.kept[0] = list(profile.kept[0])  # same experts in layer 0 only: the union is non-uniform
    other.protected = dict(profile.protected)
    union = union_profiles([profile, other], name="both")
    assert union.kept == {layer: sorted(set(profile.kept[layer]) | set(other.kept[layer])) for layer in profile.kept}
    assert len(set(union.kept_counts().values())) > 1
    with pytest.raises(ProfileError, match="partial loader"):
        export_profile(ckpt, union, tmp_path / "union", progress=False)
    assert not (tmp_path / "union").exists()
    partial_union = load_profile(ckpt, union)
    assert [partial_union.model.layers[i].mlp.experts.gate_up_proj.shape[0] for i in sorted(union.kept)] == \
        [len(union.kept[i]) for i in sorted(union.kept)]
    with pytest.raises(PlanError, match="top_k"):
        rebudget_profile(profile, keep=1)


# --------------------------------------------------------------------------------------------------
# command line


def test_cli_build_match_export_list_combine(routed_checkpoint, domain_files, tmp_path, capsys):
    ckpt = str(routed_checkpoint)
    store = str(tmp_path / "store")
    data = ["--samples", str(SAMPLES), "--seq-len", str(SEQ_LEN)]
    for task in ("prose", "math"):
        assert main(["-q", "profile", "build", ckpt, "--task", task, "--data", str(domain_files[task]), "--store",
                     store, "--keep", "4", *data]) == 0
    assert "exists" in _error(capsys, ["-q", "profile", "build", ckpt, "--task", "math", "--data",
                                       str(domain_files["math"]), "--store", store, *data])
    assert main(["-q", "profile", "combine", "--store", store, "prose", "math", "--name", GENERAL]) == 0
    capsys.readouterr()
    assert main(["-q", "profile", "match", ckpt, "--store", store, "--prompt", domain_files["math-test"][0],
                 "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["profile"] == "math" and 0.0 <= answer["confidence"] <= 1.0
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": t}) + "\n" for t in domain_files["prose-test"][:3]))
    assert main(["-q", "profile", "match", ckpt, "--store", store, "--prompts", str(prompts), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [json.loads(line)["profile"] for line in lines] == ["prose"] * 3
    assert main(["-q", "profile", "export", ckpt, "--store", store, "--task", "math", "--out",
                 str(tmp_path / "out")]) == 0
    assert Plan.load(tmp_path / "out" / PLAN_FILENAME).layers == ProfileStore(store).load("math").kept
    capsys.readouterr()
    assert main(["-q", "profile", "list", "--store", store, "--json"]) == 0
    assert [row["name"] for row in json.loads(capsys.readouterr().out)] == [GENERAL, "math", "prose"]
    assert "top_k" in _error(capsys, ["-q", "profile", "export", ckpt, "--store", store, "--task", "math", "--out",
                                      str(tmp_path / "out2"), "--keep", "1"])
    assert "no profile 'code'" in _error(capsys, ["-q", "profile", "export", ckpt, "--store", store, "--task", "code",
                                                  "--out", str(tmp_path / "out3")])
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()


def _error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    return capsys.readouterr().err


def test_shipped_profiles_load_and_validate():
    store = ProfileStore.default()
    profiles = store.load_all()  # every file parses and validates (checksums included)
    assert {"code", "prose", "legal", "math", GENERAL} <= set(profiles)
    assert profiles[GENERAL].metadata["sources"] == ["code", "prose", "legal", "math"]
    assert len({p.metadata["architecture_fingerprint"] for p in profiles.values()}) == 1
    assert all(p.windows for p in profiles.values())


def test_build_from_a_few_demonstrations_uses_every_block(routed_checkpoint, domain_files, tmp_path, capsys, caplog):
    """EASY-EP: a profile from a few demonstrations. Without --samples, data holding fewer packed
    blocks than the default uses every block (and says so); an explicit larger --samples is an error."""
    from moeprune.errors import DataError
    from moeprune.calibration.data import DEFAULT_SAMPLES

    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"text": t}) + "\n" for t in domain_files["math-test"][:3]))
    blocks = 1  # the data's packed block count, found with the data loader itself
    while True:
        try:
            api.calibration_data(routed_checkpoint, few, samples=blocks + 1, seq_len=SEQ_LEN)
        except DataError:
            break
        blocks += 1
    assert 1 < blocks < DEFAULT_SAMPLES
    every_block = api.calibration_data(routed_checkpoint, few, samples=blocks, seq_len=SEQ_LEN)
    with caplog.at_level(logging.INFO, logger="moeprune.profiles"):
        profile = build_profile(routed_checkpoint, "demo", few, keep=4, seq_len=SEQ_LEN, window_lengths=(16,),
                                max_windows=8, progress=False)
    assert profile.metadata["samples"] == blocks and profile.metadata["data_hash"] == every_block.data_hash
    assert any(f"holds {blocks} packed blocks" in r.getMessage() and "every block" in r.getMessage()
               for r in caplog.records)
    # the same through the CLI, where --samples defaults to None; an explicit count beyond the data fails
    store = str(tmp_path / "store")
    argv = ["-q", "profile", "build", str(routed_checkpoint), "--task", "demo", "--data", str(few), "--store", store,
            "--keep", "4", "--seq-len", str(SEQ_LEN)]
    assert main(argv) == 0
    assert ProfileStore(store).load("demo").metadata["samples"] == blocks
    message = _error(capsys, [*argv, "--overwrite", "--samples", str(DEFAULT_SAMPLES)])
    assert f"{blocks} blocks of {SEQ_LEN}" in message and "lower --samples" in message
    assert ProfileStore(store).load("demo").metadata["samples"] == blocks


def test_build_collects_with_the_given_device_and_dtype(routed_checkpoint, domain_files):
    """--device/--dtype reach the statistics pass of `profile build`: the profile's scores are those of
    statistics collected in bfloat16, which differ from the float32 ones."""
    kwargs = dict(samples=4, seq_len=SEQ_LEN)
    bf16 = api.collect(routed_checkpoint, domain_files["prose"], dtype="bfloat16", device="cpu", progress=False, **kwargs)
    fp32 = api.collect(routed_checkpoint, domain_files["prose"], progress=False, **kwargs)
    profile = build_profile(routed_checkpoint, "prose", domain_files["prose"], method="reap", ratio=0.5,
                            device="cpu", dtype="bfloat16", window_lengths=(16,), max_windows=4, progress=False, **kwargs)
    expected = score_all("reap", bf16)
    assert profile.scores == {layer: s.tolist() for layer, s in expected.items()}
    assert profile.scores != {layer: s.tolist() for layer, s in score_all("reap", fp32).items()}


# --------------------------------------------------------------------------------------------------
# profiles that fold their dropped experts into the kept ones (--action merge|dern, issue 12)


def test_merge_clusters_by_hand():
    from moeprune.profiles.fold import merge_clusters

    # similarity of experts 0..4 (symmetric; the diagonal unused); kept 0 and 3
    s = torch.tensor([[9, 1, 5, 2, 4],
                      [1, 9, 0, 3, 3],
                      [5, 0, 9, 7, 1],
                      [2, 3, 7, 9, 6],
                      [4, 3, 1, 6, 9]], dtype=torch.float64)
    # 1 -> 3 (3 > 1), 2 -> 3 (7 > 5), 4 -> 3 (6 > 4); clusters kept expert first, then the joiners
    assert merge_clusters(s, [0, 3], [[0, 1, 2, 3, 4]]) == [[0], [3, 1, 2, 4]]
    # kept 3 and 4: 0 -> 4 (4 > 2), 1 ties (3 and 3) -> the lower kept expert 3, 2 -> 3 (7 > 1)
    assert merge_clusters(s, [3, 4], [[0, 1, 2, 3, 4]]) == [[3, 1, 2], [4, 0]]
    ties = torch.ones(4, 4, dtype=torch.float64)
    assert merge_clusters(ties, [1, 2], [[0, 1, 2, 3]]) == [[1, 0, 3], [2]]
    # a protected kept expert absorbs nobody
    assert merge_clusters(s, [0, 3], [[0, 1, 2, 3, 4]], protected=[3]) == [[0, 1, 2, 4], [3]]
    # routing groups: each dropped expert stays in its group ({0, 1, 2} and {3, 4})
    assert merge_clusters(s, [0, 3], [[0, 1, 2], [3, 4]]) == [[0, 1, 2], [3, 4]]
    with pytest.raises(PlanError, match="super expert"):
        merge_clusters(s, [0, 3], [[0, 1, 2, 3, 4]], protected=[0, 3])


def _fold_profile(family, action, options, tiny_checkpoint, calib_file, **kw) -> Profile:
    return build_profile(tiny_checkpoint(family), "calib", calib_file, ratio=0.5, action=action,
                         action_options=options, **SMALL, **kw)


def _load_export(out: Path, exact: bool):
    from transformers import AutoModelForCausalLM

    import moeprune

    if exact:
        return moeprune.load(out)
    return AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()


@pytest.mark.parametrize("family,action,options", [
    ("mixtral", "merge", {}),
    ("mixtral", "merge", {"similarity": "router", "router": "exact"}),
    ("mixtral", "dern", {"tau": 0.0, "kmeans_init": "own"}),
    ("deepseek_v3", "merge", {"router_rows": "mean"}),
    ("gpt_oss", "dern", {"tau": 0.0}),
    ("gpt_oss", "merge", {"align": "off"}),
])
def test_fold_profile_export_equals_partial_load(family, action, options, tiny_checkpoint, calib_file, family_stats,
                                                tmp_path):
    """A merge/dern profile keeps the drop profile's experts; its export (vanilla, or moeprune.load for
    the exact router) equals the partial load tensor for tensor and the in-memory application."""
    from moeprune.apply import apply_plan_in_memory
    from moeprune.calibration.engine import load_full_model

    ckpt = tiny_checkpoint(family)
    profile = _fold_profile(family, action, options, tiny_checkpoint, calib_file)
    assert profile.kept == api.plan_pruning(ckpt, method="tcess", stats=family_stats(family), ratio=0.5).layers
    assert profile.folds and profile.actions and profile.format_version == 2
    for layer, actions in profile.actions.items():
        if action == "merge":
            clusters = actions[0].clusters
            assert [c.members[0] for c in clusters] == profile.kept[layer]  # the kept experts are the dominants
            assert sorted(m for c in clusters for m in c.members) == list(range(profile.geometry.experts_in(layer)))
        else:
            assert set(actions[0].experts) <= set(profile.kept[layer])
    store = ProfileStore(tmp_path / "store")
    path = store.save(profile)
    assert json.loads(path.read_text())["format_version"] == 2
    loaded = store.load("calib")
    assert loaded.to_json() == profile.to_json()
    exact = options.get("router") == "exact"
    out = export_profile(ckpt, loaded, tmp_path / "out", progress=False)
    exported = _load_export(out, exact)
    partial = load_profile(ckpt, loaded)
    want, got = exported.state_dict(), partial.state_dict()
    assert set(want) == set(got)
    for name in want:
        assert torch.equal(want[name], got[name]), name
    reference = apply_plan_in_memory(copy.deepcopy(load_full_model(ckpt)), loaded.to_plan())
    ids = torch.randint(0, exported.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = exported(input_ids=ids).logits
        assert torch.equal(partial(input_ids=ids).logits, logits)
        assert torch.allclose(reference(input_ids=ids).logits, logits, atol=1e-6)
    if exact:  # a vanilla from_pretrained must not load the exact router's E rows silently
        from transformers import AutoModelForCausalLM

        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)


def test_merge_profile_joins_each_dropped_expert_to_its_most_similar_kept(tiny_checkpoint, calib_file, family_stats):
    """Built from given statistics, a router-similarity merge profile puts each dropped expert with
    the kept expert of highest M-SMoE similarity (frequency merge weights, the kept expert first)."""
    from moeprune.profiles.fold import merge_similarity

    stats = family_stats("mixtral")
    profile = _fold_profile("mixtral", "merge", {"similarity": "router"}, tiny_checkpoint, calib_file, stats=stats)
    for layer, kept in profile.kept.items():
        sim = merge_similarity(stats, layer, "router")
        open_ = [k for k in kept if k not in profile.protected.get(layer, [])]  # super experts absorb nobody
        for cluster in profile.actions[layer][0].clusters:
            for member in cluster.members[1:]:
                best = max(open_, key=lambda k: (float(sim[member, k]), -k))
                assert cluster.members[0] == best
            if cluster.members[0] in profile.protected.get(layer, []):
                assert len(cluster.members) == 1
            frequency = stats.layers[layer]["frequency"]
            expected = [float(frequency[m]) for m in cluster.members]
            assert list(cluster.weights) == (expected if sum(expected) > 0 else [1.0] * len(expected))
    # merging by output needs the opt-in mean expert outputs, which these statistics lack: refused
    with pytest.raises(ProfileError, match="expert_mean_output"):
        _fold_profile("mixtral", "merge", {}, tiny_checkpoint, calib_file, stats=stats)


def test_dern_profile_without_migration_is_the_drop_profile(tiny_checkpoint, calib_file, tmp_path):
    """tau = 1: no segment can exceed cosine 1, so nothing migrates and the export is the drop export."""
    ckpt = tiny_checkpoint("mixtral")
    dern = _fold_profile("mixtral", "dern", {"tau": 1.0}, tiny_checkpoint, calib_file)
    drop = _fold_profile("mixtral", "drop", None, tiny_checkpoint, calib_file)
    assert dern.actions == {} and dern.kept == drop.kept and drop.format_version == 1
    assert "action" not in drop.to_json() and "actions" not in drop.to_json()
    a = export_profile(ckpt, dern, tmp_path / "dern", progress=False)
    b = export_profile(ckpt, drop, tmp_path / "drop", progress=False)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_fold_profiles_refuse_what_they_cannot_do(tiny_checkpoint, calib_file, tmp_path):
    from moeprune.profiles import check_action

    info = api.model_info(tiny_checkpoint("mixtral"))
    assert check_action("merge", {}, info) == {"similarity": "output", "router": "vanilla", "router_rows": "dominant",
                                                "align": "on"}
    assert check_action("dern", {"tau": 0.3}, info)["tau"] == 0.3
    for action, options, match in (("merge", {"tau": 0.5}, "does not take --tau"),
                                   ("drop", {"router": "exact"}, "does not take --router"),
                                   ("merge", {"similarity": "weights"}, "--merge-similarity must be one of"),
                                   ("dern", {"tau": 2.0}, "tau"),
                                   ("fold", {}, "unknown --action")):
        with pytest.raises(ProfileError, match=match):
            check_action(action, options, info)
    with pytest.raises(ProfileError, match="--collapse-groups"):
        check_action("merge", {}, api.model_info(tiny_checkpoint("deepseek_v3")), collapse_groups=True)
    merge = _fold_profile("mixtral", "merge", {"similarity": "router"}, tiny_checkpoint, calib_file)
    drop = _fold_profile("mixtral", "drop", None, tiny_checkpoint, calib_file)
    other = copy.deepcopy(drop)
    other.task = "other"
    for combine in (lambda: mix_profiles([merge, other], name="m"), lambda: union_profiles([other, merge], name="u"),
                    lambda: intersect_profiles([merge, other], name="i"), lambda: rebudget_profile(merge, keep=3)):
        with pytest.raises(ProfileError, match="drop profiles only"):
            combine()
    # the stored form: version and action must agree, and the merges must match the kept sets
    store = ProfileStore(tmp_path / "store")
    store.save(merge)

    def broken(edit, match):
        _refused_when_edited(store, merge, edit, match)

    broken(lambda d: d.update(format_version=1), "does not match its action")
    broken(lambda d: d.pop("actions"), "lacks")
    broken(lambda d: d["actions"]["1"][0]["clusters"].reverse(), "merges into experts|clusters")
    broken(lambda d: d["action"].update(op="drop"), "does not match its action")
    broken(lambda d: d["actions"].update({"1": [{"op": "merge_experts", "clusters": "x"}]}), "clusters")


def test_cli_build_merge_profile_and_serve_it(routed_checkpoint, domain_files, tmp_path, capsys):
    from moeprune.serve import ProfileModelCache

    ckpt = str(routed_checkpoint)
    store = str(tmp_path / "store")
    argv = ["-q", "profile", "build", ckpt, "--task", "math", "--data", str(domain_files["math"]), "--store", store,
            "--keep", "4", "--samples", str(SAMPLES), "--seq-len", str(SEQ_LEN)]
    assert "does not take --tau" in _error(capsys, [*argv, "--action", "merge", "--tau", "0.5"])
    assert "does not take --merge-similarity" in _error(capsys, [*argv, "--merge-similarity", "router"])
    assert not (tmp_path / "store" / "math.json").exists()
    assert main([*argv, "--action", "merge", "--merge-similarity", "router", "--align", "off"]) == 0
    profile = ProfileStore(store).load("math")
    assert profile.action == "merge" and profile.action_options["align"] == "off"
    assert "drop profiles only" in _error(capsys, ["-q", "profile", "export", ckpt, "--store", store, "--task", "math",
                                                  "--out", str(tmp_path / "o"), "--keep", "5"])
    assert main(["-q", "profile", "export", ckpt, "--store", store, "--task", "math", "--out",
                 str(tmp_path / "out")]) == 0
    exported = _load_export(tmp_path / "out", exact=False)
    # the server's cache loads the merge profile with the same tensors as its export
    cache = ProfileModelCache(ckpt, store)
    served = cache.get("math").state_dict()
    for name, tensor in exported.state_dict().items():
        assert torch.equal(served[name], tensor), name


def test_exact_router_merge_profile_counts_every_router_row(tiny_checkpoint, calib_file, tmp_path):
    """The server's memory budget of an exact-router merge profile counts the E router rows it holds."""
    from moeprune.loader import expert_nbytes
    from moeprune.serve import ProfileModelCache

    ckpt = tiny_checkpoint("mixtral")
    store = ProfileStore(tmp_path / "store")
    store.save(_fold_profile("mixtral", "merge", {"similarity": "router", "router": "exact"}, tiny_checkpoint,
                             calib_file))
    cache = ProfileModelCache(ckpt, store)
    model = cache.get("calib")
    held = sum(t.numel() * t.element_size() for name, t in model.state_dict().items()
               if ".mlp." in name and "shared" not in name)
    profile = store.load("calib")
    assert cache.expert_bytes["calib"] == held == expert_nbytes(ckpt, profile.kept, full_router=True)
    assert held > expert_nbytes(ckpt, profile.kept)


@pytest.mark.parametrize("family", ["inkling2_text", "inkling2_loop_text"])
def test_signature_router_logits_with_block_states_equal_the_whole_model(family, tiny_checkpoint):
    """Inkling-2's layers take block_states ([engine] accumulate): the extractor grows them layer by layer,
    so its router logits are the whole model's, bitwise; Inkling-2-Loop refuses signature layers that reach
    its looped layers (run several times per forward)."""
    from conftest import vanilla
    from moeprune.arch import decoder_layers, family_for_model_type

    source = tiny_checkpoint(family)
    model = vanilla(source)
    fam = family_for_model_type(model.config.model_type)
    ids = torch.randint(2, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    whole = {}
    blocks = decoder_layers(model)
    def record(layer):
        def hook(module, args, output):
            whole[layer] = output[0]
        return hook

    handles = [fam.router(blocks[i]).register_forward_hook(record(i)) for i in (0, 1)]
    with torch.no_grad():
        model.model(input_ids=ids, attention_mask=mask, use_cache=False)
    for handle in handles:
        handle.remove()
    logits = SignatureExtractor(source, [0, 1], tcess_pool=4).router_logits(ids, mask)
    for layer in (0, 1):
        assert torch.equal(logits[layer], whole[layer].reshape(*ids.shape, -1)), layer
    if family == "inkling2_loop_text":
        with pytest.raises(ProfileError, match="looped layers"):
            SignatureExtractor(source, [0, 2], tcess_pool=4)
