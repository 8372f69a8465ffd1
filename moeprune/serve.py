"""A small HTTP server that answers completions with the profile model that matches each prompt.

Per request (``POST /v1/completions``, the OpenAI completions request shape) the server

1. matches the prompt to a task profile with :class:`moeprune.profiles.ProfileMatcher` (from the
   prompt's own router signature at the first MoE layers: by default a classifier trained on the
   profiles' calibration windows; far from all of them -> the fallback profile), unless the request
   forces one with ``"profile"``;
2. takes that profile's model from an LRU cache, loading it on first use with the partial loader
   (:func:`moeprune.loader.load_with_experts`: only the profile's experts are read; a profile built
   with ``--action merge|dern`` through :func:`moeprune.loader.load_with_plan`, which computes its
   folded experts from their members one layer at a time, equal to its export); all cached
   models share one copy of the non-expert weights (:class:`moeprune.loader.SharedWeights`);
3. generates (greedy at temperature 0, sampling otherwise) and answers in the OpenAI completions
   shape plus ``profile`` and ``confidence``.

Memory budget: the shared non-expert bytes count once, each cached profile its router and expert
bytes (from the checkpoint headers, before loading); the least recently used profiles are evicted
until a new one fits. A profile that does not fit even alone is refused when the server starts.
The signature extractor of the matcher (embeddings and the first decoder layers) is not counted.

Endpoints: ``POST /v1/completions``, ``GET /v1/profiles``, ``GET /health``. A client's mistake gets a
4xx with ``{"error": {"message", "type", "code"}}`` saying how to fix it (every rule on the body is in
:func:`parse_completion_request`) and is logged at debug only; an internal failure answers 500, is
logged with its traceback, and the server keeps running.

Load (:class:`ServerOptions`): a fixed pool of worker threads serves the connections, a listen
backlog of 128 holds a burst instead of resetting it, completions beyond a bounded queue are answered
503 with ``Retry-After``, a client that stalls is answered 408 after the request timeout, and
``/health`` never waits for the model. Matching, loading and generation run one at a time under one
lock (CPU inference gains nothing from running two at once). docs/serving.md has the measurements.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import secrets
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import torch

from . import api
from .errors import MoePruneError
from .io.fingerprint import architecture_fingerprint
from .loader import expert_nbytes, load_shared_weights
from .profiles import (GENERAL, ProfileMatcher, ProfileStore, build_profile, check_profile_model, load_profile_plan,
                       mix_profiles)
from .tiny import save_tiny_checkpoint

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16
DEFAULT_MAX_TOKENS_LIMIT = 256
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 2.0
MAX_SEED = 2**64 - 1
MAX_BODY_BYTES = 1 << 20
COMPLETIONS_PATH = "/v1/completions"
PROFILES_PATH = "/v1/profiles"
HEALTH_PATH = "/health"


class RequestError(MoePruneError):
    """A request the server refuses, with the HTTP status to answer and any extra response headers."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = int(status)
        self.headers = dict(headers or {})


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


def _finite_number(value: object) -> float | None:
    """``value`` as a float when it is a JSON number (not a boolean) with a finite float value, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond the float range
        return None
    return number if math.isfinite(number) else None


def _text(value: str) -> bool:
    """Whether ``value`` can be encoded as UTF-8 (JSON escapes can produce lone surrogates such as \\ud800)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


MAX_INTEGER_DIGITS = 40  # 2**64 has 20


def _parse_int(text: str) -> int:
    """A JSON integer, refused beyond :data:`MAX_INTEGER_DIGITS` digits (no field needs more, and
    converting a huge one costs time quadratic in its length)."""
    if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise RequestError(f"the request body holds an integer of {len(text.lstrip('-'))} digits; no field takes more "
                           f"than {MAX_INTEGER_DIGITS}: send the numbers the fields expect")
    return int(text)


def _reject_constant(name: str):
    raise RequestError(f"the request body contains {name}, which is not JSON; send numbers as finite decimals")


EXAMPLE_BODY = '{"prompt": "Q: 1+1=? A:", "max_tokens": 8}'
KNOWN_FIELDS = frozenset({"prompt", "max_tokens", "temperature", "seed", "profile", "stream", "n"})


