"""Train the testbed MoE models from scratch on CPU, for a fixed number of steps.

``train_testbed(recipe_name, corpus_dir, out_dir)`` trains one recipe of
:mod:`moeprune.testbed.models` on the train splits of every domain of the corpus built by
:mod:`moeprune.testbed.corpus`, and saves a normal Hugging Face checkpoint (``save_pretrained``,
safetensors) with its tokenizer and a ``testbed.json`` (recipe, steps, tokens seen, seed, final
train loss, held-out validation loss per domain, corpus manifest hash, timings).
``build_or_load_testbed(name)`` does all of it on first use (corpus, tokenizer, model) into a
cache folder and returns the cached checkpoint afterwards.

Training
--------
* Data: the train documents of all domains, each followed by ``<|endoftext|>``, shuffled with
  ``random.Random(seed)`` (a new permutation each epoch), concatenated and cut into blocks of
  ``seq_len`` tokens; ``batch_size`` consecutive blocks form a step.  Held-out splits are never
  read for training.
* Model: ``torch.manual_seed(seed)`` then the recipe's transformers class, float32 (much faster
  than bf16 on these CPUs).  AdamW (decay on matrices only), linear warmup then cosine decay to
  ``min_lr_ratio`` of the peak, gradient clipping at 1.0.
* Routers: for Mixtral and Qwen3-MoE the router logits are requested during training
  (``output_router_logits=True``) and the loss is ``LM loss + router_aux_loss_coef * aux`` where
  ``aux`` is the Switch load-balancing loss computed *per layer* and averaged
  (:func:`per_layer_balance_loss`).  transformers' own ``load_balancing_loss_func`` (what
  ``MixtralForCausalLM`` / ``Qwen3MoeForCausalLM`` add when given ``labels`` and
  ``output_router_logits``) sums the top-k counts and the router probabilities over all layers
  before multiplying them, so it balances "expert index i summed over layers" and lets each layer
  collapse: a 300-step ``mixtral`` run with it at 0.02 had, on 12k validation tokens per
  domain, 1-3 never-chosen experts per layer on code/prose/legal (3-6 on math), 3-5 experts per
  layer at about 0 % overall and experts with 22-24 % of a layer's routed slots (uniform:
  6.25 %), while its aux value sat near the balanced optimum (2.02).  The same run with the
  per-layer loss at 0.01 had no never-chosen expert in any layer on code/prose/legal, overall
  per-layer shares of 2-12 %, domain specialisation (on math 2-4 experts per layer went unused)
  and the same validation loss (code 5.42 vs 5.43).  The recipe coefficient (``router_aux_loss_coef``,
  also saved in the config) is therefore 0.01 for the per-layer loss (the transformers default
  0.001 collapses routing, per the issue's trial run).  The reported train loss is the LM loss
  without the aux term.  For DeepSeek-V3 transformers has no balancing loss; as in the real model, the trainer applies the
  auxiliary-loss-free bias update after every optimizer step: for every MoE layer with the
  expert loads ``load_j`` of that step's batch (top-k selections counted),
  ``e_score_correction_bias_j += gamma * sign(mean(load) - load_j)`` with ``gamma = 1e-3``.
  (DeepSeek-V3 also used a tiny sequence-wise balance loss; it is not implemented.)
* The number of steps is fixed per recipe and never depends on time or load.  Same seed, same
  corpus, same thread count -> same weights (float reductions may differ across thread counts).

Measured speed and chosen steps
-------------------------------
Tokens/s of real training steps on the default corpus (first 3 steps not timed), transformers
5.23, torch 2.13 CPU (AMD EPYC, 2 cores, AVX-512), default ``grouped_mm`` experts implementation
(``eager`` measured within noise of it), measured with::

    python scripts/build_testbed.py --benchmark 20 --threads 2 --all --corpus DIR

The machine is shared with other engineers, so the load was recorded with every measurement
(``uptime``; the numbers below include our own 2 threads):

* column A, 2 threads, machine nearly idle: load average 1.1-1.8 while measuring, CPU time / wall
  time 1.98 (both cores were ours);
* column B, 2 threads, machine busy with other jobs: load average 2.8-3.0.  Under contention two
  OpenMP threads wait for each other and run 3-8x *slower* than one thread;
* column C, 1 thread (``--benchmark 10 --threads 1``), one other job holding the other core:
  load average about 2, CPU time / wall time 0.99-1.0.

Step counts are chosen from column A so that each large recipe trains in at most about 20
minutes (``mixtral``, the default testbed, in about 15, leaving time for the main job's pruning and
evaluation).

==========  ======  ===========  =========  =========  =========  =====  ===========  =========
recipe      params  tokens/step  A tok/s    B tok/s    C tok/s    steps  tokens seen  time at A
==========  ======  ===========  =========  =========  =========  =====  ===========  =========
mixtral     15.5M   16 x 256     4,399      870        2,713      1000   4.10M        15.5 min
qwen3moe    15.5M   16 x 256     2,983      1,324      1,964      750    3.07M        17.2 min
deepseekv3  12.6M   16 x 256     4,431      822        2,512      1100   4.51M        16.9 min
tiny        0.35M   16 x 128     49,693     5,250      41,796     600    1.23M        25 s
==========  ======  ===========  =========  =========  =========  =====  ===========  =========

A whole ``tiny`` build on the nearly idle machine (corpus, tokenizer, model, 400 steps at the
time, save) took 25 s; with 300 steps on the busy machine it took 86 s.  The default corpus holds
about 2.7M train tokens with the 4096-token tokenizer (3.4M with 1024), so the large recipes see
their train split 1.1-1.7 times.  On a busy shared machine ``threads=1`` (``--threads 1``) is
faster than 2 threads.  The thread count used is recorded in ``testbed.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from moeprune.testbed.corpus import (
    DOMAINS,
    build_corpus,
    corpus_is_built,
    load_domain,
    manifest_hash,
)
from moeprune.testbed.corpus import FORMAT_VERSION as CORPUS_FORMAT_VERSION
from moeprune.testbed.models import (
    TRAIN_CODE_VERSION,
    TestbedRecipe,
    build_model,
    count_parameters,
    get_recipe,
    recipe_hash,
    with_steps,
)

logger = logging.getLogger(__name__)

TESTBED_JSON = "testbed.json"
DEFAULT_CACHE_ENV = "MOEPRUNE_CACHE"
VAL_SEQS_PER_DOMAIN = 16


# --------------------------------------------------------------------------- paths / caching


def default_cache_root() -> Path:
    """``$MOEPRUNE_CACHE/testbeds`` if set, else ``~/.cache/moeprune/testbeds``."""
    env = os.environ.get(DEFAULT_CACHE_ENV)
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "moeprune"
    return base / "testbeds"


def ensure_corpus(root: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """The testbed corpus ``<root>/corpus-v<format>-seed<seed>`` (root: :func:`default_cache_root`),
    built with ``build_corpus`` when missing or incomplete."""
    root = Path(root).expanduser() if root is not None else default_cache_root()
    corpus_dir = root / f"corpus-v{CORPUS_FORMAT_VERSION}-seed{seed}"
    if not corpus_is_built(corpus_dir):
        logger.info("building corpus in %s ...", corpus_dir)
        build_corpus(corpus_dir, seed=seed)
    return corpus_dir


def testbed_dir_name(name: str) -> str:
    return f"{name}-{recipe_hash(name)}"


# --------------------------------------------------------------------------- tokenizer


def corpus_train_texts(corpus_dir: str | os.PathLike) -> list[str]:
    """All train documents, domain by domain in :data:`DOMAINS` order, in file order."""
    texts: list[str] = []
    for d in DOMAINS:
        texts.extend(load_domain(corpus_dir, d, "train"))
    return texts


def get_corpus_tokenizer(corpus_dir: str | os.PathLike, vocab_size: int):
    """The byte-level BPE tokenizer (digits split) trained on the corpus train splits, cached in
    ``corpus_dir/tokenizers/bpe-<vocab>/`` and retrained when the corpus changed."""
    from transformers import PreTrainedTokenizerFast

    from moeprune.tokenizer import train_bpe_tokenizer

    corpus_dir = Path(corpus_dir)
    folder = corpus_dir / "tokenizers" / f"bpe-{int(vocab_size)}"
    stamp = folder / "corpus_manifest.sha256"
    mhash = manifest_hash(corpus_dir)
    if stamp.is_file() and stamp.read_text().strip() == mhash:
        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    tok = train_bpe_tokenizer(corpus_train_texts(corpus_dir), vocab_size=int(vocab_size), split_digits=True)
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tok.save_pretrained(str(tmp))
    (tmp / "corpus_manifest.sha256").write_text(mhash + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


# --------------------------------------------------------------------------- data


def _encode_docs(tokenizer, docs: list[str]) -> list[list[int]]:
    eos = tokenizer.eos_token_id
    out = []
    for i in range(0, len(docs), 256):
        enc = tokenizer(docs[i:i + 256], add_special_tokens=False)["input_ids"]
        out.extend(ids + [eos] for ids in enc)
    return out


class TokenBatches:
    """Deterministic stream of ``[batch_size, seq_len]`` training batches from tokenized documents:
    per epoch a ``random.Random`` permutation of the documents (seeded by ``seed`` and the epoch),
    concatenated and cut into blocks."""

    def __init__(self, docs: list[list[int]], batch_size: int, seq_len: int, seed: int):
        if not docs:
            raise ValueError("no training documents")
        self.docs = docs
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.n_tokens = sum(len(d) for d in docs)
        if self.n_tokens < batch_size * seq_len:
            raise ValueError(f"corpus has {self.n_tokens} tokens, fewer than one batch ({batch_size}x{seq_len})")

    def __iter__(self) -> Iterator:
        import torch

        epoch = 0
        while True:
            order = list(range(len(self.docs)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            flat = torch.tensor([t for i in order for t in self.docs[i]], dtype=torch.long)
            n_blocks = flat.numel() // self.seq_len
            blocks = flat[: n_blocks * self.seq_len].view(n_blocks, self.seq_len)
            for b in range(0, n_blocks - self.batch_size + 1, self.batch_size):
                yield blocks[b:b + self.batch_size]
            epoch += 1


def _val_blocks(tokenizer, corpus_dir, domain: str, seq_len: int, n_seqs: int):
    import torch

    docs = _encode_docs(tokenizer, load_domain(corpus_dir, domain, "validation"))
    flat = torch.tensor([t for d in docs for t in d], dtype=torch.long)
    n = min(n_seqs, flat.numel() // seq_len)
    if n == 0:
        return None
    return flat[: n * seq_len].view(n, seq_len)


# --------------------------------------------------------------------------- training pieces


@contextmanager
def _num_threads(threads: int | None):
    import torch

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def _lr_lambda(recipe: TestbedRecipe):
    warm = max(1, recipe.warmup_steps)
    total = max(recipe.steps, warm + 1)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _optimizer(model, recipe: TestbedRecipe):
    import torch

    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=tuple(recipe.betas), eps=1e-8)


def _routers(model) -> list[tuple[str, object]]:
    """``(name, module)`` of every top-k router (Mixtral / Qwen3-MoE / DeepSeek-V3 routers return
    ``(logits, weights, indices)``)."""
    return [(n, m) for n, m in model.named_modules()
            if "router" in type(m).__name__.lower() and hasattr(m, "top_k") and hasattr(m, "num_experts")]


class RouterLoadRecorder:
    """Counts, per router, how often each expert is among the top-k choices (forward hooks)."""

    def __init__(self, model):
        self.routers = _routers(model)
        self.loads: dict[str, object] = {}
        self._handles = [m.register_forward_hook(self._make_hook(n)) for n, m in self.routers]

    def _make_hook(self, name: str):
        def hook(module, args, output):
            import torch

            idx = output[2].detach()
            counts = torch.bincount(idx.reshape(-1), minlength=int(module.num_experts))
            prev = self.loads.get(name)
            self.loads[name] = counts if prev is None else prev + counts

        return hook

    def reset(self) -> None:
        self.loads.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def summary(self) -> dict[str, dict]:
        """Per router: share of routed slots of the busiest expert, number of never-chosen experts,
        and the normalized entropy of the load (1.0 = perfectly uniform)."""
        out = {}
        for name, load in self.loads.items():
            p = load.double() / max(1, int(load.sum()))
            nz = p[p > 0]
            entropy = float(-(nz * nz.log()).sum() / math.log(p.numel())) if p.numel() > 1 else 1.0
            out[name] = {"max_share": round(float(p.max()), 4), "unused": int((load == 0).sum()),
                         "load_entropy": round(entropy, 4)}
        return out


class BiasBalancer:
    """DeepSeek-V3's auxiliary-loss-free load balancing: records each router's top-k choices in the
    forward pass, and after the optimizer step moves ``e_score_correction_bias`` of every router by
    ``gamma * sign(mean_load - load_j)``."""

    def __init__(self, model, gamma: float):
        self.gamma = float(gamma)
        self.routers = [m for _, m in _routers(model) if hasattr(m, "e_score_correction_bias")]
        if not self.routers:
            raise ValueError("bias_update_gamma is set but the model has no router with e_score_correction_bias")
        self._loads: dict[int, object] = {}
        self._handles = [r.register_forward_hook(self._hook) for r in self.routers]

    def _hook(self, module, args, output):
        import torch

        if not module.training:
            return
        idx = output[2].detach()
        counts = torch.bincount(idx.reshape(-1), minlength=module.e_score_correction_bias.numel())
        prev = self._loads.get(id(module))
        self._loads[id(module)] = counts if prev is None else prev + counts

    def step(self) -> None:
        import torch

        with torch.no_grad():
            for r in self.routers:
                load = self._loads.get(id(r))
                if load is None:
                    continue
                load = load.to(torch.float32)
                r.e_score_correction_bias.add_(self.gamma * torch.sign(load.mean() - load))
        self._loads.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@dataclass
class _StepResult:
    loss: float
    lm_loss: float
    aux_loss: float | None


def per_layer_balance_loss(router_logits, top_k: int):
    """Switch-Transformer load-balancing loss computed for every MoE layer and averaged over layers:
    ``E * sum_i f_i * P_i`` per layer, with ``f_i`` the fraction of tokens whose top-k (of the
    softmax) holds expert ``i`` and ``P_i`` the mean router probability of ``i``.  Perfect balance
    gives ``top_k``.

    transformers 5.23's ``load_balancing_loss_func`` (Mixtral, Qwen3-MoE) instead sums counts and
    probabilities over all layers *before* the product, which balances the expert indices summed
    over layers but lets single layers collapse; this is the per-layer version.
    """
    import torch

    losses = []
    for logits in router_logits:
        logits = logits.float()
        num_experts = logits.shape[-1]
        probs = torch.softmax(logits, dim=-1)
        top = torch.topk(probs, top_k, dim=-1).indices
        counts = torch.zeros(num_experts, dtype=probs.dtype, device=probs.device)
        counts.scatter_add_(0, top.reshape(-1), torch.ones(top.numel(), dtype=probs.dtype, device=probs.device))
        f = counts / logits.shape[0]
        losses.append(num_experts * torch.sum(f * probs.mean(dim=0)))
    return torch.stack(losses).mean()


def causal_lm_loss(logits, input_ids):
    """Mean next-token cross-entropy (the same as transformers' loss with ``labels=input_ids``)."""
    import torch

    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1)
    )


