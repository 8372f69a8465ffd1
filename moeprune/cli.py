"""The ``moeprune`` command line: a thin layer over :mod:`moeprune.api` (the library raises, only
the CLI exits)."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
import traceback

from . import __version__
from .errors import Interrupted, MoePruneError

logger = logging.getLogger("moeprune")

# Subcommands that live beside the code they drive: each module has ``register(subparsers)``, which
# adds its parser(s) with ``set_defaults(handler=fn)``; ``fn(args) -> int`` runs the command.
# Registration must stay cheap (no heavy imports at module level).
COMMAND_MODULES = ("moeprune.commands.eval", "moeprune.commands.profile", "moeprune.commands.serve",
                   "moeprune.commands.stats")


def at_least(minimum: int):
    """An argparse ``type``: an integer >= ``minimum`` (out of range is an argument error, exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def fraction(*, below_one: bool):
    """An argparse ``type``: a number in [0, 1) (``below_one``) or [0, 1]."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (0.0 <= value < 1.0 if below_one else 0.0 <= value <= 1.0):
            raise argparse.ArgumentTypeError(f"must be in [0, 1{')' if below_one else ']'}, got {text}")
        return value

    parse.__name__ = "fraction"
    return parse


def add_tokenizer_option(parser) -> None:
    """``--tokenizer DIR``: for a checkpoint folder without tokenizer files."""
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="folder with the model's tokenizer files (default: the model folder)")


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """The calibration-data options shared by every command that collects statistics."""
    group = parser.add_argument_group("calibration data")
    group.add_argument("--samples", type=at_least(1),
                       help="packed sequences to use (default 64; a pre-tokenized .safetensors file: all its rows)")
    group.add_argument("--seq-len", type=at_least(2),
                       help="tokens per sequence (default 512, or the model's max_position_embeddings when smaller; "
                            "longer than that is an error; a pre-tokenized .safetensors file: its row length)")
    group.add_argument("--seed", type=at_least(0), default=0, help="seed for choosing sequences (default 0)")
    group.add_argument("--text-field", default="text", help="text field of .jsonl/.parquet rows (default text)")
    group.add_argument("--chat-template", action="store_true", help="wrap each document in the tokenizer's chat template")
    group.add_argument("--batch-size", type=at_least(1), default=4, help="sequences per forward (default 4)")
    group.add_argument("--mode", choices=("sequential", "whole"), default="sequential",
                       help="sequential: one decoder layer resident (default); whole: load the full model")
    add_device_options(group, where="where each decoder layer runs",
                       dtype_note="; statistics always accumulate in float64")
    add_tokenizer_option(group)


def add_device_options(parser, *, where: str, dtype_note: str = "") -> None:
    """``--device`` and ``--dtype`` (names as :mod:`moeprune.calibration.device` reads them; no torch
    import here)."""
    parser.add_argument("--device", help=f"cpu (default), cuda or cuda:N: {where}")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help=f"compute dtype (default: float32 on cpu, the checkpoint's dtype on a GPU){dtype_note}")


def common_options() -> argparse.ArgumentParser:
    """-q/-v/--threads, accepted after a (sub-)subcommand too (the top-level parser holds the defaults)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="only errors; no progress bars")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    common.add_argument("--threads", type=at_least(1), default=argparse.SUPPRESS,
                        help="torch CPU threads (default: torch's choice; 1 is faster on a busy machine)")
    return common


#: Options of individual methods (``Method.options`` in :mod:`moeprune.methods`): ``--flag`` ->
#: (argparse keyword arguments). Each is passed to the method as ``options[dest]`` when given; a flag
#: the chosen method does not take is refused by :meth:`moeprune.methods.Method.method_options`.
METHOD_OPTION_FLAGS: dict[str, dict] = {}
METHOD_OPTION_FLAGS.update({  # merging methods (hc_smoe, m_smoe, ream): docs/methods.md
    "--router": dict(choices=["vanilla", "exact"], help="router after a merge: vanilla (one row per merged expert, a "
                     "stock checkpoint) or exact (every original logit mapped to its merged expert; moeprune.load)"),
    "--router-rows": dict(choices=["dominant", "mean"], help="vanilla router rows: the dominant member's or the "
                          "merge-weighted mean (default dominant)"),
    "--linkage": dict(choices=["average", "single", "complete", "ward"], help="hc_smoe linkage (default average)"),
    "--budget": dict(choices=["per_layer", "global"], help="m_smoe: the same count per layer or one global ranking "
                     "(default global)"),
    "--group-size": dict(type=int, help="ream: at most this many experts per merged group (default 16)"),
    "--dominant": dict(choices=["center", "frequency"], help="hc_smoe: each cluster's dominant member (alignment "
                       "target, vanilla router row): nearest the cluster's mean feature (default) or most frequent"),
    "--assign": dict(choices=["greedy", "nearest"], help="ream: the most salient centroids first take their nearest "
                     "experts (greedy, the reference) or every pair nearest first (default greedy)"),
    "--merge-weights": dict(choices=["saliency", "frequency"], help="ream: merge weights (default saliency: REAP)"),
    "--outputs": dict(choices=["gated", "plain"], help="ream: output feature, router-gated mean outputs (default) or plain"),
    "--align": dict(choices=["on", "off"], help="match neurons to the dominant expert before merging (default "
                    "on; off reproduces HC-SMoE's unaligned merge)"),
})

