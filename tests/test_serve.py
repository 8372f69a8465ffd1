"""The profile server (moeprune.serve): started on loopback, driven with urllib, stopped."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import torch

from moeprune.cli import build_parser
from moeprune.errors import MoePruneError
from moeprune.profiles import ProfileStore, build_profile, load_profile, mix_profiles
from moeprune.serve import CompletionService, RequestError, make_server, parse_completion_request
from moeprune.tiny import save_tiny_checkpoint

CODE = "\n\n".join(f"def f{i}(x):\n    return x * {i} + {i * i}\n\nfor k in range({i}):\n    print(f{i}(k))"
                   for i in range(40))
PROSE = "\n\n".join(f"The quiet river ran past the old mill number {i}, and the children watched the boats drift "
                    "slowly toward the sea." for i in range(40))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(checkpoint, store folder) with profiles code, prose and general (their mix)."""
    root = tmp_path_factory.mktemp("serve")
    checkpoint = save_tiny_checkpoint("mixtral", root / "model")
    store = ProfileStore(root / "store")
    built = []
    for task, text in (("code", CODE), ("prose", PROSE)):
        (root / f"{task}.txt").write_text(text)
        profile = build_profile(checkpoint, task, root / f"{task}.txt", ratio=0.5, samples=4, seq_len=32, mode="whole",
                                window_lengths=(16,), signature_layers=1, progress=False)
        store.save(profile)
        built.append(profile)
    store.save(mix_profiles(built, name="general"))
    return checkpoint, store.folder


@pytest.fixture(scope="module")
def server(served):
    checkpoint, store = served
    with make_server(checkpoint, store, port=0, max_tokens_limit=32) as running:
        yield running


def _call(server, path: str, body=None, method: str | None = None) -> tuple[int, dict, dict]:
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data, method=method or ("POST" if data is not None else "GET"))
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


def _direct_greedy(checkpoint, store, name: str, prompt: str, max_tokens: int) -> str:
    """The same profile's model loaded directly, greedy generate, decoded."""
    service_tokenizer = _tokenizer(checkpoint)
    model = load_profile(checkpoint, ProfileStore(store).load(name))
    encoded = service_tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(encoded["input_ids"], attention_mask=encoded["attention_mask"], do_sample=False,
                                max_new_tokens=max_tokens, pad_token_id=service_tokenizer.pad_token_id)
    return service_tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


def _tokenizer(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)