def _train_step(model, batch, optimizer, scheduler, recipe: TestbedRecipe, use_aux: bool,
                balancer: BiasBalancer | None) -> _StepResult:
    import torch

    aux = None
    if use_aux:
        out = model(input_ids=batch, output_router_logits=True, use_cache=False)
        lm = causal_lm_loss(out.logits, batch)
        aux = per_layer_balance_loss(out.router_logits, int(model.config.num_experts_per_tok))
        loss = lm + float(recipe.router_aux_loss_coef) * aux
    else:
        out = model(input_ids=batch, labels=batch, use_cache=False)
        loss = lm = out.loss
    loss.backward()
    if recipe.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if balancer is not None:
        balancer.step()
    return _StepResult(float(loss.detach()), float(lm.detach()), None if aux is None else float(aux.detach()))


def _eval_loss(model, blocks, batch_size: int) -> float:
    import torch

    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, blocks.shape[0], batch_size):
            b = blocks[i:i + batch_size]
            out = model(input_ids=b, labels=b, use_cache=False)
            total += float(out.loss) * b.shape[0]
            n += b.shape[0]
    model.train()
    return total / max(1, n)


# --------------------------------------------------------------------------- public API


def train_testbed(
    recipe_name: str | TestbedRecipe,
    corpus_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    steps: int | None = None,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
) -> Path:
    """Train a testbed recipe from scratch on the corpus train splits and save it to ``out_dir``.

    ``steps`` overrides the recipe's fixed step count (warmup shrinks to fit); ``threads`` sets
    ``torch.set_num_threads`` for the run (None: leave torch's setting).  The checkpoint is written
    to a temporary sibling folder and renamed, so ``out_dir`` either holds a complete checkpoint or
    nothing.  Returns ``out_dir``.
    """
    import torch
    from tqdm.auto import tqdm

    recipe = get_recipe(recipe_name) if isinstance(recipe_name, str) else recipe_name
    if steps is not None:
        recipe = with_steps(recipe, steps)
    corpus_dir = Path(corpus_dir)
    out_dir = Path(out_dir)
    if not corpus_is_built(corpus_dir):
        raise FileNotFoundError(f"no complete corpus in {corpus_dir}; build it with scripts/build_corpus.py")

    t_start = time.time()
    with _num_threads(threads) as n_threads:
        tokenizer = get_corpus_tokenizer(corpus_dir, recipe.vocab_size)
        docs: list[list[int]] = []
        for d in DOMAINS:
            docs.extend(_encode_docs(tokenizer, load_domain(corpus_dir, d, "train")))
        data = TokenBatches(docs, recipe.batch_size, recipe.seq_len, seed)
        vocab = len(tokenizer)
        model = build_model(recipe, vocab_size=vocab, seed=seed, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
        model.train()
        use_aux = recipe.router_aux_loss_coef is not None and hasattr(model.config, "router_aux_loss_coef")
        balancer = BiasBalancer(model, recipe.bias_update_gamma) if recipe.bias_update_gamma else None
        optimizer = _optimizer(model, recipe)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(recipe))

        t_prep = time.time() - t_start
        lm_hist: list[float] = []
        aux_hist: list[float] = []
        t_train = time.time()
        bar = tqdm(total=recipe.steps, desc=f"train {recipe.name}", unit="step", disable=not progress,
                   dynamic_ncols=True, mininterval=1.0)
        batches = iter(data)
        for step in range(recipe.steps):
            res = _train_step(model, next(batches), optimizer, scheduler, recipe, use_aux, balancer)
            if not math.isfinite(res.loss):
                bar.close()
                raise FloatingPointError(f"training loss became {res.loss} at step {step} of {recipe.name}")
            lm_hist.append(res.lm_loss)
            if res.aux_loss is not None:
                aux_hist.append(res.aux_loss)
            bar.update(1)
            if step % 10 == 0 or step == recipe.steps - 1:
                elapsed = time.time() - t_train
                bar.set_postfix(loss=f"{res.lm_loss:.3f}",
                                tok_s=f"{(step + 1) * recipe.tokens_per_step / max(elapsed, 1e-9):.0f}")
        bar.close()
        train_seconds = time.time() - t_train
        if balancer is not None:
            balancer.remove()

        val = {}
        recorder = RouterLoadRecorder(model)
        for d in DOMAINS:
            blocks = _val_blocks(tokenizer, corpus_dir, d, recipe.seq_len, VAL_SEQS_PER_DOMAIN)
            if blocks is not None:
                val[d] = round(_eval_loss(model, blocks, recipe.batch_size), 5)
        routing = recorder.summary()
        recorder.remove()

    tail = lm_hist[-20:]
    info = {
        "recipe": recipe.name,
        "recipe_hash": recipe_hash(recipe),
        "recipe_fields": recipe.to_dict(),
        "model_class": recipe.model_class,
        "parameters": count_parameters(model),
        "steps": recipe.steps,
        "tokens_per_step": recipe.tokens_per_step,
        "tokens_seen": recipe.steps * recipe.tokens_per_step,
        "train_corpus_tokens": data.n_tokens,
        "epochs": round(recipe.steps * recipe.tokens_per_step / data.n_tokens, 3),
        "seed": int(seed),
        "threads": n_threads,
        "final_train_loss": round(sum(tail) / len(tail), 5),
        "first_train_loss": round(lm_hist[0], 5),
        "final_aux_loss": round(sum(aux_hist[-20:]) / len(aux_hist[-20:]), 5) if aux_hist else None,
        "validation_loss": val,
        "validation_routing": routing,
        "router_aux_loss_coef": recipe.router_aux_loss_coef if use_aux else None,
        "output_router_logits_during_training": bool(use_aux),
        "bias_update_gamma": recipe.bias_update_gamma,
        "corpus_manifest_sha256": manifest_hash(corpus_dir),
        "corpus_format_version": CORPUS_FORMAT_VERSION,
        "train_code_version": TRAIN_CODE_VERSION,
        "train_seconds": round(train_seconds, 1),
        "prep_seconds": round(t_prep, 1),
        "tokens_per_second": round(recipe.steps * recipe.tokens_per_step / max(train_seconds, 1e-9), 1),
        "versions": {"torch": torch.__version__, "transformers": _transformers_version(),
                     "python": sys.version.split()[0]},
    }

    model.config.output_router_logits = False
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / TESTBED_JSON).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def measure_throughput(recipe_name: str, corpus_dir: str | os.PathLike, steps: int = 20, skip: int = 3,
                       threads: int | None = 2, seed: int = 0) -> dict:
    """Tokens/s of ``steps`` real training steps of a recipe (the first ``skip`` not timed)."""
    import torch

    recipe = get_recipe(recipe_name)
    with _num_threads(threads) as n_threads:
        tokenizer = get_corpus_tokenizer(corpus_dir, recipe.vocab_size)
        docs = _encode_docs(tokenizer, load_domain(corpus_dir, "code", "train")[:400]
                            + load_domain(corpus_dir, "math", "train")[:200])
        data = iter(TokenBatches(docs, recipe.batch_size, recipe.seq_len, seed))
        model = build_model(recipe, vocab_size=len(tokenizer), seed=seed, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id)
        model.train()
        use_aux = recipe.router_aux_loss_coef is not None
        balancer = BiasBalancer(model, recipe.bias_update_gamma) if recipe.bias_update_gamma else None
        opt = _optimizer(model, recipe)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(recipe))
        t0 = None
        for i in range(steps + skip):
            if i == skip:
                t0, c0 = time.time(), time.process_time()
            _train_step(model, next(data), opt, sched, recipe, use_aux, balancer)
        dt = time.time() - t0
        dc = time.process_time() - c0
    tps = steps * recipe.tokens_per_step / dt
    return {"recipe": recipe.name, "threads": n_threads, "steps": steps, "seconds": round(dt, 2),
            "tokens_per_second": round(tps, 1), "seconds_per_step": round(dt / steps, 3),
            "cpu_seconds": round(dc, 2),
            "parameters": count_parameters(model), "recipe_steps": recipe.steps,
            "estimated_train_minutes": round(recipe.steps * dt / steps / 60, 1),
            "load_average": os.getloadavg()}


def build_or_load_testbed(name: str = "mixtral", cache_dir: str | os.PathLike | None = None, seed: int = 0,
                          progress: bool = True, threads: int | None = None) -> Path:
    """The checkpoint folder of a testbed, trained on first use.

    Looks for ``<cache>/<name>-<recipe hash>/testbed.json`` (cache: ``cache_dir``, else
    ``$MOEPRUNE_CACHE/testbeds``, else ``~/.cache/moeprune/testbeds``); if missing, builds the
    corpus (``<cache>/corpus-v<format>-seed<seed>``, reused when complete), the tokenizer and the
    model there.  ``seed`` other than 0 gets its own folder (``...-seed<seed>``).
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    folder = root / (testbed_dir_name(name) + (f"-seed{seed}" if seed else ""))
    if (folder / TESTBED_JSON).is_file() and (folder / "config.json").is_file():
        return folder
    get_recipe(name)  # fail early on an unknown name
    corpus_dir = ensure_corpus(root, seed)
    logger.info("training testbed %r into %s (fixed %d steps; about 16 minutes on 2 idle cores) ...",
                name, folder, get_recipe(name).steps)
    return train_testbed(name, corpus_dir, folder, seed=seed, threads=threads, progress=progress)
