"""Helpers shared by the research scripts (profiles, quality sweep): testbed and store resolution,
commit hash, docs sections."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_TESTBED = "mixtral"
DOC = ROOT / "docs" / "profiles.md"


def testbed_dir(name: str) -> Path:
    """A testbed recipe name (trained on first use, then cached) or a checkpoint folder."""
    if Path(name).is_dir():
        return Path(name)
    from moeprune.testbed.train import build_or_load_testbed

    return build_or_load_testbed(name)


def default_store(testbed: str) -> Path:
    """profiles/ for the default testbed, runs/profiles/<testbed> for the others."""
    return ROOT / "profiles" if testbed == DEFAULT_TESTBED else ROOT / "runs" / "profiles" / Path(testbed).name


def commit() -> str:
    """Short HEAD hash, with '+uncommitted changes' when tracked files outside docs/ differ from it
    (the measurement scripts themselves rewrite sections of docs/)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)docs")
    return git("rev-parse", "--short", "HEAD") + ("+uncommitted changes" if dirty else "")


def write_section(key: str, body: str, doc: Path = DOC) -> None:
    """Replace (or append) the block between ``<!-- BEGIN key -->`` and ``<!-- END key -->``."""
    begin, end = f"<!-- BEGIN {key} -->", f"<!-- END {key} -->"
    text = doc.read_text(encoding="utf-8") if doc.is_file() else "# Task profiles\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text, encoding="utf-8")


def test_windows(tokenizer, corpus, domain: str, max_tokens: int, seq_len: int):
    """A domain's TEST split (documents joined with eos, first ``max_tokens`` tokens) as non-overlapping
    windows [N, seq_len] (a last partial window is left out)."""
    import torch

    from moeprune.evaluation.perplexity import held_out_stream

    stream = held_out_stream(tokenizer, corpus, domain, max_tokens=max_tokens)
    count = len(stream) // seq_len
    return torch.tensor(stream[:count * seq_len]).reshape(count, seq_len)


def window_perplexity(nll_sums, continuation: int) -> float:
    """Perplexity exp(mean NLL per token) from per-window summed NLLs [N] of ``continuation`` scored
    tokens each (:func:`moeprune.evaluation.perplexity.continuation_nll`)."""
    import math

    return math.exp(float(nll_sums.mean()) / continuation)


def script_parser(doc: str):
    """The options every measurement script takes: --testbed, --store, --json, --no-doc, --threads."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--testbed", default=DEFAULT_TESTBED, help="testbed recipe or checkpoint folder (default mixtral)")
    parser.add_argument("--store", help="profile store (default: profiles/ for mixtral, runs/profiles/<testbed>)")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/profiles.md")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    return parser


def run_options(parser, out: str, out_help: str | None = None) -> None:
    """--threads, --out and -q of the sweep scripts (applied by :func:`start_run`)."""
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=out, help=out_help)
    parser.add_argument("-q", "--quiet", action="store_true")


def start_run(args) -> None:
    """Logging (errors only with -q, else info) and torch threads (when --threads is given) of a sweep script."""
    import logging

    import torch

    logging.basicConfig(level=logging.ERROR if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)


def window_options(parser, prompt_tokens: bool = False) -> None:
    """--kept, --max-tokens, --seq-len (and --prompt-tokens) of the perplexity scripts; check them with
    :func:`parse_window_args`."""
    parser.add_argument("--kept", type=float, nargs="+", default=[0.25, 0.5], help="fractions of experts kept")
    parser.add_argument("--max-tokens", type=int, default=32768, help="tokens per domain (default 32768)")
    parser.add_argument("--seq-len", type=int, default=256, help="window length (default 256)")
    if prompt_tokens:
        parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt tokens per window (default 128)")


def parse_window_args(parser):
    """``parser.parse_args()``, with a usage error unless 0 < --prompt-tokens < --seq-len."""
    args = parser.parse_args()
    if getattr(args, "prompt_tokens", None) is not None and not 0 < args.prompt_tokens < args.seq_len:
        parser.error("--prompt-tokens must be between 1 and --seq-len - 1")
    return args


def finish(args, section: str, results: dict, text: str) -> None:
    """Write ``results`` to --json (if given), ``text`` to the docs section ``section`` (unless
    --no-doc), and print ``text``."""
    import json

    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    if not args.no_doc:
        write_section(section, text)
    print(text)


def setup(args):
    """Threads and logging from ``args``; returns (checkpoint folder, profiles by name, corpus folder)."""
    import logging

    import torch

    from moeprune.evaluation import default_corpus_dir
    from moeprune.profiles import ProfileStore

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    store = ProfileStore(args.store or default_store(args.testbed))
    return testbed_dir(args.testbed), store.load_all(), default_corpus_dir()