def parse_completion_request(body: bytes, max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT) -> CompletionRequest:
    """Validate a request body; every rule for a client's input is here.

    The body is a JSON object (UTF-8, no ``NaN``/``Infinity``) with

    - ``prompt``: a non-empty, non-blank string (or a list holding exactly one), valid Unicode (no
      lone surrogates);
    - ``max_tokens``: an integer in [1, ``max_tokens_limit``] (default 16, or the limit if smaller);
    - ``temperature``: 0 (greedy) or a number in [:data:`MIN_TEMPERATURE`, :data:`MAX_TEMPERATURE`]
      (default 1). Temperatures between 0 and the minimum are refused: dividing the logits by them
      overflows and sampling fails; use 0 for greedy decoding;
    - ``seed``: an integer in [0, 2**64 - 1] (the range of ``torch.manual_seed``), used when sampling;
    - ``profile``: the name of a profile to use instead of matching (checked against the store by
      :meth:`CompletionService.check`);
    - ``stream``: absent or false; ``n``: absent or 1.

    ``null`` means absent for every field. Other fields (``top_p``, ``stop``, ``user``, ...) are
    ignored, as documented in docs/serving.md. Raises :class:`RequestError` (400) saying what to fix.
    """
    if not body.strip():
        raise RequestError(f"the request has no body; send a JSON object such as {EXAMPLE_BODY}")
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_reject_constant, parse_int=_parse_int)
    except UnicodeDecodeError as exc:
        raise RequestError(f"the request body is not UTF-8 ({exc.reason} at byte {exc.start}); send UTF-8 JSON") from None
    except RecursionError:
        raise RequestError("the request body nests too deeply; send a flat JSON object such as " + EXAMPLE_BODY) from None
    except ValueError as exc:  # JSONDecodeError
        raise RequestError(f"the request body is not valid JSON ({exc}); send a JSON object such as {EXAMPLE_BODY}") from None
    if not isinstance(data, dict):
        raise RequestError(f"the request body must be a JSON object, not {type(data).__name__}; for example {EXAMPLE_BODY}")
    ignored = sorted(str(key) for key in data if key not in KNOWN_FIELDS)
    if ignored:
        logger.debug("ignoring request fields %s", ignored)
    fields = {key: value for key, value in data.items() if value is not None}
    prompt = fields.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise RequestError(f'"prompt" must be one string (or a list holding one); got a list of {len(prompt)}: '
                               "send one prompt per request")
        prompt = prompt[0]
    if prompt is None:
        raise RequestError('the request has no "prompt"; give the text to complete')
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError(f'"prompt" must be a non-empty string (or a list holding one), got {_short(prompt)}')
    if not _text(prompt):
        raise RequestError('"prompt" contains a lone surrogate (such as \\ud800), which is not text; '
                           "send valid Unicode (a surrogate pair or the character itself)")
    max_tokens = fields.get("max_tokens", min(DEFAULT_MAX_TOKENS, max_tokens_limit))
    if not _is_int(max_tokens) or not 1 <= max_tokens <= max_tokens_limit:
        raise RequestError(f'"max_tokens" must be an integer from 1 to {max_tokens_limit}, got {_short(max_tokens)}')
    temperature = _finite_number(fields.get("temperature", 1.0))
    if temperature is None or not (temperature == 0 or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):
        raise RequestError(f'"temperature" must be 0 (greedy) or a number from {MIN_TEMPERATURE:g} to {MAX_TEMPERATURE:g}, '
                           f"got {_short(fields.get('temperature'))}")
    seed = fields.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed <= MAX_SEED):
        raise RequestError(f'"seed" must be an integer from 0 to 2**64-1, got {_short(seed)}')
    profile = fields.get("profile")
    if profile is not None and (not isinstance(profile, str) or not profile.strip() or not _text(profile)):
        raise RequestError(f'"profile" must be the name of a profile (see GET {PROFILES_PATH}), got {_short(profile)}')
    stream = fields.get("stream", False)
    if stream is not False:
        raise RequestError('"stream" is not supported; leave it out or set it to false')
    n = fields.get("n", 1)
    if not _is_int(n) or n != 1:
        raise RequestError(f'"n" must be 1 (one completion per request), got {_short(n)}')
    return CompletionRequest(prompt, int(max_tokens), float(temperature), seed, profile)


