"""`moeprune profile`: task-specific expert profiles (build, match, export, list, combine).

The work is done by :mod:`moeprune.profiles`; this module only parses arguments and prints.
"""

from __future__ import annotations

import argparse
import json


def _add_budget(parser: argparse.ArgumentParser, required: bool, what: str) -> None:
    budget = parser.add_mutually_exclusive_group(required=required)
    from ..cli import at_least, fraction

    budget.add_argument("--ratio", type=fraction(below_one=True),
                        help=f"fraction of experts removed per MoE layer, in [0, 1) {what}")
    budget.add_argument("--keep", type=at_least(1), help=f"experts kept per MoE layer {what}")


#: ``profile build`` flag -> the folding action option it sets (given ones only; check_action refuses
#: an option the chosen --action does not take)
_ACTION_FLAGS = {"--merge-similarity": "similarity", "--router": "router", "--router-rows": "router_rows",
                 "--align": "align", "--tau": "tau", "--gate-in-similarity": "gate_in_similarity",
                 "--kmeans-iterations": "kmeans_iterations", "--kmeans-init": "kmeans_init"}


def _add_action(parser: argparse.ArgumentParser) -> None:
    from ..cli import METHOD_OPTION_FLAGS
    from ..profiles.settings import MERGE_OPTIONS, MERGE_SIMILARITIES, PROFILE_ACTIONS

    parser.add_argument("--action", choices=PROFILE_ACTIONS, default="drop",
                        help="what happens to the experts not kept: drop (default), merge each into a kept expert, or "
                             "dern (recombine their neurons into the kept experts); the kept set is the same")
    group = parser.add_argument_group("--action merge|dern options")
    group.add_argument("--merge-similarity", choices=MERGE_SIMILARITIES, default=None,
                       help=f"merge: the kept expert a dropped one joins, nearest by mean expert output (HC-SMoE's "
                            f"feature) or by router logits (M-SMoE's); default {MERGE_OPTIONS['similarity']}")
    for flag in ("--router", "--router-rows", "--align", "--tau", "--gate-in-similarity", "--kmeans-iterations",
                 "--kmeans-init"):
        group.add_argument(flag, default=None, **METHOD_OPTION_FLAGS[flag])


def _action_options(args) -> dict:
    return {option: getattr(args, flag.lstrip("-").replace("-", "_")) for flag, option in _ACTION_FLAGS.items()
            if getattr(args, flag.lstrip("-").replace("-", "_")) is not None}


def _add_store(parser: argparse.ArgumentParser, required: bool) -> None:
    if required:
        parser.add_argument("--store", required=True, help="profile store folder")
    else:
        parser.add_argument("--store", help="profile store folder (default: the profiles shipped for the default testbed)")


