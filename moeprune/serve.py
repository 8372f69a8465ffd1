"""A small HTTP server that answers completions with the profile model that matches each prompt.

Per request (``POST /v1/completions``, the OpenAI completions request shape) the server

1. matches the prompt to a task profile with :class:`moeprune.profiles.ProfileMatcher` (from the
   prompt's own router signature at the first MoE layers: by default a classifier trained on the
   profiles' calibration windows; far from all of them -> the fallback profile), unless the request
   forces one with ``"profile"``;
2. takes that profile's model from an LRU cache, loading it on first use with the partial loader
   (:func:`moeprune.loader.load_with_experts`: only the profile's experts are read); all cached
   models share one copy of the non-expert weights (:class:`moeprune.loader.SharedWeights`);
3. generates (greedy at temperature 0, sampling otherwise) and answers in the OpenAI completions
   shape plus ``profile`` and ``confidence``.

Memory budget: the shared non-expert bytes count once, each cached profile its router and expert
bytes (from the checkpoint headers, before loading); the least recently used profiles are evicted
until a new one fits. A profile that does not fit even alone is refused when the server starts.
The signature extractor of the matcher (embeddings and the first decoder layers) is not counted.

Endpoints: ``POST /v1/completions``, ``GET /v1/profiles``, ``GET /health``. Bad requests get a 4xx
with ``{"error": {"message": ...}}``; an internal failure answers 500 and the server keeps running.
Requests are handled in threads (``ThreadingHTTPServer``); matching, loading and generation run one
at a time under one lock (CPU inference gains nothing from running two at once).
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

from . import api
from .errors import MoePruneError
from .io.fingerprint import architecture_fingerprint
from .loader import expert_nbytes, load_shared_weights, load_with_experts
from .profiles import GENERAL, ProfileMatcher, ProfileStore, check_profile_model

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16
DEFAULT_MAX_TOKENS_LIMIT = 256
MAX_TEMPERATURE = 2.0
MAX_BODY_BYTES = 1 << 20
COMPLETIONS_PATH = "/v1/completions"
PROFILES_PATH = "/v1/profiles"
HEALTH_PATH = "/health"


class RequestError(MoePruneError):
    """A request the server refuses, with the HTTP status to answer."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = int(status)


# -- requests --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompletionRequest:
    """A validated completions request."""

    prompt: str
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    seed: int | None = None
    profile: str | None = None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_completion_request(body: bytes, max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT) -> CompletionRequest:
    """Validate a request body: JSON object with ``prompt`` (non-empty string, or a list of one),
    ``max_tokens`` (integer in [1, limit], default 16 or the limit if smaller), ``temperature``
    (number in [0, 2], default 1; 0 = greedy), optional integer ``seed`` and profile name
    ``profile``. ``stream`` and ``n`` != 1 are refused; other OpenAI fields are ignored.
    Raises :class:`RequestError` (400) saying what to fix.
    """
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON ({exc}); send a JSON object such as "
                           '{"prompt": "Q: 1+1=? A:", "max_tokens": 8}') from None
    if not isinstance(data, dict):
        raise RequestError(f"the request body must be a JSON object, not {type(data).__name__}")
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if prompt is None:
        raise RequestError('the request has no "prompt"; give the text to complete')
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError('"prompt" must be a non-empty string (or a list holding one)')
    max_tokens = data.get("max_tokens", min(DEFAULT_MAX_TOKENS, max_tokens_limit))
    if not _is_int(max_tokens) or not 1 <= max_tokens <= max_tokens_limit:
        raise RequestError(f'"max_tokens" must be an integer from 1 to {max_tokens_limit}, got {max_tokens!r}')
    temperature = data.get("temperature", 1.0)
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature)
            or not 0 <= temperature <= MAX_TEMPERATURE):
        raise RequestError(f'"temperature" must be a number from 0 (greedy) to {MAX_TEMPERATURE:g}, got {temperature!r}')
    seed = data.get("seed")
    if seed is not None and not _is_int(seed):
        raise RequestError(f'"seed" must be an integer, got {seed!r}')
    profile = data.get("profile")
    if profile is not None and (not isinstance(profile, str) or not profile):
        raise RequestError(f'"profile" must be the name of a profile, got {profile!r}')
    if data.get("stream"):
        raise RequestError('"stream" is not supported; leave it out or set it to false')
    if data.get("n", 1) != 1:
        raise RequestError('"n" must be 1 (one completion per request)')
    return CompletionRequest(prompt, int(max_tokens), float(temperature), seed, profile)