# dense structured pruning (moeprune.plan.dense)
METHOD_OPTION_FLAGS.update({
    "--unit": dict(choices=["heads", "mlp", "shared", "layers"],
                   help="dense pruning unit (magnitude, wanda_sp, flap, dense_random): attention KV groups, dense-MLP "
                        "or shared-expert channels, or layers (dense_random); --ratio is the fraction of its parameters"),
    "--layers": dict(type=int, help="consecutive decoder layers to drop (angular, replaceme, dense_random --unit layers)"),
    "--widths": dict(choices=["uniform", "global"],
                     help="uniform: the same number of units per layer (vanilla config); global: one threshold over "
                          "per-layer standardised scores (non-uniform widths; flap's default)"),
})


def yes_no(text: str) -> bool:
    """``yes``/``no`` (also true/false, 1/0) as a bool, for on/off method options."""
    value = text.strip().lower()
    if value not in ("yes", "no", "true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected yes or no, got {text!r}")
    return value in ("yes", "true", "1")


METHOD_OPTION_FLAGS.update({  # STUN and DERN (moeprune.plan.stun, moeprune.plan.dern)
    "--distance": dict(choices=["router", "coactivation", "both"],
                       help="stun: expert distance (router rows, co-activation, or their mean; default router)"),
    "--normalize": dict(type=yes_no, metavar="yes|no", help="stun: unit-norm router rows first (default no: the paper's raw rows)"),
    "--tau": dict(type=float, help="dern: cosine a dropped neuron segment must exceed to migrate (default 0.6)"),
    "--gate-in-similarity": dict(type=yes_no, metavar="yes|no",
                                 help="dern: include the gate row in the migration cosine (default yes)"),
    "--kmeans-iterations": dict(type=int, help="dern: k-means steps per recombined expert (default 10)"),
    "--kmeans-init": dict(choices=["magnitude", "own"],
                          help="dern: initial centroids: largest max|gate row| segments, or the expert's own"),
})

METHOD_OPTION_FLAGS.update({  # neuron slicing (moeprune.plan.neurons)
    "--layout": dict(choices=["uniform", "compact"],
                     help="neuron methods: every expert keeps the same width (uniform, a vanilla checkpoint; default) "
                          "or its own (compact, loaded with moeprune.load)"),
    "--selection": dict(choices=["global", "per_layer"],
                        help="neuron methods, compact layout: one ranking over every layer (global; default) or the "
                             "same fraction in each layer"),
    "--rho": dict(type=float, help="camera_p: weight of the max over tokens against the sum (default 0.9)"),
})


def add_method_options(parser: argparse.ArgumentParser) -> None:
    """The method options (:data:`METHOD_OPTION_FLAGS`), all defaulting to None (= the method's default)."""
    if not METHOD_OPTION_FLAGS:
        return
    group = parser.add_argument_group("method options (only for the methods that take them)")
    for flag, kwargs in METHOD_OPTION_FLAGS.items():
        group.add_argument(flag, default=None, **kwargs)


def add_combined_options(parser: argparse.ArgumentParser, methods: list[str]) -> None:
    """A combined budget (:mod:`moeprune.plan.combined`): --method is the expert action, --dense-method
    the dense one, --total-ratio of all the parameters, the dense part sized by --expert-share,
    --dense-ratio or (layer methods) --layers."""
    group = parser.add_argument_group(
        "combined budget (--method = an expert or neuron method, --dense-method = heads, channels or layers, under one "
        "budget of ALL the parameters)")
    group.add_argument("--dense-method", choices=methods, metavar="DENSE_METHOD", help="the dense action: flap, wanda_sp, magnitude, taylor, dense_random "
                                              "(with --unit), angular, replaceme (layers)")
    group.add_argument("--total-ratio", type=fraction(below_one=True),
                       help="fraction of ALL the model's parameters removed, in (0, 1) (replaces --ratio)")
    size = group.add_mutually_exclusive_group()
    size.add_argument("--expert-share", type=fraction(below_one=False),
                      help="share of the total taken from routed experts, in [0, 1]; the dense part takes the rest "
                           "(0: dense only, 1: experts only)")
    size.add_argument("--dense-ratio", type=fraction(below_one=True),
                      help="the dense part at this fraction of its unit's weights; the experts take the rest of the total")


