"""The profile server (moeprune.serve): started on loopback, driven with urllib, stopped."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import torch

from moeprune.cli import build_parser
from moeprune.errors import MoePruneError
from moeprune.profiles import ProfileStore, load_profile
from moeprune.serve import (Admission, CompletionService, RequestError, ServerOptions, check_port, make_server,
                            parse_completion_request, tiny_profile_store)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(checkpoint, store folder) with profiles code, prose and general (their mix)."""
    return tiny_profile_store(tmp_path_factory.mktemp("serve"))


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


# One row per class of client mistake: the body, then a phrase of the message that says how to fix it.
BAD_REQUESTS = [
    pytest.param(b"{not json", "not valid JSON", id="not-json"),
    pytest.param(b"\xff\xfe{}", "not UTF-8", id="not-utf8"),
    pytest.param(b"", "no body", id="empty-body"),
    pytest.param(b"[" * 100_000, "nests too deeply", id="deep-nesting"),
    pytest.param(b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "an integer of 5000 digits", id="integer-too-long"),
    pytest.param(b'{"prompt": "x", "temperature": NaN}', "NaN, which is not JSON", id="nan-literal"),
    pytest.param(b'{"prompt": "x", "temperature": -Infinity}', "-Infinity, which is not JSON", id="infinity-literal"),
    pytest.param(b"[1, 2]", "must be a JSON object", id="not-an-object"),
    pytest.param({"max_tokens": 4}, 'no "prompt"', id="no-prompt"),
    pytest.param({"prompt": "   "}, "non-empty string", id="blank-prompt"),
    pytest.param({"prompt": 3}, "non-empty string", id="prompt-type"),
    pytest.param({"prompt": ["a", "b"]}, "one prompt per request", id="prompt-list"),
    pytest.param(b'{"prompt": "\\ud800 x"}', "lone surrogate", id="lone-surrogate"),
    pytest.param({"prompt": "x", "max_tokens": 0}, "from 1 to 32", id="max-tokens-zero"),
    pytest.param({"prompt": "x", "max_tokens": 33}, "from 1 to 32", id="max-tokens-over-limit"),
    pytest.param({"prompt": "x", "max_tokens": "4"}, "from 1 to 32", id="max-tokens-type"),
    pytest.param({"prompt": "x", "max_tokens": True}, "from 1 to 32", id="max-tokens-bool"),
    pytest.param({"prompt": "x", "temperature": 1e-300}, "0 (greedy) or a number from 0.01 to 2", id="temperature-tiny"),
    pytest.param({"prompt": "x", "temperature": -0.1}, "0 (greedy) or a number from 0.01 to 2", id="temperature-negative"),
    pytest.param({"prompt": "x", "temperature": 2.5}, "0 (greedy) or a number from 0.01 to 2", id="temperature-huge"),
    pytest.param(b'{"prompt": "x", "temperature": 1e400}', "0 (greedy) or a number", id="temperature-overflows-float"),
    pytest.param({"prompt": "x", "temperature": 10**30}, "0 (greedy) or a number", id="temperature-huge-integer"),
    pytest.param({"prompt": "x", "temperature": "hot"}, "0 (greedy) or a number", id="temperature-type"),
    pytest.param({"prompt": "x", "seed": 2**64}, "from 0 to 2**64-1", id="seed-beyond-64-bits"),
    pytest.param({"prompt": "x", "seed": -1}, "from 0 to 2**64-1", id="seed-negative"),
    pytest.param({"prompt": "x", "seed": 1.5}, "seed", id="seed-type"),
    pytest.param({"prompt": "x", "profile": 3}, "GET /v1/profiles", id="profile-type"),
    pytest.param({"prompt": "x", "profile": "legal"}, "unknown profile 'legal'; profiles: code, general, prose", id="profile-unknown"),
    pytest.param({"prompt": "x", "stream": True}, "set it to false", id="stream"),
    pytest.param({"prompt": "x", "n": 2}, '"n" must be 1', id="n"),
]


