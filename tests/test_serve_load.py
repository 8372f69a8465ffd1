"""The profile server under load, on loopback: a burst of concurrent completions all answered (200 or
503 with Retry-After, never a reset), the queue bound and /health while the model is busy, and
stalled clients timed out with their workers freed. Timing enters only as generous bounds on
"answered at all"."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from moeprune.serve import CompletionServer, CompletionService, ServerOptions, tiny_profile_store

ANSWER_BOUND_S = 60.0  # "answered at all": far above any answer on a busy machine


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    checkpoint, store = tiny_profile_store(tmp_path_factory.mktemp("serve-load"))
    return CompletionService(checkpoint, store, max_tokens_limit=8)


def _post(url: str, body: dict) -> tuple[int, dict, dict]:
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=ANSWER_BOUND_S) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


def _health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=ANSWER_BOUND_S) as response:
        assert response.status == 200
        return json.loads(response.read())


def test_fifty_concurrent_completions_all_answered(service):
    """50 clients at once against the default options: every one gets 200 or 503 + Retry-After, none a
    connection error; the admission counts agree with the answers; /health answers during the burst."""
    clients = 50
    start = threading.Barrier(clients + 1)

    def one(i: int):
        start.wait()
        try:
            return _post(server.url, {"prompt": f"def f{i}(x):", "max_tokens": 2, "temperature": 0})
        except Exception as exc:  # noqa: BLE001 - counted: a reset or a timeout is the failure under test
            return exc

    with CompletionServer(service, "127.0.0.1", 0, ServerOptions()) as server, ThreadPoolExecutor(clients) as pool:
        before = _health(server.url)["load"]
        futures = [pool.submit(one, i) for i in range(clients)]
        start.wait()
        health_started = time.monotonic()
        during = _health(server.url)
        health_seconds = time.monotonic() - health_started
        results = [future.result() for future in futures]
        after = _health(server.url)["load"]
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, f"{len(errors)} of {clients} requests failed: {errors[:3]}"
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 1
    for status, answer, headers in results:
        if status == 503:
            assert int(headers["Retry-After"]) >= 1 and "retry after" in answer["error"]["message"]
        else:
            assert answer["usage"]["completion_tokens"] <= 2
    assert during["status"] == "ok" and health_seconds < ANSWER_BOUND_S
    assert after["active"] == 0
    assert after["admitted"] - before["admitted"] == statuses.count(200)
    assert after["rejected"] - before["rejected"] == statuses.count(503)


def test_queue_bound_and_health_while_the_model_is_busy(service):
    """With the model held (its lock taken, as by a long generation), queue_size completions wait, the
    next one is answered 503 at once, /health answers; released, the waiting ones complete."""
    options = ServerOptions(workers=4, queue_size=2, request_timeout=30)
    with CompletionServer(service, "127.0.0.1", 0, options) as server, ThreadPoolExecutor(2) as pool:
        with service.lock:
            waiting = [pool.submit(_post, server.url, {"prompt": "x = 1", "max_tokens": 2, "temperature": 0})
                       for _ in range(2)]
            deadline = time.monotonic() + ANSWER_BOUND_S
            while _health(server.url)["load"]["active"] < 2:
                assert time.monotonic() < deadline, "the two completions were never admitted"
                time.sleep(0.05)
            status, answer, headers = _post(server.url, {"prompt": "y = 2", "max_tokens": 2})
            assert status == 503 and int(headers["Retry-After"]) >= 1 and "at most 2" in answer["error"]["message"]
            health = _health(server.url)
            assert health["load"] == {"active": 2, "capacity": 2, "admitted": 2, "rejected": 1}
            status, answer, _ = _post(server.url, {"prompt": "y", "temperature": 1e-300})
            assert status == 400, "a client mistake is a 400 even when the server is busy"
        assert [future.result()[0] for future in waiting] == [200, 200]


def _stall(server, declared: int = 100) -> socket.socket:
    """A client that sends headers announcing a body, a part of it, then nothing."""
    connection = socket.create_connection(server.server_address[:2], timeout=ANSWER_BOUND_S)
    connection.sendall(f"POST /v1/completions HTTP/1.1\r\nContent-Length: {declared}\r\n\r\n".encode() + b'{"prompt"')
    return connection


def _read_answer(connection: socket.socket) -> tuple[int, dict]:
    received = b""
    while chunk := connection.recv(1 << 16):
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_stalled_bodies_time_out_and_free_their_workers(service):
    """As many stalled clients as workers: each is answered 408 after the request timeout, /health
    (queued behind them) is answered, and the server completes requests afterwards."""
    options = ServerOptions(workers=3, queue_size=1, request_timeout=1.0)
    with CompletionServer(service, "127.0.0.1", 0, options) as server:
        stalled = [_stall(server) for _ in range(options.workers)]
        try:
            assert _health(server.url)["status"] == "ok"
            for connection in stalled:
                status, answer = _read_answer(connection)
                assert status == 408 and "did not arrive within 1 s (9 of the 100 bytes" in answer["error"]["message"]
        finally:
            for connection in stalled:
                connection.close()
        status, answer, _ = _post(server.url, {"prompt": "x = 1", "max_tokens": 2, "temperature": 0})
        assert status == 200 and answer["usage"]["completion_tokens"] <= 2


def test_idle_keep_alive_connection_does_not_hold_a_worker_forever(service):
    """A client that opens a connection and sends nothing is dropped after the request timeout."""
    options = ServerOptions(workers=2, queue_size=1, request_timeout=1.0)
    with CompletionServer(service, "127.0.0.1", 0, options) as server:
        idle = [socket.create_connection(server.server_address[:2], timeout=ANSWER_BOUND_S) for _ in range(2)]
        try:
            assert _health(server.url)["status"] == "ok"
            for connection in idle:
                assert connection.recv(1) == b""  # closed by the server, no answer owed
        finally:
            for connection in idle:
                connection.close()


# -- the pure helpers of scripts/soak_serve.py -------------------------------------------------------


@pytest.fixture(scope="module")
def soak_script():
    import importlib
    import sys
    from pathlib import Path

    scripts = str(Path(__file__).resolve().parents[1] / "scripts")
    sys.path.insert(0, scripts)
    try:
        yield importlib.import_module("soak_serve")
    finally:
        sys.path.remove(scripts)


def test_soak_percentile_is_nearest_rank(soak_script):
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert [soak_script.percentile(values, q) for q in (0, 20, 50, 90, 100)] == [1.0, 1.0, 3.0, 5.0, 5.0]
    assert soak_script.percentile(list(range(1, 101)), 99) == 99
    with pytest.raises(ValueError):
        soak_script.percentile([], 50)


def test_soak_plan_is_deterministic_and_mixed(soak_script):
    plan = soak_script.plan_requests(400, seed=3)
    assert plan == soak_script.plan_requests(400, seed=3) and plan != soak_script.plan_requests(400, seed=4)
    bad = [p for p in plan if not p.good]
    assert 60 <= len(bad) <= 140  # about a quarter
    for request in plan:
        if request.good:
            body = json.loads(request.body)
            assert 1 <= body["max_tokens"] <= 4 and body["temperature"] in (0, 0.7)


def test_soak_expectations_and_summary(soak_script):
    Outcome = soak_script.Outcome
    outcomes = [Outcome(True, 200, 0.010), Outcome(True, 503, 0.002), Outcome(False, 400, 0.001),
                Outcome(False, 500, 0.001), Outcome(True, None, 1.0, "ConnectionResetError: reset")]
    assert [soak_script.expected(o) for o in outcomes] == [True, True, True, False, False]
    summary = soak_script.summarize(outcomes, 2.0, {"start": 100 * 2**20, "middle": 101 * 2**20, "end": 103 * 2**20})
    assert summary["requests_per_s"] == 2.5
    assert summary["good"]["statuses"] == {"200": 1, "503": 1, "None": 1}
    assert summary["good"]["latency_ms"] == {"p50": 2.0, "p90": 10.0, "p99": 10.0}  # answered ones only
    assert summary["bad"]["statuses"] == {"400": 1, "500": 1}
    assert len(summary["unexpected"]) == 2
    assert (summary["rss_growth_mib"], summary["rss_growth_second_half_mib"]) == (3.0, 2.0)