def method_options(args: argparse.Namespace) -> dict:
    """The method options given on the command line, by ``dest`` name."""
    dests = [flag.lstrip("-").replace("-", "_") for flag in METHOD_OPTION_FLAGS]
    return {dest: getattr(args, dest) for dest in dests if getattr(args, dest, None) is not None}


def prune_summary(plan) -> str:
    """One line saying what a plan did: experts kept per layer, or neurons removed (neuron slicing),
    or a combined budget's split."""
    if "split" in plan.budget:
        split, unit = plan.budget["split"], plan.budget.get("unit", "dense")
        return (f"removed {split['removed_params']} of {split['total_params']} parameters "
                f"({100 * split['removed_fraction']:.1f}%, asked {100 * plan.budget.get('total_ratio', 0):.1f}%): routed "
                f"experts {100 * split['expert_fraction']:.1f}%, {unit} {100 * split['dense_fraction']:.1f}%")
    if plan.layers:
        kept = sorted({len(k) for k in plan.layers.values()})
        return f"kept {kept} of {plan.num_experts} experts in {len(plan.layers)} MoE layers"
    budget = plan.budget
    if "removed_neurons" in budget:
        return (f"removed {budget['removed_neurons']} of {budget['routed_neurons']} routed-expert neurons "
                f"({100 * budget['routed_expert_param_ratio']:.1f}% of routed-expert parameters, "
                f"{100 * budget['param_ratio']:.1f}% of all) in {len(plan.actions)} MoE layers, {budget.get('layout')} layout")
    return f"applied {sum(len(a) for a in plan.actions.values())} actions to {len(plan.actions)} layers"


def build_parser() -> argparse.ArgumentParser:
    """The whole parser; building it imports neither torch nor transformers (method choices come from
    the light registry :mod:`moeprune.methods`), so ``--help`` and argument errors are instant."""
    from .methods import method_names

    methods = method_names()
    parser = argparse.ArgumentParser(prog="moeprune", description="Exact, memory-bounded expert pruning for MoE LLMs.")
    parser.add_argument("--version", action="version", version=f"moeprune {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors; no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--threads", type=at_least(1), default=None,
                        help="torch CPU threads (default: torch's choice; 1 is faster on a busy machine)")
    common = common_options()
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser

    def sub_add_parser(name, **kwargs):
        return add(name, parents=[common], **kwargs)

    sub.add_parser = sub_add_parser

    p = sub.add_parser("inspect", help="family, layers, experts, routing rule and sizes of a checkpoint")
    p.add_argument("model", help="local Hugging Face checkpoint folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("collect", help="one-pass router/expert statistics over calibration data")
    p.add_argument("model")
    p.add_argument("--data", required=True,
                   help="local .txt, .jsonl, .parquet, saved datasets folder, or pre-tokenized .safetensors (input_ids)")
    p.add_argument("--out", required=True, help="statistics file to write (.safetensors)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--offload-dir", help="keep cached activations on disk under this folder")
    p.add_argument("--tcess-pool", type=at_least(1), help="PreMoe pool size K_a (default 2 x top_k)")
    p.add_argument("--tcess-r", type=fraction(below_one=False), help="fixed PreMoe threshold r (default: mean max pooled probability)")
    add_data_options(p)

    p = sub.add_parser("super-experts", help="detect super experts (JSON report and table)")
    p.add_argument("model")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--stats", help="statistics file from `moeprune collect`")
    source.add_argument("--data", help="calibration data (statistics are collected first)")
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument("--overwrite", action="store_true")
    add_data_options(p)

    p = sub.add_parser("prune", help="score experts, plan, and write a pruned vanilla checkpoint")
    p.add_argument("model")
    p.add_argument("--method", required=True, choices=methods,
                   help="compression method (the registry moeprune.methods; formulas in docs/methods.md)")
    # not required by argparse: layer-drop methods (angular, replaceme) take --layers N instead; the
    # others refuse a missing budget (plan.resolve_budget, plan.dense) with a message naming it
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=fraction(below_one=True), help="fraction of experts removed per MoE layer, in [0, 1)")
    budget.add_argument("--keep", type=at_least(1), help="experts kept per MoE layer")
    budget.add_argument("--per-layer", help='JSON mapping layer -> kept count, e.g. \'{"1": 4, "2": 6}\'')
    source = p.add_mutually_exclusive_group()
    source.add_argument("--data", help="calibration data (not needed for --method random)")
    source.add_argument("--stats", help="statistics file from `moeprune collect`")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-protect-super-experts", action="store_true", help="allow super experts to be pruned")
    p.add_argument("--collapse-groups", action="store_true",
                   help="DeepSeek group routing: set n_group = topk_group = 1 instead of pruning equally per group")
    p.add_argument("--dynamic-skip", action="store_true",
                   help="also record NAEE dynamic skipping (skip a token's second expert where w2 < beta*w1; top-2 "
                        "routing; applied by moeprune.load); combines with any method")
    add_combined_options(p, methods)
    add_method_options(p)
    add_data_options(p)

    p = sub.add_parser("apply", help="write the checkpoint a saved plan describes")
    p.add_argument("model")
    p.add_argument("--plan", required=True, help="moeprune_plan.json")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("demo", help="the default job: prune the default testbed, compare held-out perplexity")
    p.add_argument("--out", default="runs/demo", help="working folder (default runs/demo)")
    p.add_argument("--method", default="reap", choices=methods, help="compression method (default reap)")
    p.add_argument("--ratio", type=fraction(below_one=True), default=0.5, help="fraction of experts removed (default 0.5)")
    p.add_argument("--testbed", default="mixtral",
                   help="testbed recipe, trained on first use into the cache (default mixtral; tiny for a quick run)")
    p.add_argument("--model", help="use this local checkpoint instead of a testbed (evaluated on the testbed corpus)")
    p.add_argument("--eval-tokens", type=at_least(1), default=8192, help="held-out tokens per domain (default 8192)")
    p.add_argument("--overwrite", action="store_true")

    import importlib

    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def _data_kwargs(args) -> dict:
    return dict(samples=args.samples, seq_len=args.seq_len, seed=args.seed, text_field=args.text_field,
                chat_template=args.chat_template, batch_size=args.batch_size, mode=args.mode,
                device=args.device, dtype=args.dtype, tokenizer=args.tokenizer)


