"""A short soak of `moeprune serve` (issue 16): mixed good and bad requests from a few concurrent
clients on loopback, against a server this script starts itself, in a child process.

The server runs on a tiny generated Mixtral checkpoint with two task profiles and their mix
(``code``, ``prose``, ``general``: :func:`moeprune.serve.tiny_profile_store`, in a temporary
folder), or on ``--model DIR --store DIR``.
A deterministic mix (``--seed``) of ``--requests`` requests (default 1,000; about one in four
bad: one row per class of client mistake, see :data:`BAD_BODIES`) is sent by ``--clients`` threads
(default 4), a new connection per request. Reported:

* requests/s over the whole run, latency percentiles p50 / p90 / p99 of good and bad requests
  separately, the status codes of each, and every request that got something unexpected (a good
  one not 200/503, a bad one not 4xx, a connection error: the soak fails if there is any);
* the server process's resident memory (VmRSS of /proc) after a warm-up (one request per profile,
  so that every profile model is loaded), at the middle and at the end, and its growth;
* whether the server still answers ``/health`` at the end.

Usage:

    python scripts/soak_serve.py [--requests 1000] [--clients 4] [--model DIR --store DIR] [--json soak.json]

Prints a markdown table; ``--json`` also writes the figures with the commit and the machine. Exits 1
when a request got something unexpected or the server died.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import random
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from _profiles_doc import commit  # puts this checkout on sys.path
from bench_startup import child_env, machine

from moeprune.io.output import atomic_write_json
from moeprune.serve import tiny_profile_store

PROMPTS = ("def f(x):\n    return x * 3", "The quiet river ran past the old mill", "for k in range(10):\n    print(k)",
           "The children watched the boats drift", "x = [i * i for i in range(", "Once upon a time")
#: One request body per class of client mistake (the suite's table in tests/test_serve.py has them all).
BAD_BODIES = (
    b"{not json", b"\xff\xfe{}", b"", b"[1, 2]", b'{"prompt": "x", "temperature": NaN}', b'{"max_tokens": 4}',
    b'{"prompt": "   "}', b'{"prompt": ["a", "b"]}', b'{"prompt": "\\ud800 x"}', b'{"prompt": "x", "max_tokens": 0}',
    b'{"prompt": "x", "temperature": 1e-300}', b'{"prompt": "x", "temperature": 1e400}',
    b'{"prompt": "x", "seed": 18446744073709551616}', b'{"prompt": "x", "seed": -1}', b'{"prompt": "x", "profile": "legal"}',
    b'{"prompt": "x", "stream": true}', b'{"prompt": "x", "n": 2}',
)

@dataclass(frozen=True)
class Planned:
    """One request of the soak: good or bad, method, path, body."""

    good: bool
    method: str
    path: str
    body: bytes | None


@dataclass(frozen=True)
class Outcome:
    good: bool
    status: int | None  # None: no HTTP answer (connection error)
    seconds: float
    error: str | None = None


def plan_requests(count: int, seed: int = 0, bad_share: float = 0.25, max_tokens: int = 4) -> list[Planned]:
    """``count`` requests, about ``bad_share`` of them bad (client mistakes, a wrong path or method)."""
    rng = random.Random(seed)
    planned = []
    for _ in range(count):
        if rng.random() < bad_share:
            kind = rng.random()
            if kind < 0.1:
                planned.append(Planned(False, "GET", "/v2/nothing", None))
            elif kind < 0.2:
                planned.append(Planned(False, "GET", "/v1/completions", None))
            else:
                planned.append(Planned(False, "POST", "/v1/completions", rng.choice(BAD_BODIES)))
            continue
        body: dict = {"prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(1, max_tokens)}
        if rng.random() < 0.5:
            body["temperature"] = 0
        else:
            body.update(temperature=0.7, seed=rng.randrange(2**64))
        if rng.random() < 0.2:
            body["profile"] = rng.choice(("code", "prose", "general"))
        planned.append(Planned(True, "POST", "/v1/completions", json.dumps(body).encode()))
    return planned


def expected(outcome: Outcome) -> bool:
    """A good request is answered 200 (or 503: the queue was full), a bad one 4xx."""
    if outcome.status is None:
        return False
    return outcome.status in (200, 503) if outcome.good else 400 <= outcome.status < 500


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile: the smallest value with at least ``q`` percent of the values at or below it."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def send(port: int, request: Planned, timeout: float = 120.0) -> Outcome:
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if request.body is not None else {}
        connection.request(request.method, request.path, body=request.body, headers=headers)
        response = connection.getresponse()
        json.loads(response.read())  # every answer, error or not, is JSON
        return Outcome(request.good, response.status, time.perf_counter() - started)
    except Exception as exc:  # noqa: BLE001 - counted and reported: the failure under test
        return Outcome(request.good, None, time.perf_counter() - started, f"{type(exc).__name__}: {exc}")
    finally:
        connection.close()


def profile_names(port: int) -> list[str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("GET", "/v1/profiles")
        return [profile["id"] for profile in json.loads(connection.getresponse().read())["data"]]
    finally:
        connection.close()


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (VmRSS in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def start_server(model: Path, store: Path, max_tokens_limit: int) -> tuple[subprocess.Popen, int]:
    """`moeprune serve` on 127.0.0.1, any free port; (process, port) once it listens."""
    process = subprocess.Popen([sys.executable, "-m", "moeprune.cli", "-q", "serve", str(model), "--store", str(store),
                                "--host", "127.0.0.1", "--port", "0", "--max-tokens-limit", str(max_tokens_limit)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    ready, _, _ = select.select([process.stdout], [], [], 300)
    line = process.stdout.readline() if ready else ""
    if "listening on http://127.0.0.1:" not in line:
        process.kill()
        raise RuntimeError(f"the server did not start: {line!r} {process.stderr.read()[-2000:]}")
    return process, int(line.split("listening on http://127.0.0.1:", 1)[1].split()[0])


def soak(port: int, pid: int, planned: list[Planned], clients: int, time_limit: float) -> dict:
    """Send ``planned`` from ``clients`` threads; outcomes, wall time and RSS at start / middle / end."""
    for name in profile_names(port):  # load every profile first: the soak measures growth, not the cache filling
        send(port, Planned(True, "POST", "/v1/completions", json.dumps({"prompt": "warm up", "max_tokens": 1,
                                                                         "profile": name}).encode()))
    rss = {"start": rss_bytes(pid)}
    outcomes: list[Outcome | None] = [None] * len(planned)
    next_index = iter(range(len(planned)))
    lock = threading.Lock()
    deadline = time.monotonic() + time_limit
    middle = len(planned) // 2

    def client() -> None:
        while time.monotonic() < deadline:
            with lock:
                index = next(next_index, None)
            if index is None:
                return
            outcomes[index] = send(port, planned[index])
            if index == middle:
                rss["middle"] = rss_bytes(pid)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    rss["end"] = rss_bytes(pid)
    done = [o for o in outcomes if o is not None]
    return {"outcomes": done, "seconds": seconds, "rss": rss, "complete": len(done) == len(planned)}


def summarize(outcomes: list[Outcome], seconds: float, rss: dict[str, int]) -> dict:
    """Requests/s, latency percentiles (ms) and status counts of good and bad requests, RSS growth."""
    summary: dict = {"requests": len(outcomes), "seconds": round(seconds, 3),
                     "requests_per_s": round(len(outcomes) / seconds, 2) if seconds > 0 else None}
    for kind, good in (("good", True), ("bad", False)):
        chosen = [o for o in outcomes if o.good == good]
        answered = [o.seconds * 1000 for o in chosen if o.status is not None]
        summary[kind] = {
            "count": len(chosen),
            "statuses": {str(k): v for k, v in sorted(Counter(str(o.status) for o in chosen).items())},
            "latency_ms": {f"p{q}": round(percentile(answered, q), 1) for q in (50, 90, 99)} if answered else None,
        }
    summary["unexpected"] = [{"good": o.good, "status": o.status, "error": o.error} for o in outcomes if not expected(o)]
    summary["rss_mib"] = {k: round(v / 2**20, 1) for k, v in rss.items()}
    summary["rss_growth_mib"] = round((rss["end"] - rss["start"]) / 2**20, 1)
    summary["rss_growth_second_half_mib"] = round((rss["end"] - rss["middle"]) / 2**20, 1) if "middle" in rss else None
    return summary


def markdown_table(results: dict) -> str:
    s = results["summary"]
    lines = [f"Soak of `moeprune serve`, commit {results['commit']}, {s['requests']} requests from {results['clients']} "
             f"clients in {s['seconds']:.1f} s: **{s['requests_per_s']} requests/s**; server alive at the end: "
             f"{results['alive_at_end']}.", "",
             "| requests | count | p50 | p90 | p99 | status codes |", "|---|---:|---:|---:|---:|---|"]
    for kind in ("good", "bad"):
        part = s[kind]
        latency = part["latency_ms"] or {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
        codes = ", ".join(f"{code}: {count}" for code, count in part["statuses"].items())
        lines.append(f"| {kind} | {part['count']} | {latency['p50']:.1f} ms | {latency['p90']:.1f} ms | "
                     f"{latency['p99']:.1f} ms | {codes} |")
    rss = s["rss_mib"]
    lines += ["", f"Server RSS: {rss['start']} MiB after the warm-up, {rss.get('middle', 'n/a')} MiB at the middle, "
                  f"{rss['end']} MiB at the end (growth {s['rss_growth_mib']:+} MiB; second half "
                  f"{s['rss_growth_second_half_mib']:+} MiB). Unexpected answers: {len(s['unexpected'])}."]
    return "\n".join(lines)


def run(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="moeprune-soak-") as tmp:
        model, store = (Path(args.model), Path(args.store)) if args.model else tiny_profile_store(tmp)
        process, port = start_server(model, store, max_tokens_limit=max(8, args.max_tokens))
        try:
            ran = soak(port, process.pid, plan_requests(args.requests, args.seed, max_tokens=args.max_tokens),
                       args.clients, args.time_limit)
            health = send(port, Planned(True, "GET", "/health", None))
            alive = process.poll() is None and health.status == 200
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    summary = summarize(ran["outcomes"], ran["seconds"], ran["rss"])
    return {"commit": commit(), "machine": machine(), "clients": args.clients, "seed": args.seed,
            "planned_requests": args.requests, "complete": ran["complete"], "alive_at_end": alive,
            "model": "tiny generated mixtral" if not args.model else Path(args.model).name, "summary": summary}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="requests to send (default 1000)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    parser.add_argument("--max-tokens", type=int, default=4, help="largest max_tokens of a good request (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix (default 0)")
    parser.add_argument("--time-limit", type=float, default=600.0, help="stop sending after this many seconds (default 600)")
    parser.add_argument("--model", help="checkpoint folder (default: a tiny generated one); needs --store")
    parser.add_argument("--store", help="profile store folder for --model")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if (args.model is None) != (args.store is None):
        parser.error("give --model and --store together (or neither, for the tiny generated model)")
    if args.requests < 1 or args.clients < 1 or args.max_tokens < 1 or not args.time_limit > 0:
        parser.error("--requests, --clients, --max-tokens and --time-limit must be positive")
    results = run(args)
    if args.json:
        atomic_write_json(args.json, results, overwrite=True)
    print(markdown_table(results))
    ok = results["alive_at_end"] and results["complete"] and not results["summary"]["unexpected"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
