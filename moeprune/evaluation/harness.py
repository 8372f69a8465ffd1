"""lm-evaluation-harness, fully offline, on local tasks generated from the held-out corpus.

:func:`write_lm_eval_tasks` writes one YAML task config per task (``dataset_path: json`` with an
absolute ``data_files`` path) and its ``.jsonl`` documents into a folder; lm-eval's
``TaskManager(include_path=folder)`` loads them like any built-in task.  Tasks (names prefixed
``moeprune_``):

``moeprune_cont_<domain>`` (multiple_choice; code, prose, legal)
    Context: the start of a held-out document, cut at the last whitespace at or before
    :data:`PREFIX_CHARS` characters.  Choices: the true next :data:`CONTINUATION_CHARS`
    characters and the same-length continuations of 3 other held-out documents of the same domain
    (each cut the same way), in an order shuffled by ``random.Random(f"{seed}:{domain}")``.
    Context + true choice is the document's own text (``target_delimiter: ""``).  Metrics acc and
    acc_norm (lm-eval: argmax of log-likelihood, resp. of log-likelihood per byte).
``moeprune_arith_mc`` (multiple_choice)
    Context ``Q: 37+48=? A:``; choices the true answer and 3 distinct non-negative distractors
    ``answer + d`` with d drawn from +-1, +-2, +-10, each written ``" <n>"`` as in the corpus.
``moeprune_ppl_<domain>`` (loglikelihood_rolling; every domain)
    The held-out documents scored whole (rolling windows of the model's max length).  lm-eval's
    metrics: word_perplexity = exp(-sum LL / words), byte_perplexity = exp(-sum LL / bytes),
    bits_per_byte = -sum LL / bytes / ln 2, where LL is a document's total log-likelihood given the
    model's prefix token and words = ``len(re.split(r"\\s+", doc))``, bytes = UTF-8 bytes.

Everything is deterministic given the corpus, ``n_docs`` and ``seed``.  lm-eval is the optional
extra ``eval``: ``pip install -c constraints-cpu.txt "moeprune[eval]"``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from moeprune.errors import MoePruneError
from moeprune.io.output import prepared_output
from moeprune.testbed.corpus import DOMAINS, parse_math

from .heldout import EvaluationError, check_positive, held_out_documents

logger = logging.getLogger(__name__)

TASK_PREFIX = "moeprune_"
#: Domains with a continuation multiple-choice task (math questions are independent of each other,
#: so a document's start says nothing about its continuation: math has ``moeprune_arith_mc``).
CONTINUATION_DOMAINS: tuple[str, ...] = ("code", "prose", "legal")
PREFIX_CHARS = 300
CONTINUATION_CHARS = 100
N_CHOICES = 4
ARITH_OFFSETS: tuple[int, ...] = (-10, -2, -1, 1, 2, 10)
INSTALL_HINT = 'pip install -c constraints-cpu.txt "moeprune[eval]"'


# --------------------------------------------------------------------------- documents


def split_document(text: str, prefix_chars: int = PREFIX_CHARS,
                   continuation_chars: int = CONTINUATION_CHARS) -> tuple[str, str] | None:
    """``(context, continuation)``: the context ends just before the last whitespace character in
    ``text[prefix_chars // 2 : prefix_chars + 1]``; the continuation is the next ``continuation_chars``
    characters (starting with that whitespace).  None when the document is too short, has no such
    whitespace, or the continuation is blank."""
    lo = prefix_chars // 2
    cut = max((i for i in range(lo, min(prefix_chars, len(text) - 1) + 1) if text[i].isspace()), default=None)
    if cut is None or cut + continuation_chars > len(text):
        return None
    continuation = text[cut:cut + continuation_chars]
    return (text[:cut], continuation) if continuation.strip() else None


def continuation_items(docs: Sequence[str], n_docs: int, rng: random.Random,
                       prefix_chars: int = PREFIX_CHARS, continuation_chars: int = CONTINUATION_CHARS) -> list[dict]:
    """Multiple-choice items ``{"context", "choices", "label"}`` for the first ``n_docs`` usable
    documents: the true continuation plus 3 distinct continuations of other documents."""
    pieces = [p for p in (split_document(d, prefix_chars, continuation_chars) for d in docs) if p is not None]
    items = []
    for i, (context, true) in enumerate(pieces):
        if len(items) == n_docs:
            break
        others = [j for j in range(len(pieces)) if j != i]
        rng.shuffle(others)
        distractors: list[str] = []
        for j in others:
            candidate = pieces[j][1]
            if candidate != true and candidate not in distractors:
                distractors.append(candidate)
            if len(distractors) == N_CHOICES - 1:
                break
        if len(distractors) < N_CHOICES - 1:
            continue
        choices = [true, *distractors]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(true)})
    return items


def arithmetic_choice_items(pairs: Sequence[tuple[str, int]], n_docs: int, rng: random.Random) -> list[dict]:
    """Multiple-choice items for ``(prompt, answer)`` pairs: choices ``" <n>"`` for the answer and 3
    distinct non-negative ``answer + d``, d in :data:`ARITH_OFFSETS`, shuffled."""
    items = []
    for prompt, answer in pairs[:n_docs]:
        candidates = [answer + d for d in ARITH_OFFSETS if answer + d >= 0]
        values = [answer, *rng.sample(candidates, N_CHOICES - 1)]
        rng.shuffle(values)
        items.append({"context": prompt, "choices": [f" {v}" for v in values], "label": values.index(answer)})
    return items


# --------------------------------------------------------------------------- task files


def _task_config(name: str, data_file: Path, description: str, output_type: str, **fields) -> dict:
    """An lm-eval task config reading the local json file ``data_file`` as its test split."""
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_file)}},
            "test_split": "test", "output_type": output_type, **fields,
            "metadata": {"version": 1.0, "description": description}}


def _multiple_choice_config(name: str, data_file: Path, description: str) -> dict:
    return _task_config(
        name, data_file, description, "multiple_choice",
        doc_to_text="context", doc_to_choice="choices", doc_to_target="label", target_delimiter="",
        metric_list=[{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
    )


def _rolling_config(name: str, data_file: Path, description: str) -> dict:
    metrics = (("word_perplexity", "weighted_perplexity"), ("byte_perplexity", "weighted_perplexity"),
               ("bits_per_byte", "bits_per_byte"))
    return _task_config(
        name, data_file, description, "loglikelihood_rolling", doc_to_text="", doc_to_target="text",
        metric_list=[{"metric": m, "aggregation": agg, "higher_is_better": False} for m, agg in metrics],
    )


def _write_task(folder: Path, config: dict, rows: list[dict], datasets_cache_dir: Path | None) -> str:
    """Write ``rows`` as ``folder/<data file name>`` and the YAML as ``folder/<task>.yaml``
    (the YAML keeps the final absolute data path)."""
    import yaml

    name = config["task"]
    data_file = folder / Path(config["dataset_kwargs"]["data_files"]["test"]).name
    data_file.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    if datasets_cache_dir is not None:
        config["dataset_kwargs"]["cache_dir"] = str(datasets_cache_dir)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return name


def write_lm_eval_tasks(corpus_dir: str | os.PathLike, out_dir: str | os.PathLike, n_docs: int = 200, *,
                        split: str = "test", domains: Sequence[str] = DOMAINS, seed: int = 0,
                        overwrite: bool = False, datasets_cache_dir: str | os.PathLike | None = None) -> list[str]:
    """Write the lm-eval task YAMLs and their ``.jsonl`` documents into ``out_dir``; return the task names.

    At most ``n_docs`` documents per task. The data paths inside the YAMLs are the absolute paths
    of the final ``out_dir`` (written to a temporary folder first, refused if ``out_dir`` is not empty
    unless ``overwrite``). ``datasets_cache_dir`` sets where ``datasets`` caches the parsed json.
    """
    check_positive("n_docs", n_docs)
    if not domains:
        raise EvaluationError("no domains given; pass at least one of " + ", ".join(DOMAINS))
    final = Path(out_dir).expanduser().absolute()
    cache = Path(datasets_cache_dir).absolute() if datasets_cache_dir is not None else None
    docs = {domain: held_out_documents(corpus_dir, domain, split) for domain in domains}
    names: list[str] = []
    with prepared_output(final, overwrite=overwrite) as tmp:
        for domain in (d for d in CONTINUATION_DOMAINS if d in docs):
            name = f"{TASK_PREFIX}cont_{domain}"
            items = continuation_items(docs[domain], n_docs, random.Random(f"{seed}:{domain}"))
            if not items:
                logger.warning("skipping %s: fewer than %d usable %s documents in the %s split",
                               name, N_CHOICES, domain, split)
                continue
            config = _multiple_choice_config(name, final / f"{name}.jsonl",
                                             f"true continuation of a held-out {domain} document among {N_CHOICES}")
            names.append(_write_task(tmp, config, items, cache))
        if "math" in docs:
            name = f"{TASK_PREFIX}arith_mc"
            pairs = [pair for doc in docs["math"] for pair in parse_math(doc)]
            items = arithmetic_choice_items(pairs, n_docs, random.Random(f"{seed}:arith"))
            if items:
                config = _multiple_choice_config(name, final / f"{name}.jsonl",
                                                 f"answer of a held-out arithmetic question among {N_CHOICES}")
                names.append(_write_task(tmp, config, items, cache))
        for domain, texts in docs.items():
            name = f"{TASK_PREFIX}ppl_{domain}"
            config = _rolling_config(name, final / f"{name}.jsonl", f"rolling log-likelihood of held-out {domain} documents")
            names.append(_write_task(tmp, config, [{"text": t} for t in texts[:n_docs]], cache))
    logger.info("wrote %d lm-eval tasks to %s", len(names), final)
    return names


# --------------------------------------------------------------------------- running


def import_lm_eval():
    """The ``lm_eval`` module, or a MoePruneError saying how to install it."""
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401
    except ImportError as exc:
        raise MoePruneError(f"lm-evaluation-harness is not installed ({exc}); install it with: {INSTALL_HINT}") from exc
    return lm_eval


@contextmanager
def offline_hub() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 (environment and the already-imported
    ``datasets.config``) for the duration, restored afterwards: nothing is downloaded."""
    keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    old_env = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    import datasets.config as dconfig

    old_cfg = {k: getattr(dconfig, k) for k in keys if hasattr(dconfig, k)}
    for k in old_cfg:
        setattr(dconfig, k, True)
    try:
        yield
    finally:
        for k, v in old_cfg.items():
            setattr(dconfig, k, v)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def _quiet_lm_eval_logs() -> Iterator[None]:
    """lm-eval's own loggers at ERROR for the duration (INFO when moeprune logs at DEBUG)."""
    lm_logger = logging.getLogger("lm_eval")
    old = lm_logger.level
    lm_logger.setLevel(logging.INFO if logger.isEnabledFor(logging.DEBUG) else logging.ERROR)
    try:
        yield
    finally:
        lm_logger.setLevel(old)


@contextmanager
def _datasets_progress(progress: bool) -> Iterator[None]:
    """``datasets`` progress bars on only when ``progress`` (previous setting restored)."""
    from datasets.utils import logging as dlogging

    was_enabled = dlogging.is_progress_bar_enabled()
    if not progress:
        dlogging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            dlogging.enable_progress_bar()


@contextmanager
def _preserved_rng() -> Iterator[None]:
    """Restore Python, NumPy and torch global RNG states (lm-eval reseeds them)."""
    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def _make_lm(model, tokenizer, batch_size: int, max_length: int | None, progress: bool):
    """An lm-eval HFLM around the in-memory model (progress bars of the model calls off unless ``progress``)."""
    from lm_eval.models.huggingface import HFLM

    class _HFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm=False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not progress)

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm or not progress,
                                                 override_bs=override_bs)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not progress)

    return _HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def flatten_results(results: dict) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from lm-eval's ``results`` (filter suffix ``,none`` dropped,
    non-numeric entries such as ``alias`` or ``N/A`` stderr skipped) plus ``n_docs`` evaluated."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results["results"].items():
        row = {}
        for key, value in metrics.items():
            metric, _, flt = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and metric != "sample_len":
                row[metric if flt in ("", "none") else key] = float(value)
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        if n is not None:
            row["n_docs"] = float(n)
        out[task] = row
    return out