# -- the LRU cache of profile models -----------------------------------------------------------------


class ProfileModelCache:
    """Profile models loaded on first use, least recently used evicted to stay within a byte budget.

    ``budget_bytes`` (None = unlimited) covers the shared non-expert tensors once plus each cached
    profile's router and expert bytes (:func:`moeprune.loader.expert_nbytes`).
    """

    def __init__(self, model_dir: str | Path, store, *, budget_bytes: int | None = None,
                 dtype: torch.dtype = torch.float32, progress: bool = False):

        self.model_dir = Path(model_dir)
        self.store = store if isinstance(store, ProfileStore) else ProfileStore(store)
        self.dtype = dtype
        self.budget_bytes = budget_bytes
        self.profiles = self.store.load_all()
        if not self.profiles:
            raise MoePruneError(f"profile store {self.store.folder} holds no profile; build some with `moeprune profile build`")
        identity = (api.model_info(self.model_dir), architecture_fingerprint(self.model_dir))
        for profile in self.profiles.values():  # once here, so a cache miss only reads the kept experts
            check_profile_model(profile, self.model_dir, _identity=identity)
        self.expert_bytes = {name: self._expert_bytes(profile) for name, profile in self.profiles.items()}
        self.shared = load_shared_weights(self.model_dir, dtype, progress=progress)
        if budget_bytes is not None:
            too_big = {n: b for n, b in self.expert_bytes.items() if self.shared.nbytes + b > budget_bytes}
            if too_big:
                name, size = max(too_big.items(), key=lambda item: item[1])
                raise MoePruneError(
                    f"the memory budget ({_gib(budget_bytes)}) cannot hold profile {name!r} even alone: it needs "
                    f"{_gib(size)} of experts plus {_gib(self.shared.nbytes)} of shared weights"
                    f"{f' (as do {sorted(too_big)})' if len(too_big) > 1 else ''}; raise --memory-budget to at least "
                    f"{(self.shared.nbytes + max(too_big.values())) / 2**30:.3f} or remove the profile from the store"
                )
        self._models: OrderedDict[str, Any] = OrderedDict()

    def _expert_bytes(self, profile) -> int:
        return expert_nbytes(self.model_dir, profile.kept, self.dtype)

    @property
    def used_bytes(self) -> int:
        """Shared bytes plus the expert bytes of every cached profile."""
        return self.shared.nbytes + sum(self.expert_bytes[name] for name in self._models)

    def cached(self) -> list[str]:
        """Cached profiles, least recently used first."""
        return list(self._models)

    def models(self) -> dict[str, Any]:
        """The cached models by profile name (least recently used first), without touching the order."""
        return dict(self._models)

    def get(self, name: str):
        """The model of profile ``name``, loaded (and others evicted) if needed. Not thread-safe."""
        if name in self._models:
            self._models.move_to_end(name)
            return self._models[name]
        if name not in self.profiles:
            raise RequestError(f"unknown profile {name!r}; profiles: {', '.join(sorted(self.profiles))}")
        need = self.expert_bytes[name]
        if self.budget_bytes is not None:
            while self._models and self.used_bytes + need > self.budget_bytes:
                evicted, _ = self._models.popitem(last=False)
                logger.info("evicted profile %s (least recently used) to fit %s", evicted, name)

        profile = self.profiles[name]
        started = time.perf_counter()
        model = load_with_experts(self.model_dir, profile.kept, dtype=self.dtype, shared=self.shared,
                                  collapse_groups=profile.collapse_groups)
        logger.info("loaded profile %s (%s of experts) in %.2f s", name, _gib(need), time.perf_counter() - started)
        self._models[name] = model
        return model


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**24 else f"{n / 2**20:.2f} MiB"


# -- the service -----------------------------------------------------------------------------------