@pytest.mark.parametrize("body, message", BAD_REQUESTS)
def test_bad_requests_get_400_and_server_survives(server, body, message, caplog):
    with caplog.at_level("INFO", logger="moeprune.serve"):
        status, answer, _ = _call(server, "/v1/completions", body)
    assert status == 400 and message in answer["error"]["message"]
    assert answer["error"]["type"] == "Bad Request" and answer["error"]["code"] == 400
    assert not [r for r in caplog.records if r.levelno >= 30], "a client mistake is logged at debug only"
    assert _call(server, "/health")[0] == 200


def test_prompt_of_no_tokens_is_a_400(server, monkeypatch):
    """A tokenizer that reads nothing in a prompt (some drop unknown characters) is the client's 400."""
    def empty(prompt, return_tensors=None):
        return {"input_ids": torch.zeros((1, 0), dtype=torch.long), "attention_mask": torch.zeros((1, 0), dtype=torch.long)}

    monkeypatch.setattr(server.service, "tokenizer", empty)
    status, answer, _ = _call(server, "/v1/completions", {"prompt": "\u200b"})
    assert status == 400 and "encodes to no tokens" in answer["error"]["message"]


def test_unknown_fields_and_nulls_are_ignored(server):
    """Fields the server does not implement are ignored and null means absent (docs/serving.md)."""
    body = {"prompt": "x = 1", "max_tokens": 3, "temperature": 0, "profile": "code"}
    plain = _call(server, "/v1/completions", body)
    extra = _call(server, "/v1/completions", {**body, "top_p": 0.5, "user": "me", "seed": None, "stream": False, "n": 1})
    assert plain[0] == extra[0] == 200
    assert plain[1]["choices"][0]["text"] == extra[1]["choices"][0]["text"]


def _raw(server, data: bytes, *, timeout: float = 60) -> tuple[int, dict, str]:
    """Send bytes as they are and half-close, read until the server closes; (status, JSON body, raw head)."""
    import socket

    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=timeout) as connection:
        connection.sendall(data)
        connection.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := connection.recv(1 << 16):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body), head.decode("latin-1")


# One row per class of malformed HTTP: the bytes sent, the status, a phrase of the message.
BAD_HTTP = [
    pytest.param(b"POST /v1/completions HTTP/1.1\r\nContent-Length: abc\r\n\r\n{}", 400, "Content-Length header must be",
                 id="content-length-not-a-number"),
    pytest.param(b"POST /v1/completions HTTP/1.1\r\nContent-Length: -5\r\n\r\n{}", 400, "Content-Length header must be",
                 id="content-length-negative"),
    pytest.param(b'POST /v1/completions HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\n{"prompt": "x"}', 400,
                 "not valid JSON", id="content-length-short"),
    pytest.param(b'POST /v1/completions HTTP/1.1\r\nContent-Length: 20\r\n\r\n{"prompt": "x"}', 400,
                 "ended after 15 of the 20 bytes", id="body-ends-early"),
    pytest.param(b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 411,
                 "Content-Length", id="chunked"),
    pytest.param(b"POST /v1/completions HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n" + b"x" * 100_000, 413,
                 "send a shorter prompt", id="body-too-large"),
    pytest.param(b"HELLO\r\n\r\n", 400, "send an HTTP/1.1 request", id="not-http"),
    pytest.param(b"OPTIONS /v1/completions HTTP/1.1\r\nConnection: close\r\n\r\n", 501, "Unsupported method",
                 id="unknown-method"),
]


def test_get_with_a_body_keeps_the_connection_in_sync(server):
    """Two requests on one kept-alive connection, the first a GET with a body the server does not use."""
    import http.client

    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    try:
        connection.request("GET", "/health", body=b'{"ignored": true}')
        first = connection.getresponse()
        assert first.status == 200 and json.loads(first.read())["status"] == "ok"
        connection.request("GET", "/v1/profiles")
        second = connection.getresponse()
        assert second.status == 200 and json.loads(second.read())["object"] == "list"
    finally:
        connection.close()