def run_lm_eval(model, tokenizer, corpus_dir: str | os.PathLike, tasks: Sequence[str] | None = None,
                limit: int | None = None, batch_size: int = 8, *, n_docs: int = 200, split: str = "test",
                domains: Sequence[str] = DOMAINS,
                max_length: int | None = None, seed: int = 0, bootstrap_iters: int = 1000,
                progress: bool = False) -> dict[str, dict[str, float]]:
    """Run lm-eval (``simple_evaluate``, zero-shot) on the in-memory ``model`` with the generated tasks.

    ``tasks``: names from :func:`write_lm_eval_tasks` for ``domains`` (default all); ``limit``: documents per task
    (lm-eval's ``limit``); ``max_length``: the rolling window (default: the model config's maximum).
    Task files and the ``datasets`` cache live in a temporary folder removed afterwards; the hub is
    kept offline and the global RNG states are restored. Returns ``{task: {metric: value}}``.
    """
    check_positive("limit", limit)
    check_positive("batch_size", batch_size)
    lm_eval = import_lm_eval()
    from lm_eval.tasks import TaskManager

    with offline_hub(), _preserved_rng(), _quiet_lm_eval_logs(), _datasets_progress(progress), \
            tempfile.TemporaryDirectory(prefix="moeprune-lm-eval-") as tmp:
        folder = Path(tmp) / "tasks"
        names = write_lm_eval_tasks(corpus_dir, folder, n_docs=n_docs, split=split, domains=domains, seed=seed,
                                    datasets_cache_dir=Path(tmp) / "datasets")
        selected = list(names if tasks is None else tasks)
        unknown = sorted(set(selected) - set(names))
        if unknown or not selected:
            raise EvaluationError(f"unknown lm-eval task(s) {unknown or selected}; choose from {', '.join(names)}")
        manager = TaskManager(include_path=str(folder), include_defaults=False)
        lm = _make_lm(model, tokenizer, batch_size, max_length, progress)
        results = lm_eval.simple_evaluate(model=lm, tasks=selected, task_manager=manager, limit=limit,
                                          log_samples=False, bootstrap_iters=bootstrap_iters)
    return flatten_results(results)
