"""`moeprune serve MODEL --store DIR`: the profile-routing completions server (moeprune.serve)."""

from __future__ import annotations


def register(subparsers) -> None:
    """Add the ``serve`` subcommand (heavy imports happen in the handler)."""
    p = subparsers.add_parser(
        "serve",
        help="HTTP completions server: each prompt is answered by the profile model that matches it",
        description="POST /v1/completions (OpenAI completions shape: prompt, max_tokens, temperature, seed, "
                    "optional profile), GET /v1/profiles, GET /health. Profile models are loaded on first use with "
                    "only their experts, kept in an LRU cache within --memory-budget, sharing non-expert weights.",
    )
    p.add_argument("model", help="local checkpoint folder the profiles were built for")
    p.add_argument("--store", required=True, help="profile store folder (from `moeprune profile build`)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--memory-budget", type=float, metavar="GB",
                   help="GiB for cached profile models: shared weights once + each profile's experts (default: no limit)")
    p.add_argument("--max-tokens-limit", type=int, default=256, metavar="N",
                   help="largest max_tokens a request may ask for (default 256)")
    fallback = p.add_mutually_exclusive_group()
    fallback.add_argument("--fallback", default="auto", metavar="NAME",
                          help="profile for prompts far from every profile (default: 'general' if the store has it)")
    fallback.add_argument("--no-fallback", dest="fallback", action="store_const", const=None,
                          help="always use the nearest profile")
    p.set_defaults(handler=run_serve)


def run_serve(args) -> int:
    """Start the server and block until interrupted (Ctrl-C); returns the exit status."""
    from moeprune.serve import make_server

    server = make_server(args.model, args.store, host=args.host, port=args.port, memory_budget_gb=args.memory_budget,
                         max_tokens_limit=args.max_tokens_limit, fallback=args.fallback, progress=not args.quiet)
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