def _print_inspect(info: dict) -> None:
    gib = 1024**3
    rows = [
        ("family", f"{info['family']} ({info['model_type']})"),
        ("routing", info["routing"]),
        ("layers", f"{info['num_hidden_layers']} decoder layers, MoE at {info['moe_layers']}"),
        ("experts", f"{info['num_experts']} routed per layer, top-{info['top_k']}"
         + (f", {info['n_group']} groups (top-{info['topk_group']})" if info["n_group"] > 1 else "")
         + (", shared experts" if info["shared_experts"] else "")),
        ("weights", f"{info['weights_bytes'] / gib:.3f} GiB in {info['shards']} shard(s); routed experts "
         f"{info['routed_expert_bytes'] / gib:.3f} GiB ({100 * info['routed_expert_fraction']:.1f}%)"),
        ("fingerprint", info["fingerprint"]),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def run(args) -> int:
    from . import api
    from .calibration.distributed import is_writer  # under torchrun, rank 0 alone prints and writes

    progress = not args.quiet
    handler = getattr(args, "handler", None)
    if handler is not None:
        return handler(args)
    if args.command == "inspect":
        info = api.inspect(args.model)
        print(json.dumps(info, indent=2)) if args.json else _print_inspect(info)
        return 0
    if args.command == "collect":
        stats = api.collect(args.model, args.data, out=args.out, overwrite=args.overwrite, tcess_pool=args.tcess_pool,
                            tcess_r=args.tcess_r, offload_dir=args.offload_dir, progress=progress, **_data_kwargs(args))
        if is_writer():
            print(f"wrote statistics of {len(stats.layers)} MoE layers over {stats.metadata['num_tokens']} tokens to "
                  f"{args.out}")
        return 0
    if args.command == "super-experts":
        from .checks import check_output_writable
        from .io.output import atomic_write_json
        from .observe import observers_for_entries
        from .stats import RouterStats
        from .super_experts import format_table

        if args.out:
            check_output_writable(args.out, args.overwrite, protect=[args.model])
        observers = observers_for_entries(["max_abs_output", "shared_max_abs_output"])
        stats = RouterStats.load(args.stats) if args.stats else api.collect(
            args.model, args.data, observers=observers, progress=progress, **_data_kwargs(args))
        report = api.super_experts(args.model, stats)
        if is_writer():
            print(format_table(report))
            if args.out:
                atomic_write_json(args.out, report.to_json(), overwrite=args.overwrite)
        return 0
    if args.command == "prune":
        per_layer = None
        if args.per_layer:
            try:
                per_layer = {int(k): v for k, v in json.loads(args.per_layer).items()}
            except (ValueError, AttributeError) as exc:
                raise MoePruneError(f"--per-layer must be a JSON object of layer -> count: {exc}") from exc
        options, combined = method_options(args), {}
        if args.dense_method is not None:  # one set of method flags: each goes to the method that takes it
            from .plan.combined import split_options

            options, dense_options = split_options(args.method, args.dense_method, options)
            combined = dict(dense_method=args.dense_method, dense_options=dense_options)
        if args.total_ratio is not None or args.expert_share is not None or args.dense_ratio is not None:
            combined.update(total_ratio=args.total_ratio, expert_share=args.expert_share, dense_ratio=args.dense_ratio)
        plan = api.prune(args.model, args.out, method=args.method, ratio=args.ratio, keep=args.keep, per_layer=per_layer,
                         data=args.data, stats=args.stats, overwrite=args.overwrite,
                         protect_super_experts=not args.no_protect_super_experts, collapse_groups=args.collapse_groups,
                         progress=progress, options=options, dynamic_skip=args.dynamic_skip,
                         **combined, **_data_kwargs(args))
        if is_writer():
            print(f"{prune_summary(plan)}; wrote {args.out}")
        return 0
    if args.command == "apply":
        api.apply(args.model, args.plan, args.out, overwrite=args.overwrite, progress=progress)
        print(f"wrote {args.out}")
        return 0
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.out, method=args.method, ratio=args.ratio, testbed=args.testbed, model_dir=args.model,
                 eval_tokens=args.eval_tokens, overwrite=args.overwrite, progress=progress)
        return 0
    raise AssertionError(args.command)