def register(subparsers) -> None:
    """Add ``moeprune profile {build,match,export,list,combine}``."""
    from ..cli import add_data_options, add_tokenizer_option, at_least, common_options
    from ..methods import method_names
    from ..profiles.settings import (COMBINE_MODES, DEFAULT_RATIO, DEFAULT_REFERENCE, DEFAULT_SIGNATURE_LAYERS,
                                     DEFAULT_WINDOW_SAMPLES, GENERAL, METRICS, REFERENCES)

    top = subparsers.add_parser("profile", help="task-specific expert profiles: build, match, export, list, combine")
    sub = top.add_subparsers(dest="profile_command", required=True)
    parents = [common_options()]

    p = sub.add_parser("build", parents=parents, help="build a task profile from local data into a store")
    p.add_argument("model", help="local Hugging Face checkpoint folder")
    p.add_argument("--task", required=True, help="profile name (e.g. code)")
    p.add_argument("--data", required=True, help="the task's calibration data (.txt, .jsonl, .parquet, saved dataset)")
    _add_store(p, required=True)
    p.add_argument("--method", default="tcess", choices=method_names(),
                   help="scoring method (default tcess, PreMoe; easy_ep and reap are output-aware)")
    _add_budget(p, required=False, what=f"(default --ratio {DEFAULT_RATIO})")
    p.add_argument("--stats", help="statistics file collected on the same data (skips collection)")
    p.add_argument("--signature-layers", type=at_least(1), default=DEFAULT_SIGNATURE_LAYERS,
                   help=f"early MoE layers whose signature is stored (default {DEFAULT_SIGNATURE_LAYERS})")
    p.add_argument("--window-samples", type=at_least(1), default=DEFAULT_WINDOW_SAMPLES,
                   help=f"rows of --seq-len tokens the matcher's calibration windows are cut from (default "
                        f"{DEFAULT_WINDOW_SAMPLES}; fewer if the data holds fewer)")
    p.add_argument("--no-protect-super-experts", action="store_true", help="allow super experts to be pruned")
    p.add_argument("--collapse-groups", action="store_true", help="DeepSeek group routing: n_group = topk_group = 1")
    p.add_argument("--overwrite", action="store_true", help="replace an existing profile of this name")
    _add_action(p)
    add_data_options(p)
    samples = next(action for action in p._actions if action.dest == "samples")
    samples.help = ("packed sequences to use (default 64, or every block when the data holds fewer: a few in-domain "
                    "demonstrations; an explicit count larger than the data is an error)")
    p.set_defaults(handler=_build)

    p = sub.add_parser("match", parents=parents, help="the nearest profile of a prompt, with a confidence")
    p.add_argument("model")
    _add_store(p, required=False)
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="one prompt")
    prompts.add_argument("--prompts", help="a .jsonl file (one prompt per row, --text-field) or .txt (blank-line separated)")
    p.add_argument("--text-field", default="text", help="text field of --prompts rows (default text)")
    p.add_argument("--layers", type=at_least(1), help="signatures of the first N MoE layers (default: all the profiles store; "
                                               "PreMoe uses 1)")
    p.add_argument("--metric", choices=METRICS, default=METRICS[0], help=f"distance (default {METRICS[0]}, as PreMoe)")
    p.add_argument("--reference", choices=REFERENCES, default=DEFAULT_REFERENCE,
                   help="classifier (default): logistic regression on the profiles' calibration windows (mean "
                        "router logits); windows: the 5 nearest calibration windows of each profile (TCESS); "
                        "centroid: each profile's TCESS signature (PreMoe)")
    p.add_argument("--max-tokens", type=at_least(1), help="use only the first N tokens of each prompt (N >= 1)")
    fallback = p.add_mutually_exclusive_group()
    fallback.add_argument("--fallback", default=GENERAL, help=f"profile used far from every other one (default {GENERAL})")
    fallback.add_argument("--no-fallback", action="store_true", help="always answer the nearest profile")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt (fields profile, confidence, ...)")
    add_tokenizer_option(p)
    p.set_defaults(handler=_match)

    p = sub.add_parser("export", parents=parents, help="write a profile as a standalone vanilla checkpoint")
    p.add_argument("model")
    _add_store(p, required=False)
    p.add_argument("--task", required=True, help="profile to export")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    _add_budget(p, required=False, what="(re-select from the profile's scores; default: the profile's own budget)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(handler=_export)

    p = sub.add_parser("list", parents=parents, help="the profiles of a store")
    _add_store(p, required=False)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_list)

    p = sub.add_parser("combine", parents=parents, help="mix (EASY-EP), union or intersect stored profiles")
    _add_store(p, required=True)
    p.add_argument("profiles", nargs="+", help="names of the profiles to combine (at least two)")
    p.add_argument("--mode", choices=COMBINE_MODES, default=COMBINE_MODES[0], help=f"default {COMBINE_MODES[0]}")
    p.add_argument("--name", required=True, help="name of the combined profile (e.g. general)")
    _add_budget(p, required=False, what="(--mode mix; default: the profiles' common budget)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing profile of this name")
    p.set_defaults(handler=_combine)


def _store(args):
    from ..profiles import ProfileStore

    return ProfileStore(args.store) if args.store else ProfileStore.default()


def _kept_summary(profile) -> str:
    counts = sorted(set(profile.kept_counts().values()))
    return f"{'/'.join(map(str, counts))} of {profile.metadata['num_experts']}"


