"""moeprune.evaluation: metrics on hand-computed cases, the generated lm-eval tasks, the CLI."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from moeprune.cli import main
from moeprune.errors import MoePruneError
from moeprune.evaluation import evaluate, load_checkpoint
from moeprune.evaluation.arithmetic import (
    arithmetic_exact_match,
    completion_answer,
    greedy_completions,
    left_padded_batch,
)
from moeprune.evaluation.harness import (
    CONTINUATION_CHARS,
    INSTALL_HINT,
    arithmetic_choice_items,
    import_lm_eval,
    run_lm_eval,
    split_document,
    write_lm_eval_tasks,
)
from moeprune.evaluation.heldout import EvaluationError
from moeprune.evaluation.perplexity import continuation_nll, domain_perplexities, perplexity
from moeprune.testbed.corpus import DOMAINS, format_math
from moeprune.tokenizer import _tiny_corpus


# --------------------------------------------------------------------------- fakes and data


class CharTokenizer:
    """Character-level tokenizer over a fixed alphabet; id len(alphabet) is eos, +1 is pad."""

    def __init__(self, alphabet: str):
        self.alphabet = alphabet
        self.eos_token_id = len(alphabet)
        self.pad_token_id = len(alphabet) + 1

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [self.alphabet.index(c) for c in text]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(self.alphabet[i] for i in ids if i < len(self.alphabet))


class FixedDistributionLM(torch.nn.Module):
    """Next-token distribution ``probs`` at every position, whatever the input."""

    def __init__(self, probs: list[float]):
        super().__init__()
        self.register_buffer("log_probs", torch.tensor(probs, dtype=torch.float64).log().float())

    def forward(self, input_ids, use_cache=False, **kwargs):
        return SimpleNamespace(logits=self.log_probs.expand(*input_ids.shape, -1).clone())


class FixedAnswerLM(torch.nn.Module):
    """``generate`` appends the same token ids to every prompt; records the batches it saw."""

    def __init__(self, answer_ids: list[int]):
        super().__init__()
        self.answer_ids = answer_ids
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id, eos_token_id):
        assert do_sample is False
        self.batches.append((input_ids, attention_mask))
        new = torch.tensor(self.answer_ids[:max_new_tokens]).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, new], dim=1)


def write_corpus(root: Path, docs: dict[str, list[str]], split: str = "test") -> Path:
    """A corpus folder with ``<domain>/<split>.jsonl`` (what evaluation reads)."""
    for domain, texts in docs.items():
        (root / domain).mkdir(parents=True, exist_ok=True)
        (root / domain / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return root


def short_docs(kind: int, n: int, chars: int = 450) -> list[str]:
    """``n`` documents of about ``chars`` characters from the tiny tokenizer's own corpus (kind 0
    prose, 1 code), so that every document fits one 256-token window of the tiny models."""
    lines = [line for i, line in enumerate(_tiny_corpus(600, seed=7)) if i % 3 == kind]
    docs, cur = [], ""
    for line in lines:
        cur = f"{cur}\n{line}" if cur else line
        if len(cur) >= chars:
            docs.append(cur[:chars])
            cur = ""
        if len(docs) == n:
            break
    return docs


def math_docs(n_docs: int = 3, per_doc: int = 4, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["\n".join(format_math(rng.randint(0, 99), rng.choice("+-*"), rng.randint(0, 9)) for _ in range(per_doc))
            for _ in range(n_docs)]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    """Hand-made test split: 6 short prose/code/legal documents and 3 math documents."""
    root = tmp_path_factory.mktemp("eval_corpus")
    return write_corpus(root, {"code": short_docs(1, 6), "prose": short_docs(0, 6),
                               "legal": short_docs(0, 12)[6:], "math": math_docs()})


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    """(checkpoint folder, model, tokenizer) of a tiny random Mixtral."""
    folder = tiny_checkpoint("mixtral")
    model, tokenizer = load_checkpoint(folder)
    return folder, model, tokenizer


# --------------------------------------------------------------------------- perplexity


def test_perplexity_of_uniform_model_is_vocab_size():
    tok = CharTokenizer("ab")
    vocab = 5
    model = FixedDistributionLM([1 / vocab] * vocab)
    assert perplexity(model, tok, ["abba", "ba", "a"], seq_len=3) == pytest.approx(vocab, rel=1e-9)


def test_perplexity_of_known_distribution_by_hand():
    # ids: a=0, b=1, eos=2; stream "ab" eos "ba" eos = [0, 1, 2, 1, 0, 2]; windows of 3:
    # [0, 1, 2] predicts 1, 2 and [1, 0, 2] predicts 0, 2, so with p = (1/2, 1/4, 1/4):
    # NLL = ln 4 + ln 4 + ln 2 + ln 4 = 7 ln 2 over 4 tokens -> perplexity 2 ** (7 / 4).
    tok = CharTokenizer("ab")
    model = FixedDistributionLM([0.5, 0.25, 0.25])
    assert perplexity(model, tok, ["ab", "ba"], seq_len=3) == pytest.approx(2 ** 1.75, rel=1e-9)
    # max_tokens=4 keeps [0, 1, 2, 1]: windows [0, 1, 2] and [1] (too short): NLL = 2 ln 4 over 2.
    assert perplexity(model, tok, ["ab", "ba"], seq_len=3, max_tokens=4) == pytest.approx(4.0, rel=1e-9)


def test_continuation_nll_by_hand():
    # p = (1/2, 1/4, 1/4) whatever the prefix: window [0, 1, 2, 0] after a prompt of 2 tokens scores
    # tokens 2 and 0: ln 4 + ln 2; window [1, 1, 1, 1] scores 1, 1: 2 ln 4.
    model = FixedDistributionLM([0.5, 0.25, 0.25])
    windows = torch.tensor([[0, 1, 2, 0], [1, 1, 1, 1]])
    nll = continuation_nll(model, windows, start=2, batch_size=1)
    assert nll.tolist() == pytest.approx([3 * math.log(2), 4 * math.log(2)], rel=1e-6)
    assert continuation_nll(model, windows, start=3).tolist() == pytest.approx([math.log(2), math.log(4)], rel=1e-6)
    with pytest.raises(EvaluationError, match="0 < start < 4"):
        continuation_nll(model, windows, start=4)


def test_perplexity_bad_input():
    tok = CharTokenizer("ab")
    model = FixedDistributionLM([0.5, 0.5, 0.0 + 1e-9])
    with pytest.raises(EvaluationError, match="not enough tokens"):
        perplexity(model, tok, [""], seq_len=3, max_tokens=1)
    with pytest.raises(EvaluationError, match="positive"):
        perplexity(model, tok, ["ab"], batch_size=0)


def test_domain_perplexities_and_missing_split(tmp_path):
    tok = CharTokenizer("ab")
    corpus = write_corpus(tmp_path, {"code": ["ab", "ba"], "math": ["a"]})
    model = FixedDistributionLM([0.5, 0.25, 0.25])
    out = domain_perplexities(model, tok, corpus, domains=("code",), seq_len=3)
    assert out == {"code": pytest.approx(2 ** 1.75, rel=1e-9)}
    with pytest.raises(EvaluationError, match="no 'test' split for domain 'prose'"):
        domain_perplexities(model, tok, corpus, domains=("code", "prose"))
    with pytest.raises(EvaluationError, match="no 'validation' split"):
        domain_perplexities(model, tok, corpus, domains=("code",), split="validation")


# --------------------------------------------------------------------------- arithmetic


@pytest.mark.parametrize("completion, expected", [
    (" 19", 19), (" 19\nQ: 3+4=? A: 7", 19), (" -3", -3), (" 12 13", 12), ("x 7y", 7),
    ("", None), (" no digits", None), ("\n19", None), ("  007", 7),
])
def test_completion_answer(completion, expected):
    assert completion_answer(completion) == expected


def test_left_padded_batch():
    ids, mask = left_padded_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_arithmetic_exact_match_on_fixed_answer(tmp_path):
    corpus = write_corpus(tmp_path, {"math": ["Q: 12+7=? A: 19\nQ: 2*3=? A: 6\nnot a question", "Q: 10-1=? A: 9"]})
    tok = CharTokenizer("0123456789QA:+-*=? \n")
    model = FixedAnswerLM(tok(" 19\nQ: 9")["input_ids"])
    out = arithmetic_exact_match(model, tok, corpus, n=10, batch_size=2, max_new_tokens=4)
    assert (out["n"], out["correct"], out["accuracy"]) == (3, 1, pytest.approx(1 / 3))
    assert [e["predicted"] for e in out["examples"]] == [19, 19, 19]
    assert [e["correct"] for e in out["examples"]] == [True, False, False]
    assert out["examples"][0]["prompt"] == "Q: 12+7=? A:" and out["examples"][0]["completion"] == " 19\n"
    # batches of 2 then 1; "Q: 2*3=? A:" is one character shorter and is left padded with the pad id
    first_ids, first_mask = model.batches[0]
    assert first_mask.tolist() == [[1] * 12, [0] + [1] * 11]
    assert first_ids[1].tolist() == [tok.pad_token_id, *tok("Q: 2*3=? A:")["input_ids"]]
    assert len(model.batches) == 2 and model.batches[1][0].shape[0] == 1
    assert arithmetic_exact_match(model, tok, corpus, n=2)["n"] == 2
    for bad in (0, -1):
        with pytest.raises(MoePruneError, match="positive"):
            arithmetic_exact_match(model, tok, corpus, n=bad)


def test_arithmetic_greedy_is_deterministic_and_batch_independent(tiny_model, small_corpus):
    _, model, tok = tiny_model
    prompts = ["Q: 3+45=? A:", "Q: 7*8=? A:", "Q: 100-1=? A:", "Q: 1+1=? A:"]
    batched = greedy_completions(model, tok, prompts, max_new_tokens=5, batch_size=4)
    assert batched == greedy_completions(model, tok, prompts, max_new_tokens=5, batch_size=4)
    assert batched == greedy_completions(model, tok, prompts, max_new_tokens=5, batch_size=1)


# --------------------------------------------------------------------------- lm-eval tasks


def test_split_document_and_arithmetic_choices():
    text = "word " * 100
    context, continuation = split_document(text, prefix_chars=20, continuation_chars=12)
    assert context + continuation == text[:len(context) + 12]
    assert continuation[0].isspace() and 10 <= len(context) <= 20
    assert split_document("x" * 500, prefix_chars=20) is None  # no whitespace to cut at
    assert split_document("a b", prefix_chars=20) is None  # too short
    items = arithmetic_choice_items([("Q: 0+1=? A:", 1), ("Q: 5*5=? A:", 25)], 5, random.Random(0))
    for item, answer in zip(items, (1, 25)):
        values = [int(c) for c in item["choices"]]
        assert len(set(values)) == 4 and min(values) >= 0 and values[item["label"]] == answer
        assert all(c.startswith(" ") for c in item["choices"])


def test_lm_eval_task_files_load_and_match_the_documents(small_corpus, tmp_path):
    import_lm_eval()
    from lm_eval.tasks import TaskManager

    out = tmp_path / "tasks"
    names = write_lm_eval_tasks(small_corpus, out, n_docs=50)
    assert names == ["moeprune_cont_code", "moeprune_cont_prose", "moeprune_cont_legal", "moeprune_arith_mc",
                     *(f"moeprune_ppl_{d}" for d in DOMAINS)]
    data = {p.name: p.read_bytes() for p in out.iterdir()}
    assert write_lm_eval_tasks(small_corpus, out, n_docs=50, overwrite=True) == names
    assert {p.name: p.read_bytes() for p in out.iterdir()} == data  # deterministic
    with pytest.raises(MoePruneError, match="--overwrite"):
        write_lm_eval_tasks(small_corpus, out)

    docs = {d: [json.loads(line)["text"] for line in (small_corpus / d / "test.jsonl").read_text().splitlines()]
            for d in DOMAINS}
    tasks = TaskManager(include_path=str(out), include_defaults=False).load(names)["tasks"]
    assert set(tasks) == set(names)
    for name, task in tasks.items():
        rows = list(task.test_docs())
        assert rows, name
        for doc in rows:
            if task.OUTPUT_TYPE == "multiple_choice":
                context, choices, label = task.doc_to_text(doc), task.doc_to_choice(doc), task.doc_to_target(doc)
                assert len(set(choices)) == 4 and task.config.target_delimiter == ""
                if name == "moeprune_arith_mc":
                    assert any(context + choices[label] in text.splitlines() for text in docs["math"])
                else:
                    domain = name.removeprefix("moeprune_cont_")
                    assert all(len(c) == CONTINUATION_CHARS for c in choices)
                    assert sum(text.startswith(context + choices[label]) for text in docs[domain]) == 1
            else:
                assert task.OUTPUT_TYPE == "loglikelihood_rolling"
                assert task.doc_to_target(doc) in docs[name.removeprefix("moeprune_ppl_")]


def _document_nll(model, tokenizer, text: str) -> float:
    """-log p(text) given the tokenizer's bos token, in one forward (the document fits one window)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.encode(text) == ids  # lm-eval encodes with the tokenizer defaults: no extra tokens
    inp = torch.tensor([[tokenizer.bos_token_id, *ids]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=inp).logits[0, :-1].double(), dim=-1)
    return -float(logp.gather(1, inp[0, 1:, None]).sum())


