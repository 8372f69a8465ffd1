"""`moeprune serve MODEL --store DIR`: the profile-routing completions server (moeprune.serve)."""

from __future__ import annotations

# the defaults of moeprune.serve.ServerOptions, repeated here so that `--help` needs no torch import
# (tests/test_serve.py checks they agree)
DEFAULT_WORKERS = 16
DEFAULT_QUEUE_SIZE = 8
DEFAULT_REQUEST_TIMEOUT = 30.0
DEFAULT_BACKLOG = 128


def register(subparsers) -> None:
    """Add the ``serve`` subcommand (heavy imports happen in the handler)."""
    p = subparsers.add_parser(
        "serve",
        help="HTTP completions server: each prompt is answered by the profile model that matches it",
        description="POST /v1/completions (OpenAI completions shape: prompt, max_tokens, temperature, seed, "
                    "optional profile), GET /v1/profiles, GET /health. Profile models are loaded on first use with "
                    "only their experts, kept in an LRU cache within --memory-budget, sharing non-expert weights. "
                    "Completions beyond --queue-size are answered 503 with Retry-After; see docs/serving.md.",
    )
    p.add_argument("model", help="local checkpoint folder the profiles were built for")
    p.add_argument("--store", required=True, help="profile store folder (from `moeprune profile build`)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port from 0 to 65535 (default 8000; 0 = any free port)")
    p.add_argument("--memory-budget", type=float, metavar="GB",
                   help="GiB for cached profile models: shared weights once + each profile's experts (default: no limit)")
    p.add_argument("--max-tokens-limit", type=int, default=256, metavar="N",
                   help="largest max_tokens a request may ask for (default 256)")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS, metavar="N",
                   help=f"threads serving connections (default {DEFAULT_WORKERS})")
    p.add_argument("--queue-size", type=int, default=DEFAULT_QUEUE_SIZE, metavar="N",
                   help="completions admitted at once, generating or waiting for the model; more are answered 503 "
                        f"with Retry-After (default {DEFAULT_QUEUE_SIZE}; below --workers)")
    p.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT, metavar="SECONDS",
                   help="a client that stalls this long while sending its request is answered 408 and its worker "
                        f"freed (default {DEFAULT_REQUEST_TIMEOUT:g})")
    p.add_argument("--backlog", type=int, default=DEFAULT_BACKLOG, metavar="N",
                   help=f"connections the kernel holds while every worker is busy (default {DEFAULT_BACKLOG})")
    fallback = p.add_mutually_exclusive_group()
    fallback.add_argument("--fallback", default="auto", metavar="NAME",
                          help="profile for prompts far from every profile (default: 'general' if the store has it)")
    fallback.add_argument("--no-fallback", dest="fallback", action="store_const", const=None,
                          help="always use the nearest profile")
    p.set_defaults(handler=run_serve)


def run_serve(args) -> int:
    """Start the server and block until interrupted (Ctrl-C); returns the exit status.

    The port and the load options are checked before the model is read.
    """
    from moeprune.serve import ServerOptions, make_server

    options = ServerOptions(workers=args.workers, queue_size=args.queue_size, request_timeout=args.request_timeout,
                            backlog=args.backlog)
    server = make_server(args.model, args.store, host=args.host, port=args.port, memory_budget_gb=args.memory_budget,
                         max_tokens_limit=args.max_tokens_limit, fallback=args.fallback, progress=not args.quiet,
                         options=options)
    profiles = ", ".join(sorted(server.service.cache.profiles))
    print(f"moeprune serve: listening on {server.url} (profiles: {profiles}); POST {server.url}/v1/completions",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