def _build(args) -> int:
    from .. import api
    from ..arch import read_config
    from ..calibration.data import is_pretokenized
    from ..calibration.distributed import is_writer
    from ..profiles import ProfileStore, build_profile

    from ..profiles.fold import check_action

    store = ProfileStore(args.store)
    store.check_writable(args.task, args.overwrite)
    info = api.model_info(args.model)  # config, shard headers and tensor shapes, before calibration
    options = check_action(args.action, _action_options(args), info, collapse_groups=args.collapse_groups)
    seq_len = args.seq_len
    if seq_len is None and not is_pretokenized(args.data):  # the default, lowered to the model's positions
        seq_len = api.default_seq_len(read_config(args.model))
    with api.using_tokenizer(args.tokenizer):
        profile = build_profile(
            args.model, args.task, args.data, method=args.method, keep=args.keep, ratio=args.ratio, samples=args.samples,
            seq_len=seq_len, seed=args.seed, batch_size=args.batch_size, text_field=args.text_field,
            chat_template=args.chat_template, mode=args.mode, stats=args.stats, signature_layers=args.signature_layers,
            window_samples=args.window_samples, protect_super_experts=not args.no_protect_super_experts,
            collapse_groups=args.collapse_groups, device=args.device, dtype=args.dtype, progress=not args.quiet,
            action=args.action, action_options=options,
        )
    if is_writer():  # under torchrun every rank collects its shard; rank 0 alone writes the store
        path = store.save(profile, overwrite=args.overwrite)
        folded = f", the others folded in ({profile.action})" if profile.folds else ""
        print(f"profile {profile.task}: {profile.method}, kept {_kept_summary(profile)} experts per MoE layer{folded}; "
              f"wrote {path}")
    return 0


def _match(args) -> int:
    from .. import api
    from ..calibration.data import read_texts
    from ..profiles import ProfileMatcher

    prompts = [args.prompt] if args.prompt is not None else read_texts(args.prompts, args.text_field)
    matcher = ProfileMatcher(args.model, _store(args), layers=args.layers, metric=args.metric, reference=args.reference,
                             fallback=None if args.no_fallback else args.fallback)
    with api.using_tokenizer(args.tokenizer):
        matches = matcher.match_many(prompts, max_tokens=args.max_tokens)
    for match in matches:
        if args.json:
            print(json.dumps(match.to_json()))
        else:
            note = f"  (fallback: nearest {match.nearest} beyond {match.threshold:.4g})" if match.fallback else ""
            print(f"{match.profile}\tconfidence {match.confidence:.3f}\tdistance {match.distance:.4g}{note}")
    return 0


def _export(args) -> int:
    from ..profiles import export_profile, rebudget_profile

    profile = _store(args).load(args.task)
    if args.ratio is not None or args.keep is not None:
        profile = rebudget_profile(profile, ratio=args.ratio, keep=args.keep)
    export_profile(args.model, profile, args.out, overwrite=args.overwrite, progress=not args.quiet)
    print(f"profile {profile.task}: kept {_kept_summary(profile)} experts per MoE layer; wrote {args.out}")
    return 0


def _list(args) -> int:
    store = _store(args)
    profiles = store.load_all()
    if args.json:
        rows = [{"name": name, "method": p.method, "action": p.action, "budget": p.budget, "kept": {str(k): v for k, v in p.kept.items()},
                 "samples": p.metadata.get("samples"), "seq_len": p.metadata.get("seq_len"),
                 "sources": p.metadata.get("sources"), "model_fingerprint": p.metadata["model_fingerprint"]}
                for name, p in profiles.items()]
        print(json.dumps(rows, indent=2))
        return 0
    print(f"store {store.folder}: {len(profiles)} profile(s)")
    for name, p in profiles.items():
        source = ("+".join(p.metadata["sources"]) if p.metadata.get("sources")
                  else f"{p.metadata.get('samples')}x{p.metadata.get('seq_len')} tokens")
        method = f"{p.method}+{p.action}" if p.folds else p.method
        print(f"{name:<16} {method:<9} {json.dumps(p.budget):<20} kept {_kept_summary(p):<10} {source}  "
              f"model {p.metadata['model_fingerprint']}")
    return 0


def _combine(args) -> int:
    from ..profiles import combine_profiles

    store = _store(args)
    store.check_writable(args.name, args.overwrite)
    combined = combine_profiles([store.load(name) for name in args.profiles], args.mode, name=args.name,
                                ratio=args.ratio, keep=args.keep)
    path = store.save(combined, overwrite=args.overwrite)
    print(f"profile {combined.task} ({args.mode} of {', '.join(args.profiles)}): kept {_kept_summary(combined)} "
          f"experts per MoE layer; wrote {path}")
    return 0