def test_completion_matches_direct_generate(server, served):
    checkpoint, store = served
    prompt = "def f(x):\n    return x * 3"
    status, answer, _ = _call(server, "/v1/completions", {"prompt": prompt, "max_tokens": 6, "temperature": 0})
    assert status == 200
    assert answer["object"] == "text_completion" and answer["model"] == "model"
    assert answer["profile"] in {"code", "prose", "general"} and 0.0 <= answer["confidence"] <= 1.0
    choice = answer["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] in {"stop", "length"}
    usage = answer["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and 1 <= usage["completion_tokens"] <= 6
    assert choice["text"] == _direct_greedy(checkpoint, store, answer["profile"], prompt, 6)
    # a forced profile is used as is, with confidence 1
    status, forced, _ = _call(server, "/v1/completions", {"prompt": prompt, "max_tokens": 6, "temperature": 0,
                                                          "profile": "prose"})
    assert status == 200 and forced["profile"] == "prose" and forced["confidence"] == 1.0
    assert forced["choices"][0]["text"] == _direct_greedy(checkpoint, store, "prose", prompt, 6)


def test_sampling_with_seed_is_reproducible(server):
    body = {"prompt": "The river ran", "max_tokens": 8, "temperature": 1.5, "seed": 7}
    first, second = _call(server, "/v1/completions", body)[1], _call(server, "/v1/completions", body)[1]
    assert first["choices"][0]["text"] == second["choices"][0]["text"]


@pytest.mark.parametrize(
    "body, message",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        ({"max_tokens": 4}, 'no "prompt"'),
        ({"prompt": "   "}, "non-empty string"),
        ({"prompt": 3}, "non-empty string"),
        ({"prompt": "x", "max_tokens": 0}, "from 1 to 32"),
        ({"prompt": "x", "max_tokens": 33}, "from 1 to 32"),
        ({"prompt": "x", "max_tokens": "4"}, "from 1 to 32"),
        ({"prompt": "x", "temperature": -0.1}, "temperature"),
        ({"prompt": "x", "seed": 1.5}, "seed"),
        ({"prompt": "x", "profile": "legal"}, "unknown profile 'legal'"),
        ({"prompt": "x", "stream": True}, "stream"),
    ],
)
def test_bad_requests_get_400_and_server_survives(server, body, message):
    status, answer, _ = _call(server, "/v1/completions", body)
    assert status == 400 and message in answer["error"]["message"]
    assert _call(server, "/health")[0] == 200


def test_paths_and_methods(server):
    status, answer, _ = _call(server, "/v2/nothing")
    assert status == 404 and "/v1/completions" in answer["error"]["message"]
    status, answer, headers = _call(server, "/v1/completions")
    assert status == 405 and headers["Allow"] == "POST"
    assert _call(server, "/health", {"prompt": "x"})[0] == 405
    assert _call(server, "/v1/profiles", method="DELETE")[0] == 405
    status, profiles, _ = _call(server, "/v1/profiles")
    assert status == 200 and [p["id"] for p in profiles["data"]] == ["code", "general", "prose"]
    assert profiles["fallback"] == "general" and all(p["kept_counts"] == {"0": 4, "1": 4, "2": 4} for p in profiles["data"])


def test_internal_error_is_500_and_server_survives(server, monkeypatch):
    def broken(prompt, max_tokens=None):
        raise RuntimeError("matcher exploded")

    monkeypatch.setattr(server.service.matcher, "match", broken)
    status, answer, _ = _call(server, "/v1/completions", {"prompt": "hello"})
    assert status == 500 and "matcher exploded" in answer["error"]["message"]
    monkeypatch.undo()
    assert _call(server, "/v1/completions", {"prompt": "hello", "max_tokens": 2})[0] == 200


def test_lru_eviction_within_budget_and_shared_storage(served):
    checkpoint, store = served
    probe = CompletionService(checkpoint, store)
    sizes = probe.cache.expert_bytes
    budget = probe.cache.shared.nbytes + sizes["code"] + sizes["prose"] + max(sizes.values()) // 2  # two fit, not three
    with make_server(checkpoint, store, port=0, memory_budget_gb=budget / 2**30) as server:
        loaded = []
        for name in ("code", "prose", "code", "general"):
            status, answer, _ = _call(server, "/v1/completions", {"prompt": "x = 1", "max_tokens": 2, "profile": name})
            assert status == 200 and answer["profile"] == name
            loaded.append(_call(server, "/health")[1]["loaded"])
        assert loaded == [["code"], ["code", "prose"], ["prose", "code"], ["code", "general"]]
        memory = _call(server, "/health")[1]["memory"]
        assert memory["used_bytes"] == memory["shared_bytes"] + sizes["code"] + sizes["general"] <= memory["budget_bytes"]
        models = server.service.cache.models()
        a, b = (dict(m.named_parameters()) for m in models.values())
        for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight"):
            assert a[name].data_ptr() == b[name].data_ptr()
        assert a["model.layers.0.mlp.experts.gate_up_proj"].data_ptr() != b["model.layers.0.mlp.experts.gate_up_proj"].data_ptr()
    with pytest.raises(urllib.error.URLError):  # stopped: nothing listens any more
        urllib.request.urlopen(server.url + "/health", timeout=5)


def test_budget_too_small_for_one_profile(served):
    checkpoint, store = served
    with pytest.raises(MoePruneError, match="cannot hold profile"):
        make_server(checkpoint, store, port=0, memory_budget_gb=1e-5)
    with pytest.raises(MoePruneError, match="positive number"):
        make_server(checkpoint, store, port=0, memory_budget_gb=0)


def test_parse_request_defaults():
    request = parse_completion_request(b'{"prompt": ["hi"]}', max_tokens_limit=8)
    assert (request.prompt, request.max_tokens, request.temperature, request.seed, request.profile) == ("hi", 8, 1.0, None, None)
    with pytest.raises(RequestError) as info:
        parse_completion_request(b'{"prompt": "hi", "n": 2}')
    assert info.value.status == 400


def test_cli_registers_serve(served):
    checkpoint, store = served
    args = build_parser().parse_args(["serve", str(checkpoint), "--store", str(store), "--port", "0",
                                      "--memory-budget", "0.5", "--no-fallback"])
    assert args.handler.__name__ == "run_serve"
    assert (args.port, args.memory_budget, args.fallback, args.host) == (0, 0.5, None, "127.0.0.1")


def test_cli_serve_prints_address_and_answers(served):
    import select
    import subprocess
    import sys

    checkpoint, store = served
    process = subprocess.Popen([sys.executable, "-m", "moeprune.cli", "-q", "serve", str(checkpoint), "--store", str(store),
                                "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([process.stdout], [], [], 120)
        assert ready, "the server printed nothing within 120 s"
        line = process.stdout.readline()
        assert line.startswith("moeprune serve: listening on http://127.0.0.1:"), process.stderr.read()
        url = line.split("listening on ", 1)[1].split()[0]
        with urllib.request.urlopen(url + "/health", timeout=60) as response:
            assert json.loads(response.read())["status"] == "ok"
    finally:
        process.terminate()
        process.wait(timeout=30)