def test_run_lm_eval_end_to_end_matches_own_log_likelihood(tiny_model, small_corpus):
    _, model, tok = tiny_model
    limit = 3
    results = run_lm_eval(model, tok, small_corpus, limit=limit, batch_size=4)
    assert set(results) == {"moeprune_cont_code", "moeprune_cont_prose", "moeprune_cont_legal",
                            "moeprune_arith_mc", *(f"moeprune_ppl_{d}" for d in DOMAINS)}
    for name, metrics in results.items():
        assert all(math.isfinite(v) for v in metrics.values()), name
        assert metrics["n_docs"] == limit
        if "_ppl_" in name:
            assert {"word_perplexity", "byte_perplexity", "bits_per_byte"} <= set(metrics)
        else:
            assert {"acc", "acc_norm"} <= set(metrics) and metrics["acc"] in {0, 1 / 3, 2 / 3, 1}
    for domain in DOMAINS:
        texts = [json.loads(line)["text"] for line in (small_corpus / domain / "test.jsonl").read_text().splitlines()]
        texts = texts[:limit]
        nll = sum(_document_nll(model, tok, t) for t in texts)
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        n_words = sum(len(re.split(r"\s+", t)) for t in texts)
        metrics = results[f"moeprune_ppl_{domain}"]
        assert metrics["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-4)
        assert metrics["byte_perplexity"] == pytest.approx(math.exp(nll / n_bytes), rel=1e-4)
        assert metrics["word_perplexity"] == pytest.approx(math.exp(nll / n_words), rel=1e-3)
    with pytest.raises(EvaluationError, match="unknown lm-eval task"):
        run_lm_eval(model, tok, small_corpus, tasks=["hellaswag"])
    with pytest.raises(EvaluationError, match="unknown lm-eval task"):
        run_lm_eval(model, tok, small_corpus, tasks=["moeprune_ppl_code"], domains=("math",))


def test_lm_eval_missing_says_how_to_install(monkeypatch, small_corpus, tiny_model):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(MoePruneError) as info:
        import_lm_eval()
    assert INSTALL_HINT in str(info.value)
    folder, _, _ = tiny_model
    with pytest.raises(MoePruneError, match=re.escape(INSTALL_HINT)):
        evaluate(folder, small_corpus, lm_eval=True)


# --------------------------------------------------------------------------- evaluate / CLI


def test_in_memory_and_saved_checkpoint_give_the_same_numbers(tiny_model, small_corpus):
    folder, model, tok = tiny_model
    kwargs = dict(seq_len=64, max_tokens=512, arithmetic=6, lm_eval=True, lm_eval_limit=2,
                  lm_eval_tasks=["moeprune_cont_code", "moeprune_ppl_math"])
    saved = evaluate(folder, small_corpus, **kwargs)
    memory = evaluate(model, small_corpus, tokenizer=tok, **kwargs)
    for key in ("perplexity", "arithmetic", "lm_eval"):
        assert saved[key] == memory[key]
    assert set(saved["perplexity"]) == set(DOMAINS) and saved["arithmetic"]["n"] == 6
    with pytest.raises(MoePruneError, match="tokenizer"):
        evaluate(model, small_corpus)


def test_evaluate_batch_size_reaches_perplexity(tiny_model, small_corpus, monkeypatch):
    """--batch-size sets the perplexity batches; the numbers do not depend on it."""
    import moeprune.evaluation.perplexity as perplexity_module

    folder, model, tok = tiny_model
    seen = []
    original = perplexity_module.stream_perplexity

    def recording(*args, batch_size=8, **kwargs):
        seen.append(batch_size)
        return original(*args, batch_size=batch_size, **kwargs)

    kwargs = dict(tokenizer=tok, domains=["code"], seq_len=64, max_tokens=512, arithmetic=0)
    eight = evaluate(model, small_corpus, **kwargs)
    monkeypatch.setattr(perplexity_module, "stream_perplexity", recording)
    one = evaluate(model, small_corpus, batch_size=1, **kwargs)
    assert seen == [1]
    assert one["perplexity"]["code"] == pytest.approx(eight["perplexity"]["code"], rel=1e-5)


def test_cli_eval_writes_json_and_refuses_bad_input(tiny_model, small_corpus, tmp_path, capsys):
    folder, _, _ = tiny_model
    out = tmp_path / "results.json"
    args = ["eval", str(folder), "--corpus", str(small_corpus), "--domains", "code", "math", "--max-tokens", "256",
            "--seq-len", "64", "--arithmetic", "4", "--out", str(out), "-q"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert set(result["perplexity"]) == {"code", "math"} and result["arithmetic"]["n"] == 4
    assert f"{result['perplexity']['code']:.3f}" in printed and "arithmetic exact match" in printed
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] == result["perplexity"]
    assert main(["eval", str(tmp_path / "missing"), "--corpus", str(small_corpus), "-q"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", str(folder), "--corpus", str(small_corpus), "--arithmetic", "-1", "-q"]) == 2
    assert "argument --arithmetic: must be >= 0, got -1" in capsys.readouterr().err
    assert main(["eval", str(folder), "--corpus", str(small_corpus), "--split", "validation", "-q"]) == 2
    assert "no 'validation' split" in capsys.readouterr().err


def test_eval_loads_in_the_given_dtype(tiny_model, small_corpus, capsys):
    """`moeprune eval --device cpu --dtype bfloat16` evaluates the checkpoint loaded in bfloat16:
    the perplexities are those of the bf16 model, and differ from float32's."""
    folder, model, tok = tiny_model
    bf16, _ = load_checkpoint(folder, device="cpu", dtype="bfloat16")
    assert next(bf16.parameters()).dtype == torch.bfloat16
    kwargs = dict(seq_len=64, max_tokens=256, arithmetic=0)
    expected = evaluate(bf16, small_corpus, tokenizer=tok, **kwargs)["perplexity"]
    assert evaluate(folder, small_corpus, device="cpu", dtype="bfloat16", **kwargs)["perplexity"] == expected
    assert evaluate(folder, small_corpus, **kwargs)["perplexity"] != expected
    assert main(["-q", "eval", str(folder), "--corpus", str(small_corpus), "--seq-len", "64", "--max-tokens", "256",
                 "--arithmetic", "0", "--dtype", "bfloat16", "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] == expected


def test_eval_reads_tokenizer_dir_for_a_bare_checkpoint(tiny_model, small_corpus, tmp_path, capsys):
    """`moeprune eval BARE --tokenizer DIR` for a checkpoint without tokenizer files gives the numbers of
    the complete checkpoint; without --tokenizer it is one clear error that offers the option."""
    import shutil

    from moeprune.calibration.data import tokenizer_files

    folder = tiny_model[0]
    bare = Path(shutil.copytree(folder, tmp_path / "bare"))
    for name in tokenizer_files(bare):
        (bare / name).unlink()
    argv = ["-q", "eval", str(bare), "--corpus", str(small_corpus), "--seq-len", "64", "--max-tokens", "256",
            "--arithmetic", "0", "--json"]
    assert main([*argv, "--tokenizer", str(folder)]) == 0
    expected = evaluate(folder, small_corpus, seq_len=64, max_tokens=256, arithmetic=0)["perplexity"]
    assert json.loads(capsys.readouterr().out)["perplexity"] == expected
    assert main(argv) == 2
    assert "--tokenizer DIR" in capsys.readouterr().err