class CompletionService:
    """Match, load and generate: everything the HTTP layer calls, usable without HTTP.

    Args:
        model_dir: the checkpoint the profiles were built for (with its tokenizer).
        store: profile store folder (or a :class:`moeprune.profiles.ProfileStore`).
        budget_bytes: memory budget of the model cache (None = unlimited).
        max_tokens_limit: the largest ``max_tokens`` a request may ask for.
        fallback: profile used when a prompt is far from every other profile; default ``general``
            when the store has it, else none (always the nearest profile).
        dtype: dtype of the loaded models.
    """

    def __init__(self, model_dir: str | Path, store, *, budget_bytes: int | None = None,
                 max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT, fallback: str | None = "auto",
                 dtype: torch.dtype = torch.float32, progress: bool = False):
        if not _is_int(max_tokens_limit) or max_tokens_limit < 1:
            raise MoePruneError(f"--max-tokens-limit must be a positive integer, got {max_tokens_limit!r}")
        self.model_dir = Path(model_dir)
        self.model_name = self.model_dir.resolve().name
        self.max_tokens_limit = max_tokens_limit
        self.cache = ProfileModelCache(self.model_dir, store, budget_bytes=budget_bytes, dtype=dtype,
                                       progress=progress)
        if fallback == "auto":
            fallback = GENERAL if GENERAL in self.cache.profiles else None
        self.matcher = ProfileMatcher(self.model_dir, list(self.cache.profiles.values()), fallback=fallback,
                                      dtype=dtype).fit()  # no request waits for a classifier to train
        self.tokenizer = self.matcher.extractor.tokenizer  # the matcher encodes prompts with the same one
        self.max_positions = self.matcher.extractor.max_positions
        self.lock = threading.Lock()

    def profiles(self) -> dict:
        """``GET /v1/profiles``: every profile, its kept counts, expert bytes and whether it is loaded."""
        cached = set(self.cache.cached())
        data = [{"id": name, "object": "profile", "method": p.method, "kept_counts": {str(k): v for k, v in p.kept_counts().items()},
                 "expert_bytes": self.cache.expert_bytes[name], "loaded": name in cached}
                for name, p in sorted(self.cache.profiles.items())]
        return {"object": "list", "data": data, "fallback": self.matcher.fallback}

    def health(self) -> dict:
        """``GET /health``: status, loaded profiles (least recently used first) and memory use."""
        return {"status": "ok", "model": self.model_name, "loaded": self.cache.cached(),
                "memory": {"budget_bytes": self.cache.budget_bytes, "shared_bytes": self.cache.shared.nbytes,
                           "used_bytes": self.cache.used_bytes}}

    def complete(self, request: CompletionRequest) -> dict:
        """Answer one completions request (OpenAI shape plus ``profile``, ``confidence``, ``match``)."""
        encoded = self.tokenizer(request.prompt, return_tensors="pt")
        input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
        prompt_tokens = int(input_ids.shape[1])
        if self.max_positions and prompt_tokens + request.max_tokens > self.max_positions:
            raise RequestError(f"the prompt ({prompt_tokens} tokens) plus max_tokens ({request.max_tokens}) exceeds the "
                               f"model's {self.max_positions} positions; shorten the prompt or lower max_tokens")
        with self.lock:
            if request.profile is not None:  # an unknown name is a RequestError from self.cache.get
                name, confidence, match = request.profile, 1.0, None
            else:
                decision = self.matcher.match(request.prompt)
                name, confidence, match = decision.profile, decision.confidence, decision.to_json()
            model = self.cache.get(name)
            new_tokens = self._generate(model, input_ids, attention_mask, request)
        eos = self._eos_ids(model)
        finish = "stop" if new_tokens and new_tokens[-1] in eos else "length"
        text = self.tokenizer.decode(new_tokens, skip_special_tokens=True)
        return {
            "id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
            "model": self.model_name,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(new_tokens),
                      "total_tokens": prompt_tokens + len(new_tokens)},
            "profile": name, "confidence": confidence, "match": match,
        }

    def _eos_ids(self, model) -> set[int]:
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def _generate(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  request: CompletionRequest) -> list[int]:
        pad = self.tokenizer.pad_token_id
        options: dict[str, Any] = dict(max_new_tokens=request.max_tokens, attention_mask=attention_mask,
                                       pad_token_id=pad if pad is not None else self.tokenizer.eos_token_id)
        if request.temperature == 0:
            options.update(do_sample=False)
        else:
            options.update(do_sample=True, temperature=request.temperature, top_k=None, top_p=None)
            if request.seed is not None:
                torch.manual_seed(request.seed)
        with torch.no_grad():
            output = model.generate(input_ids, **options)
        return output[0, input_ids.shape[1]:].tolist()