#: Exit statuses: 2 for a problem with the input or the environment (the message says how to fix
#: it; argparse uses 2 as well), 1 for a bug in moeprune, 128 + N for signal N (130: Ctrl-C).
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
REPORT_URL_HINT = "this is a bug in moeprune; please report it with the command line and the output of the same command with -v"


def _raise_interrupted(signum, frame) -> None:
    """SIGTERM handler: raise :class:`~moeprune.errors.Interrupted` (a KeyboardInterrupt), so that the
    temporary outputs are cleaned up exactly as for Ctrl-C."""
    raise Interrupted(signum)


def _install_signal_handlers() -> dict:
    """Handle SIGTERM like SIGINT for the length of one command; return the previous handlers."""
    previous = {}
    try:
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _raise_interrupted)
    except ValueError:  # not the main thread: leave the handlers alone
        pass
    return previous


def _silence_stdout() -> None:
    """Point stdout at /dev/null after its reader went away, so exiting does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def describe_os_error(exc: OSError) -> str:
    """One line for an OSError from the environment (full disk, permissions, missing path)."""
    where = f" ({exc.filename})" if exc.filename else ""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device{where}; free some space or choose another --out (nothing was written)"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{reason}{where}; choose a location you may write to"
    return f"{reason}{where}"


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure ends as one ``moeprune: error: ...`` line and an exit status
    (see :data:`EXIT_USER_ERROR`), never a traceback (``-v`` shows it for internal errors)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, argument errors (argparse printed the message)
        return exc.code if isinstance(exc.code, int) else EXIT_USER_ERROR
    level = logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    previous = _install_signal_handlers()
    try:
        if args.quiet:
            import transformers

            transformers.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        code = run(args)
        sys.stdout.flush()
        return code
    except MoePruneError as exc:
        print(f"moeprune: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        name = signal.Signals(signum).name
        print(f"moeprune: interrupted ({name}); unfinished outputs were removed, earlier outputs are intact",
              file=sys.stderr)
        return 128 + int(signum)
    except BrokenPipeError:  # e.g. `moeprune inspect M | head -1`: the reader has all it wants
        _silence_stdout()
        return 128 + int(getattr(signal, "SIGPIPE", 13))
    except (OSError, MemoryError) as exc:
        if args.verbose:
            traceback.print_exc()
        message = describe_os_error(exc) if isinstance(exc, OSError) else "out of memory; try --mode sequential, a smaller --batch-size or --offload-dir"
        print(f"moeprune: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:  # noqa: BLE001 - the last line of defence: a bug, reported as such
        if args.verbose:
            traceback.print_exc()
        print(f"moeprune: error: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        print(f"moeprune: {REPORT_URL_HINT}", file=sys.stderr)
        return EXIT_INTERNAL_ERROR
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