def _short(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, ASCII only (a hostile value must not flood an error)."""
    if _is_int(value) and value.bit_length() > 200:
        return f"an integer of {value.bit_length()} bits"
    text = ascii(value)
    return text if len(text) <= limit else text[:limit] + "..."


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
        self._state = threading.Lock()  # guards _models only, so /health never waits for a load or a generation

    def _expert_bytes(self, profile) -> int:
        exact = profile.action == "merge" and profile.action_options.get("router") == "exact"  # all E router rows
        return expert_nbytes(self.model_dir, profile.kept, self.dtype, full_router=exact)

    @property
    def used_bytes(self) -> int:
        """Shared bytes plus the expert bytes of every cached profile."""
        with self._state:
            return self._used_bytes()

    def _used_bytes(self) -> int:
        return self.shared.nbytes + sum(self.expert_bytes[name] for name in self._models)

    def cached(self) -> list[str]:
        """Cached profiles, least recently used first."""
        with self._state:
            return list(self._models)

    def models(self) -> dict[str, Any]:
        """The cached models by profile name (least recently used first), without touching the order."""
        with self._state:
            return dict(self._models)

    def check(self, name: str) -> None:
        """Raise :class:`RequestError` (400, listing the profiles) unless the store has profile ``name``."""
        if name not in self.profiles:
            raise RequestError(f"unknown profile {_short(name)}; profiles: {', '.join(sorted(self.profiles))} "
                               f"(leave \"profile\" out to match the prompt)")

    def get(self, name: str):
        """The model of profile ``name``, loaded (and others evicted) if needed. Calls must not overlap
        (the service holds its lock); the reads of :meth:`cached`, :meth:`models` and :attr:`used_bytes`
        may run alongside."""
        with self._state:
            if name in self._models:
                self._models.move_to_end(name)
                return self._models[name]
        self.check(name)
        need = self.expert_bytes[name]
        if self.budget_bytes is not None:
            with self._state:
                while self._models and self._used_bytes() + need > self.budget_bytes:
                    evicted, _ = self._models.popitem(last=False)
                    logger.info("evicted profile %s (least recently used) to fit %s", evicted, name)

        profile = self.profiles[name]
        started = time.perf_counter()
        # a drop profile reads its kept experts only; a merge/dern profile computes its folded experts from
        # the members they name, one layer at a time (the same tensors as its export)
        model = load_profile_plan(self.model_dir, profile, dtype=self.dtype, shared=self.shared)
        logger.info("loaded profile %s (%s of experts) in %.2f s", name, _gib(need), time.perf_counter() - started)
        with self._state:
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

    def check(self, request: CompletionRequest) -> None:
        """Refuse (:class:`RequestError`) what the request parser cannot know: a profile not in the store."""
        if request.profile is not None:
            self.cache.check(request.profile)

    def complete(self, request: CompletionRequest) -> dict:
        """Answer one completions request (OpenAI shape plus ``profile``, ``confidence``, ``match``).

        Everything that touches the tokenizer runs under the lock: a fast tokenizer shared between
        threads fails ("Already borrowed") when two calls overlap.
        """
        self.check(request)
        with self.lock:
            encoded = self.tokenizer(request.prompt, return_tensors="pt")
            input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
            prompt_tokens = int(input_ids.shape[1])
            if prompt_tokens == 0:
                raise RequestError(f"the prompt {_short(request.prompt)} encodes to no tokens; send text the model can read")
            if self.max_positions and prompt_tokens + request.max_tokens > self.max_positions:
                raise RequestError(f"the prompt ({prompt_tokens} tokens) plus max_tokens ({request.max_tokens}) exceeds the "
                                   f"model's {self.max_positions} positions; shorten the prompt or lower max_tokens")
            if request.profile is not None:  # an unknown name is a RequestError from self.cache.get
                name, confidence, match = request.profile, 1.0, None
            else:
                decision = self.matcher.match(request.prompt)
                name, confidence, match = decision.profile, decision.confidence, decision.to_json()
            model = self.cache.get(name)
            new_tokens = self._generate(model, input_ids, attention_mask, request)
            text = self.tokenizer.decode(new_tokens, skip_special_tokens=True)
        eos = self._eos_ids(model)
        finish = "stop" if new_tokens and new_tokens[-1] in eos else "length"
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


# -- server options and admission --------------------------------------------------------------------


DEFAULT_WORKERS = 16
DEFAULT_QUEUE_SIZE = 8
DEFAULT_REQUEST_TIMEOUT = 30.0
DEFAULT_BACKLOG = 128
KEEPALIVE_IDLE_S = 5.0  # the longest a kept-alive connection may sit idle holding a worker
LINGER_S = 1.0  # after refusing a request whose body we did not read, drain the socket this long before closing
LINGER_BYTES = 1 << 20


def check_port(port: object) -> int:
    """``port`` as an int when it is an integer in [0, 65535] (0 = any free port); else :class:`MoePruneError`."""
    if not _is_int(port) or not 0 <= port <= 65535:
        raise MoePruneError(f"--port must be an integer from 0 to 65535 (0 = any free port), got {port!r}")
    return int(port)


@dataclass(frozen=True)
class ServerOptions:
    """How much work the server takes on at once.

    Attributes:
        workers: threads that read requests and write answers (each connection holds one while it is served).
        queue_size: completions admitted at once (the one generating plus those waiting for the model);
            more are answered 503 with ``Retry-After``. Must be below ``workers``, so that at least one
            worker is always free for ``/health``, ``/v1/profiles`` and refusals.
        request_timeout: seconds a read from a client may wait (request line, headers, each part of
            the body) and the longest the whole body may take; a stalled client gets 408 and its
            worker is freed.
        backlog: connections the kernel holds while every worker is busy (the listen backlog; the
            stdlib's default is 5, which resets connections under a burst).
    """

    workers: int = DEFAULT_WORKERS
    queue_size: int = DEFAULT_QUEUE_SIZE
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    backlog: int = DEFAULT_BACKLOG

    def __post_init__(self) -> None:
        if not _is_int(self.workers) or self.workers < 2:
            raise MoePruneError(f"--workers must be an integer of at least 2, got {self.workers!r}")
        if not _is_int(self.queue_size) or not 1 <= self.queue_size < self.workers:
            raise MoePruneError(f"--queue-size must be an integer from 1 to --workers - 1 ({self.workers - 1}), "
                                f"got {self.queue_size!r}; raise --workers for a longer queue")
        timeout = _finite_number(self.request_timeout)
        if timeout is None or timeout <= 0:
            raise MoePruneError(f"--request-timeout must be a positive number of seconds, got {self.request_timeout!r}")
        if not _is_int(self.backlog) or not 1 <= self.backlog <= 65535:
            raise MoePruneError(f"--backlog must be an integer from 1 to 65535, got {self.backlog!r}")


class Admission:
    """At most ``capacity`` completions at once; the rest are refused with 503 and a ``Retry-After``.

    ``Retry-After`` is the mean time a completion spent admitted (waiting plus generating), an
    exponential moving average with weight 0.2 for the newest, rounded up to whole seconds (at least 1).
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.active = 0
        self.admitted = 0
        self.rejected = 0
        self.mean_seconds = 1.0
        self._lock = threading.Lock()

    def retry_after(self) -> int:
        return max(1, math.ceil(self.mean_seconds))

    def enter(self) -> None:
        """Take a slot, or raise :class:`RequestError` (503, ``Retry-After``) when all are taken."""
        with self._lock:
            if self.active >= self.capacity:
                self.rejected += 1
                wait = self.retry_after()
                raise RequestError(f"the server is busy ({self.active} completions in progress, at most {self.capacity}); "
                                   f"retry after {wait} s", HTTPStatus.SERVICE_UNAVAILABLE, {"Retry-After": str(wait)})
            self.active += 1
            self.admitted += 1

    def leave(self, seconds: float) -> None:
        with self._lock:
            self.active -= 1
            self.mean_seconds = 0.8 * self.mean_seconds + 0.2 * seconds

    def to_json(self) -> dict:
        with self._lock:
            return {"active": self.active, "capacity": self.capacity, "admitted": self.admitted, "rejected": self.rejected}


# -- HTTP ------------------------------------------------------------------------------------------


def error_payload(status: int, message: str) -> dict:
    """The JSON of every error answer: ``{"error": {"message", "type", "code"}}``."""
    return {"error": {"message": message, "type": HTTPStatus(status).phrase, "code": int(status)}}


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to the server's :class:`CompletionService`; never lets an exception escape.

    Client mistakes are answered 4xx and logged at debug; only a failure of the server itself is
    answered 500 and logged with its traceback.
    """

    server: "CompletionServer"
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        self.timeout = self.server.options.request_timeout  # StreamRequestHandler.setup applies it to the socket
        self._linger = False
        super().setup()

    def handle(self) -> None:
        """Serve requests on this connection; between two requests it may sit idle at most
        :data:`KEEPALIVE_IDLE_S` (or the request timeout if shorter)."""
        self.close_connection = True
        self.handle_one_request()
        while not self.close_connection:
            self.connection.settimeout(min(KEEPALIVE_IDLE_S, self.server.options.request_timeout))
            self.handle_one_request()

    def parse_request(self) -> bool:
        self.connection.settimeout(self.server.options.request_timeout)  # the request line arrived: full timeout again
        return super().parse_request()

    def finish(self) -> None:
        super().finish()
        if self._linger:
            _linger(self.connection)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's signature
        logger.debug("%s %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's refusals (malformed request line, headers too long, unknown method) in our JSON shape."""
        self._abort()
        if self.request_version == "HTTP/0.9":  # the stdlib's guess for an unparsable line: answers would lack a status line
            self.request_version = "HTTP/1.0"
        text = message or HTTPStatus(code).phrase
        self._send(code, error_payload(code, f"{text}{f'; {explain}' if explain else ''}; send an HTTP/1.1 request such "
                                             f"as POST {COMPLETIONS_PATH} with a JSON body"))

    def _abort(self) -> None:
        """Close after the answer, draining what the client still sends (so it reads our answer, not a reset)."""
        self.close_connection = True
        self._linger = True

    def _send(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection or self.server.crowded():  # free this worker for a waiting connection
            self.send_header("Connection", "close")  # (also sets close_connection)
        self.end_headers()
        if self.command != "HEAD":  # a HEAD answer has headers only
            self.wfile.write(body)

    def _route(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        try:
            status, payload, headers = self._dispatch(method, path)
        except RequestError as exc:
            logger.debug("refused %s %s: %d %s", method, path, exc.status, exc)
            status, payload, headers = exc.status, error_payload(exc.status, str(exc)), exc.headers
        except Exception as exc:  # noqa: BLE001 - one failed request must not stop the server
            logger.exception("request %s %s failed", method, path)
            status = HTTPStatus.INTERNAL_SERVER_ERROR
            payload, headers = error_payload(status, f"internal error: {type(exc).__name__}: {exc}"), {}
        try:
            self._send(status, payload, headers)
        except OSError as exc:  # the client went away before reading its answer
            logger.debug("could not answer %s %s: %s", method, path, exc)
            self.close_connection = True

    def _dispatch(self, method: str, path: str) -> tuple[int, dict, dict[str, str]]:
        routes = {COMPLETIONS_PATH: "POST", PROFILES_PATH: "GET", HEALTH_PATH: "GET"}
        if path not in routes:
            self._drain()
            raise RequestError(f"no endpoint {_short(path)}; endpoints: POST {COMPLETIONS_PATH}, GET {PROFILES_PATH}, "
                               f"GET {HEALTH_PATH}", HTTPStatus.NOT_FOUND)
        if routes[path] != method:
            self._drain()
            raise RequestError(f"{path} takes {routes[path]}, not {method}", HTTPStatus.METHOD_NOT_ALLOWED,
                               {"Allow": routes[path]})
        service = self.server.service
        if path != COMPLETIONS_PATH:
            self._drain()  # a GET with a body: keep the connection in sync
        if path == PROFILES_PATH:
            return HTTPStatus.OK, service.profiles(), {}
        if path == HEALTH_PATH:
            return HTTPStatus.OK, {**service.health(), "load": self.server.admission.to_json()}, {}
        request = parse_completion_request(self._body(), service.max_tokens_limit)
        service.check(request)  # a client mistake is a 400 even when the server is busy
        admission = self.server.admission
        admission.enter()
        started = time.monotonic()
        try:
            return HTTPStatus.OK, service.complete(request), {}
        finally:
            admission.leave(time.monotonic() - started)

    def _body(self) -> bytes:
        """The request body, read within the request timeout; refusals close the connection (it is out of sync)."""
        if self.headers.get("Transfer-Encoding") is not None:
            self._abort()
            raise RequestError("chunked request bodies are not supported; send the body with a Content-Length header",
                               HTTPStatus.LENGTH_REQUIRED)
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            return b""
        text = lengths[0].strip()
        if len(lengths) > 1 or not text.isdigit() or not text.isascii():
            self._abort()
            raise RequestError(f"the Content-Length header must be one non-negative integer, got {_short(', '.join(lengths))}")
        size = int(text)
        if size > MAX_BODY_BYTES:
            self._abort()
            raise RequestError(f"the request body ({size} bytes) is larger than {MAX_BODY_BYTES} bytes; send a shorter prompt",
                               HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        return self._read_exactly(size)

    def _read_exactly(self, size: int) -> bytes:
        timeout = self.server.options.request_timeout
        deadline = time.monotonic() + timeout
        chunks: list[bytes] = []
        got = 0
        while got < size:
            try:
                chunk = self.rfile.read1(min(size - got, 1 << 16)) if time.monotonic() < deadline else None
            except TimeoutError:
                chunk = None
            if chunk is None:
                self._abort()
                raise RequestError(f"the request body did not arrive within {timeout:g} s ({got} of the {size} bytes "
                                   "the Content-Length header announced); send the whole body at once, with a "
                                   "Content-Length that matches it", HTTPStatus.REQUEST_TIMEOUT)
            if not chunk:
                self.close_connection = True
                raise RequestError(f"the request body ended after {got} of the {size} bytes the Content-Length header "
                                   "announced; send a Content-Length that matches the body")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

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

    def do_HEAD(self) -> None:  # noqa: N802
        self._route("HEAD")


def _linger(connection: socket.socket) -> None:
    """Half-close and read what the client still sends (at most :data:`LINGER_BYTES` for
    :data:`LINGER_S`): closing a socket with unread input makes the kernel send a reset, which can
    destroy the answer before the client reads it."""
    try:
        connection.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER_S
        drained = 0
        while drained < LINGER_BYTES and (left := deadline - time.monotonic()) > 0:
            connection.settimeout(left)
            data = connection.recv(1 << 16)
            if not data:
                break
            drained += len(data)
    except OSError:  # the client closed or reset first: nothing left to protect
        pass


class CompletionServer(HTTPServer):
    """HTTP server bound to ``host:port`` (port 0 = any free port) serving ``service`` with a fixed
    pool of ``options.workers`` threads.

    The accepting thread hands each connection to the pool through a queue of at most
    ``options.backlog`` connections; beyond that it stops accepting, and the kernel holds new
    connections in the listen backlog (``options.backlog``), so a burst waits instead of being reset.
    Completions beyond ``options.queue_size`` are answered 503 with ``Retry-After``
    (:class:`Admission`); ``/health`` never waits for the model.

    ``serve_forever()`` blocks; :meth:`start` runs it in a daemon thread; :meth:`stop` shuts it down
    and closes the socket. Usable as a context manager (start ... stop).
    """

    def __init__(self, service: CompletionService, host: str = "127.0.0.1", port: int = 8000,
                 options: ServerOptions | None = None):
        self.service = service
        self.options = options if options is not None else ServerOptions()
        self.request_queue_size = self.options.backlog  # read by server_activate (listen)
        self.admission = Admission(self.options.queue_size)
        self._connections: queue.Queue = queue.Queue(maxsize=self.options.backlog)
        self._closing = threading.Event()
        try:
            super().__init__((host, check_port(port)), _Handler)
        except (OSError, OverflowError) as exc:
            raise MoePruneError(f"cannot listen on {host}:{port} ({getattr(exc, 'strerror', None) or exc}); "
                                "choose another --port or --host") from exc
        self._workers = [threading.Thread(target=self._work, name=f"moeprune-serve-{i}", daemon=True)
                         for i in range(self.options.workers)]
        for worker in self._workers:
            worker.start()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def crowded(self) -> bool:
        """Whether accepted connections wait for a worker (then answers close their connection)."""
        return not self._connections.empty()

    def process_request(self, request, client_address) -> None:
        """Hand the connection to the pool (called by the accepting thread)."""
        while not self._closing.is_set():
            try:
                self._connections.put((request, client_address), timeout=0.25)
                return
            except queue.Full:
                continue
        self.shutdown_request(request)

    def _work(self) -> None:
        while not self._closing.is_set():
            try:
                request, client_address = self._connections.get(timeout=0.25)
            except queue.Empty:
                continue
            try:
                self.finish_request(request, client_address)
            except Exception:  # noqa: BLE001 - a broken connection must not end the worker
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        """A connection failed outside a request (the client reset it, ...): log at debug, no traceback on stderr."""
        logger.debug("connection from %s failed", client_address, exc_info=True)

    def server_close(self) -> None:
        """Close the socket, let the workers finish what they serve, and drop connections still queued."""
        self._closing.set()
        super().server_close()
        deadline = time.monotonic() + self.options.request_timeout
        for worker in self._workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
        while True:
            try:
                request, _ = self._connections.get_nowait()
            except queue.Empty:
                break
            self.shutdown_request(request)

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


def tiny_profile_store(folder: str | Path) -> tuple[Path, Path]:
    """A tiny random Mixtral checkpoint (:func:`moeprune.tiny.save_tiny_checkpoint`) in ``folder/model``
    and a profile store in ``folder/store`` with profiles ``code`` and ``prose`` (ratio 0.5, built on
    generated text) and ``general`` (their mix): what the server's tests and scripts/soak_serve.py
    serve. Returns (checkpoint folder, store folder)."""
    folder = Path(folder)
    texts = {
        "code": "\n\n".join(f"def f{i}(x):\n    return x * {i} + {i * i}\n\nfor k in range({i}):\n    print(f{i}(k))"
                             for i in range(40)),
        "prose": "\n\n".join(f"The quiet river ran past the old mill number {i}, and the children watched the boats "
                              "drift slowly toward the sea." for i in range(40)),
    }
    checkpoint = save_tiny_checkpoint("mixtral", folder / "model")
    store = ProfileStore(folder / "store")
    built = []
    for task, text in texts.items():
        (folder / f"{task}.txt").write_text(text)
        profile = build_profile(checkpoint, task, folder / f"{task}.txt", ratio=0.5, samples=4, seq_len=32, mode="whole",
                                window_lengths=(16,), signature_layers=1, progress=False)
        store.save(profile)
        built.append(profile)
    store.save(mix_profiles(built, name="general"))
    return checkpoint, store.folder


def make_server(model_dir: str | Path, store, *, host: str = "127.0.0.1", port: int = 8000,
                memory_budget_gb: float | None = None, max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
                fallback: str | None = "auto", dtype: torch.dtype = torch.float32, progress: bool = False,
                options: ServerOptions | None = None) -> CompletionServer:
    """Build the service (profiles validated, shared weights read, matcher ready) and bind the server.

    ``memory_budget_gb`` is in GiB (2**30 bytes); None means unlimited. ``options`` (workers, queue
    size, request timeout, backlog) default to :class:`ServerOptions`'s defaults. The port and the
    options are checked before the model is read.
    """
    check_port(port)
    options = options if options is not None else ServerOptions()
    budget = None
    if memory_budget_gb is not None:
        if _finite_number(memory_budget_gb) is None or memory_budget_gb <= 0:
            raise MoePruneError(f"--memory-budget must be a positive number of GiB, got {memory_budget_gb}")
        budget = int(memory_budget_gb * 2**30)
    service = CompletionService(model_dir, store, budget_bytes=budget, max_tokens_limit=max_tokens_limit,
                                fallback=fallback, dtype=dtype, progress=progress)
    return CompletionServer(service, host, port, options)