@pytest.mark.parametrize("data, status, message", BAD_HTTP)
def test_malformed_http_gets_a_json_4xx(server, data, status, message):
    code, answer, head = _raw(server, data, timeout=60)
    assert code == status and message in answer["error"]["message"] and answer["error"]["code"] == status
    assert "Connection: close" in head
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


@pytest.mark.parametrize("port", [-1, 65536, 10**30, 80.0, "80", True])
def test_port_out_of_range_is_refused_before_reading_the_model(tmp_path, port):
    with pytest.raises(MoePruneError, match="--port must be an integer from 0 to 65535"):
        make_server(tmp_path / "no-model", tmp_path / "no-store", port=port)
    assert check_port(65535) == 65535 and check_port(0) == 0


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(workers=1), "--workers must be an integer of at least 2"),
        (dict(workers=4, queue_size=4), "--queue-size must be an integer from 1 to --workers - 1 (3)"),
        (dict(queue_size=0), "--queue-size must be"),
        (dict(request_timeout=0), "--request-timeout must be a positive number"),
        (dict(request_timeout=-1.0), "--request-timeout must be a positive number"),
        (dict(request_timeout=float("nan")), "--request-timeout must be a positive number"),
        (dict(request_timeout=float("inf")), "--request-timeout must be a positive number"),
        (dict(backlog=0), "--backlog must be an integer from 1 to 65535"),
    ],
)
def test_server_options_are_validated(options, message):
    with pytest.raises(MoePruneError) as info:
        ServerOptions(**options)
    assert message in str(info.value)


def test_cli_defaults_are_the_server_defaults():
    """commands/serve.py repeats ServerOptions' defaults (so that --help imports no torch): they agree."""
    from moeprune.commands import serve as command

    defaults = ServerOptions()
    assert (command.DEFAULT_WORKERS, command.DEFAULT_QUEUE_SIZE, command.DEFAULT_REQUEST_TIMEOUT, command.DEFAULT_BACKLOG) == (
        defaults.workers, defaults.queue_size, defaults.request_timeout, defaults.backlog)
    args = build_parser().parse_args(["serve", "m", "--store", "s"])
    assert (args.workers, args.queue_size, args.request_timeout, args.backlog) == (16, 8, 30.0, 128)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--port", "70000"], "--port must be an integer from 0 to 65535"),
        (["--port", "-1"], "--port must be an integer from 0 to 65535"),
        (["--queue-size", "16"], "--queue-size must be an integer from 1 to --workers - 1"),
        (["--request-timeout", "0"], "--request-timeout must be a positive number"),
    ],
)
def test_cli_serve_bad_options_exit_2_without_traceback(tmp_path, capsys, flags, message):
    from moeprune.cli import main

    assert main(["serve", str(tmp_path / "no-model"), "--store", str(tmp_path / "no-store"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moeprune: error: ") and message in err and "Traceback" not in err


def test_admission_refuses_beyond_capacity_with_retry_after():
    """Retry-After = ceil of the moving mean (weight 0.2 for the newest, starting at 1 s), at least 1."""
    admission = Admission(2)
    admission.enter()
    admission.enter()
    with pytest.raises(RequestError) as info:
        admission.enter()
    assert info.value.status == 503 and info.value.headers == {"Retry-After": "1"} and "retry after 1 s" in str(info.value)
    admission.leave(3.0)  # mean 0.8 * 1 + 0.2 * 3 = 1.4 -> 2 s
    assert admission.mean_seconds == pytest.approx(1.4) and admission.retry_after() == 2
    admission.enter()
    with pytest.raises(RequestError) as info:
        admission.enter()
    assert info.value.headers == {"Retry-After": "2"}
    assert admission.to_json() == {"active": 2, "capacity": 2, "admitted": 3, "rejected": 2}
    admission.leave(0.0)
    admission.leave(0.0)  # mean 1.4 * 0.64 = 0.896 -> still at least 1 s
    assert admission.active == 0 and admission.retry_after() == 1


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