# -- HTTP ------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to the server's :class:`CompletionService`; never lets an exception escape."""

    server: "CompletionServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's signature
        logger.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._send(status, {"error": {"message": message, "type": HTTPStatus(status).phrase, "code": status}}, headers)

    def _route(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        routes = {COMPLETIONS_PATH: "POST", PROFILES_PATH: "GET", HEALTH_PATH: "GET"}
        try:
            if path not in routes:
                self._drain()
                self._error(HTTPStatus.NOT_FOUND, f"no endpoint {path}; endpoints: POST {COMPLETIONS_PATH}, "
                                                  f"GET {PROFILES_PATH}, GET {HEALTH_PATH}")
            elif routes[path] != method:
                self._drain()
                self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"{path} takes {routes[path]}, not {method}",
                            {"Allow": routes[path]})
            elif path == COMPLETIONS_PATH:
                request = parse_completion_request(self._body(), self.server.service.max_tokens_limit)
                self._send(HTTPStatus.OK, self.server.service.complete(request))
            elif path == PROFILES_PATH:
                self._send(HTTPStatus.OK, self.server.service.profiles())
            else:
                self._send(HTTPStatus.OK, self.server.service.health())
        except RequestError as exc:
            self._error(exc.status, str(exc))
        except Exception as exc:  # noqa: BLE001 - one failed request must not stop the server
            logger.exception("request %s %s failed", method, path)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(exc).__name__}: {exc}")

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        try:
            size = int(length) if length is not None else 0
        except ValueError:
            raise RequestError("the Content-Length header is not a number") from None
        if size > MAX_BODY_BYTES:
            self.close_connection = True
            raise RequestError(f"the request body is larger than {MAX_BODY_BYTES} bytes", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        return self.rfile.read(size) if size > 0 else b""

    def _drain(self) -> None:
        """Read and drop a request body we will not use, so the connection stays in sync."""
        try:
            self._body()
        except RequestError:
            self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's naming
        self._route("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._route("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._route("DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self._route("PATCH")


class CompletionServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` bound to ``host:port`` (port 0 = any free port) serving ``service``.

    ``serve_forever()`` blocks; :meth:`start` runs it in a daemon thread; :meth:`stop` shuts it down
    and closes the socket. Usable as a context manager (start ... stop).
    """

    daemon_threads = True

    def __init__(self, service: CompletionService, host: str = "127.0.0.1", port: int = 8000):
        self.service = service
        try:
            super().__init__((host, port), _Handler)
        except OSError as exc:
            raise MoePruneError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port or --host") from exc
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "CompletionServer":
        self._thread = threading.Thread(target=self.serve_forever, name="moeprune-serve", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "CompletionServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def make_server(model_dir: str | Path, store, *, host: str = "127.0.0.1", port: int = 8000,
                memory_budget_gb: float | None = None, max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
                fallback: str | None = "auto", dtype: torch.dtype = torch.float32,
                progress: bool = False) -> CompletionServer:
    """Build the service (profiles validated, shared weights read, matcher ready) and bind the server.

    ``memory_budget_gb`` is in GiB (2**30 bytes); None means unlimited.
    """
    budget = None
    if memory_budget_gb is not None:
        if not math.isfinite(memory_budget_gb) or memory_budget_gb <= 0:
            raise MoePruneError(f"--memory-budget must be a positive number of GiB, got {memory_budget_gb}")
        budget = int(memory_budget_gb * 2**30)
    service = CompletionService(model_dir, store, budget_bytes=budget, max_tokens_limit=max_tokens_limit,
                                fallback=fallback, dtype=dtype, progress=progress)
    return CompletionServer(service, host, port)
