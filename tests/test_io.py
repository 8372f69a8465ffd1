"""Tests of moeprune.io: lazy reader, streaming writer, safe output folders, companion files."""

from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

import moeprune.io.checkpoint as checkpoint_mod
from moeprune.errors import MoePruneError, OutputExistsError
from moeprune.io.checkpoint import INDEX_NAME, LazyCheckpoint, MissingTensorError, read_safetensors_header
from moeprune.io.files import copy_companion_files, write_model_card
from moeprune.io.output import atomic_write_json, atomic_write_text, check_output, prepared_output
from moeprune.io.writer import (
    TensorSpec,
    build_header,
    parse_size,
    plan_shards,
    shard_file_names,
    write_sharded,
)

CONFIG = {"model_type": "mixtral", "num_local_experts": 4, "transformers_version": "5.0.0"}


# ----------------------------------------------------------------------------- helpers / fixtures
def _tensors() -> dict[str, torch.Tensor]:
    """A small MoE-like state dict with mixed dtypes, a 0-dim and an empty tensor."""
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(10, 4, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.gate.weight": torch.randn(4, 4, generator=g),
        "model.layers.0.mlp.experts.down_proj": torch.randn(4, 4, 3, generator=g).to(torch.float16),
        "model.layers.1.mlp.gate.weight": torch.randn(4, 4, generator=g),
        "model.layers.1.mlp.experts.down_proj": torch.randn(4, 4, 3, generator=g).to(torch.float16),
        "model.norm.weight": torch.ones(4, dtype=torch.float64),
        "step": torch.tensor(7, dtype=torch.int64),
        "empty": torch.zeros(0, 3, dtype=torch.int32),
    }


def _raw(t: torch.Tensor) -> bytes:
    """Raw bytes of a tensor, any dtype or rank."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes."""
    return a.dtype == b.dtype and a.shape == b.shape and _raw(a) == _raw(b)


@pytest.fixture
def single_ckpt(tmp_path: Path) -> Path:
    folder = tmp_path / "single"
    folder.mkdir()
    save_file(_tensors(), folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


@pytest.fixture
def sharded_ckpt(tmp_path: Path) -> Path:
    """A hand-made 2-shard checkpoint with an index (layer 0 + embeddings in shard 1)."""
    folder = tmp_path / "sharded"
    folder.mkdir()
    tensors = _tensors()
    first = {k: v for k, v in tensors.items() if "layers.0" in k or "embed" in k}
    second = {k: v for k, v in tensors.items() if k not in first}
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    weight_map = {}
    for name, part in zip(names, (first, second)):
        save_file(part, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


def _leftovers(parent: Path) -> list[str]:
    """Temporary / aside entries left in ``parent``."""
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# ----------------------------------------------------------------------------- lazy reader
def test_reader_header_only_then_get(single_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = _tensors()

    def no_data(*args: object, **kwargs: object) -> None:
        raise AssertionError("tensor data must not be opened for header queries")

    monkeypatch.setattr(checkpoint_mod, "safe_open", no_data)
    ck = LazyCheckpoint(single_ckpt)
    assert ck.keys() == sorted(tensors)
    assert len(ck) == len(tensors) and "step" in ck and "nope" not in ck
    for name, t in tensors.items():
        assert ck.shape(name) == tuple(t.shape)
        assert ck.dtype(name) == t.dtype
        assert ck.shard_of(name) == single_ckpt / "model.safetensors"
    assert ck.total_bytes() == sum(t.numel() * t.element_size() for t in tensors.values())
    assert len(ck.fingerprint()) == 16
    monkeypatch.undo()
    with LazyCheckpoint(single_ckpt) as ck:
        for name, t in tensors.items():
            assert _same(ck.get(name), t), name
        assert ck.read_config()["num_local_experts"] == 4
    assert ck._open_handle is None  # closed by the context manager


def test_reader_sharded_index(sharded_ckpt: Path) -> None:
    ck = LazyCheckpoint(sharded_ckpt)
    shards = ck.shard_files()
    assert [p.name for p in shards] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert ck.shard_of("model.layers.0.mlp.gate.weight") == shards[0]
    assert ck.shard_of("model.layers.1.mlp.gate.weight") == shards[1]
    assert ck.keys_with_prefix("model.layers.1.") == [
        "model.layers.1.mlp.experts.down_proj",
        "model.layers.1.mlp.gate.weight",
    ]
    index = json.loads((sharded_ckpt / INDEX_NAME).read_text())
    assert ck.total_bytes() == index["metadata"]["total_size"]
    by_shard = ck.keys_by_shard()
    assert sorted(k for ks in by_shard.values() for k in ks) == ck.keys()
    assert ck.get("model.layers.1.mlp.gate.weight").shape == (4, 4)
    assert ck._open_shard == shards[1]
    assert _same(ck.get("model.embed_tokens.weight"), _tensors()["model.embed_tokens.weight"])
    assert ck._open_shard == shards[0]  # one handle at a time: switched shards


def test_reader_folder_without_index(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2)}, tmp_path / "part-a.safetensors")
    save_file({"b": torch.ones(3, dtype=torch.bfloat16)}, tmp_path / "part-b.safetensors")
    ck = LazyCheckpoint(tmp_path)
    assert ck.keys() == ["a", "b"]
    assert ck.shard_of("b").name == "part-b.safetensors"
    assert _same(ck.get("b"), torch.ones(3, dtype=torch.bfloat16))
    save_file({"a": torch.zeros(2)}, tmp_path / "part-c.safetensors")
    with pytest.raises(MoePruneError, match="appears in both"):
        LazyCheckpoint(tmp_path)


def test_reader_errors(tmp_path: Path, sharded_ckpt: Path) -> None:
    (tmp_path / "bins").mkdir()
    (tmp_path / "bins" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(MoePruneError, match="safe_serialization=True") as info:
        LazyCheckpoint(tmp_path / "bins")
    assert str(tmp_path / "bins") in str(info.value)
    with pytest.raises(MoePruneError, match="does not exist"):
        LazyCheckpoint(tmp_path / "missing")
    ck = LazyCheckpoint(sharded_ckpt)
    with pytest.raises(MissingTensorError, match="not in checkpoint") as missing:
        ck.get("model.layers.9.mlp.gate.weight")
    assert isinstance(missing.value, KeyError)
    (sharded_ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MoePruneError, match="missing"):
        LazyCheckpoint(sharded_ckpt)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(MoePruneError, match="not a valid safetensors"):
        LazyCheckpoint(tmp_path / "bad")


def test_get_rows(sharded_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ck = LazyCheckpoint(sharded_ckpt)
    full = _tensors()
    calls: list[str] = []
    real_handle = ck._handle

    class Spy:
        def __init__(self, inner: object) -> None:
            self.inner = inner

        def get_slice(self, name: str) -> object:
            calls.append("slice")
            return self.inner.get_slice(name)

        def get_tensor(self, name: str) -> torch.Tensor:
            calls.append("full")
            return self.inner.get_tensor(name)

    monkeypatch.setattr(ck, "_handle", lambda shard: Spy(real_handle(shard)))
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.experts.down_proj", "model.norm.weight"):
        t = full[name]
        for idx in ([0], [1, 2], [3, 0, 1], [2, 2, 0], list(range(t.shape[0]))):
            assert _same(ck.get_rows(name, idx), t.index_select(0, torch.tensor(idx))), (name, idx)
    assert calls and set(calls) == {"slice"}  # rows were read through get_slice, never whole
    empty = ck.get_rows("model.embed_tokens.weight", [])
    assert empty.shape == (0, 4) and empty.dtype == torch.bfloat16
    with pytest.raises(IndexError):
        ck.get_rows("model.norm.weight", [4])
    with pytest.raises(ValueError, match="0-dimensional"):
        ck.get_rows("step", [0])


def test_fingerprint(tmp_path: Path, single_ckpt: Path, sharded_ckpt: Path) -> None:
    fp = LazyCheckpoint(single_ckpt).fingerprint()
    assert fp == LazyCheckpoint(single_ckpt).fingerprint()
    assert all(c in "0123456789abcdef" for c in fp)
    copy = shutil.copytree(single_ckpt, tmp_path / "copy")
    assert LazyCheckpoint(copy).fingerprint() == fp
    assert LazyCheckpoint(sharded_ckpt).fingerprint() == fp  # same tensors, other sharding
    # a mere re-save with another transformers version keeps it
    (copy / "config.json").write_text(json.dumps({**CONFIG, "transformers_version": "9.9"}, indent=4))
    assert LazyCheckpoint(copy).fingerprint() == fp
    (copy / "config.json").write_text(json.dumps({**CONFIG, "num_local_experts": 3}))
    assert LazyCheckpoint(copy).fingerprint() != fp
    (copy / "config.json").write_text(json.dumps(CONFIG))
    tensors = _tensors()
    tensors["model.norm.weight"] = torch.ones(5, dtype=torch.float64)  # one shape changes
    save_file(tensors, copy / "model.safetensors")
    assert LazyCheckpoint(copy).fingerprint() != fp


# ----------------------------------------------------------------------------- writer
def test_parse_size_and_names() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("5GiB") == 5 * 2**30
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size(" 1.5 kb ") == 1500
    assert parse_size(4096) == 4096
    for bad in ("5XB", "", "-1GB", 0, "GB"):
        with pytest.raises(MoePruneError):
            parse_size(bad)
    assert shard_file_names(1) == ["model.safetensors"]
    assert shard_file_names(3) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def test_plan_shards_boundaries() -> None:
    f32 = lambda name, n: TensorSpec(name, (n,), torch.float32)  # noqa: E731 - 4n bytes
    specs = [f32("a", 10), f32("b", 15), f32("c", 30), f32("d", 1), f32("e", 0)]
    plan = plan_shards(specs, 100)  # 40 + 60 fits exactly; c (120) alone; d, e together
    assert [[s.name for s in shard] for shard in plan] == [["a", "b"], ["c"], ["d", "e"]]
    assert plan_shards(specs, "1KB") == [specs]
    assert plan_shards([], 100) == []
    with pytest.raises(ValueError, match="twice"):
        plan_shards([f32("a", 1), f32("a", 2)], 100)
    with pytest.raises(ValueError, match="cannot be stored"):
        TensorSpec("x", (2,), torch.float4_e2m1fn_x2 if hasattr(torch, "float4_e2m1fn_x2") else torch.quint8)


def test_writer_matches_save_file_bytes(tmp_path: Path) -> None:
    tensors = _tensors()
    ref = tmp_path / "ref.safetensors"
    save_file(tensors, ref, metadata={"format": "pt"})
    header, _ = read_safetensors_header(ref)
    order = [k for k in header if k != "__metadata__"]  # safetensors' own layout order
    specs = [TensorSpec.of(n, tensors[n]) for n in order]
    paths = write_sharded(tmp_path / "out", specs, tensors.__getitem__, progress=False)
    assert paths == [tmp_path / "out" / "model.safetensors"]
    assert paths[0].read_bytes() == ref.read_bytes()  # same layout -> byte-identical file
    assert not (tmp_path / "out" / INDEX_NAME).exists()
    assert len(build_header([TensorSpec.of("x", tensors["step"])])) % 8 == 0


def test_writer_sharded_round_trip_and_index(tmp_path: Path) -> None:
    tensors = _tensors()
    specs = [TensorSpec.of(n, t) for n, t in tensors.items()]
    out = tmp_path / "out"
    produced: list[str] = []
    alive: list[weakref.ref] = []

    def produce(name: str) -> torch.Tensor:
        # refcounting frees a dropped tensor at once (no gc.collect: it costs ~0.15 s with torch loaded)
        assert all(r() is None for r in alive), "writer kept a previous tensor alive"
        produced.append(name)
        t = tensors[name].clone()
        alive.append(weakref.ref(t))
        return t

    paths = write_sharded(out, specs, produce, max_shard_bytes=100, progress=False)
    plan = plan_shards(specs, 100)
    assert produced == [s.name for s in specs]  # once each, in plan order
    assert [p.name for p in paths] == shard_file_names(len(plan)) and len(paths) > 2
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in specs)
    assert set(index["weight_map"]) == set(tensors)
    for path, shard in zip(paths, plan):
        with safe_open(str(path), framework="pt") as fh:
            assert list(fh.keys()) == sorted(s.name for s in shard)
            assert fh.metadata() == {"format": "pt"}
            for spec in shard:
                assert index["weight_map"][spec.name] == path.name
                assert _same(fh.get_tensor(spec.name), tensors[spec.name])
    assert sum(s.nbytes for s in plan[0]) <= 100
    ck = LazyCheckpoint(out)
    assert ck.keys() == sorted(tensors) and ck.total_bytes() == index["metadata"]["total_size"]
    # the index as Hugging Face loaders consume it (buffer names cannot contain dots)
    from huggingface_hub import load_torch_model

    flat = {n.replace(".", "_"): t for n, t in tensors.items()}
    module = torch.nn.Module()
    for name, t in flat.items():
        module.register_buffer(name, torch.empty_like(t))
    write_sharded(tmp_path / "flat", [TensorSpec.of(n, t) for n, t in flat.items()], flat.__getitem__,
                  max_shard_bytes=100, progress=False)
    load_torch_model(module, tmp_path / "flat", strict=True)
    for name, t in flat.items():
        assert _same(getattr(module, name), t)


def test_writer_dtype_coverage(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, 5, generator=g) * 3
    tensors: dict[str, torch.Tensor] = {
        "bool": base > 0,
        "scalar_bf16": torch.tensor(1.25, dtype=torch.bfloat16),
        "empty_f16": torch.zeros(2, 0, dtype=torch.float16),
    }
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                  torch.int16, torch.int8, torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2):
        tensors[str(dtype)] = base.to(dtype)
    tensors["sliced_view"] = base.to(torch.bfloat16)[1:, 1:]  # non-contiguous input
    specs = [TensorSpec.of(n, t) for n, t in tensors.items()]
    write_sharded(tmp_path / "out", specs, tensors.__getitem__, max_shard_bytes="64B", progress=False)
    save_file({n: t.contiguous() for n, t in tensors.items()}, tmp_path / "ref.safetensors")
    ck = LazyCheckpoint(tmp_path / "out")
    with safe_open(str(tmp_path / "ref.safetensors"), framework="pt") as ref:
        for name in tensors:
            assert ck.dtype(name) == tensors[name].dtype
            assert _same(ck.get(name), ref.get_tensor(name)), name


def test_writer_produce_mismatch(tmp_path: Path) -> None:
    specs = [TensorSpec("a", (2, 2), torch.float32), TensorSpec("b", (3,), torch.bfloat16)]
    good = {"a": torch.zeros(2, 2), "b": torch.zeros(3, dtype=torch.bfloat16)}
    for wrong, err in ((torch.zeros(4), ValueError), (torch.zeros(3), ValueError), ([0, 0, 0], TypeError)):
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        source = {**good, "b": wrong}
        with pytest.raises(err, match="produce"):
            write_sharded(out, specs, source.__getitem__, max_shard_bytes=16, progress=False)
        assert list(out.iterdir()) == []  # partial shards removed
    out = tmp_path / "ok"
    write_sharded(out, specs, good.__getitem__, progress=False)
    with pytest.raises(OutputExistsError):
        write_sharded(out, specs, good.__getitem__, progress=False)
    with pytest.raises(ValueError, match="empty"):
        write_sharded(tmp_path / "none", [], good.__getitem__, progress=False)


# ----------------------------------------------------------------------------- output folders
def test_prepared_output_success_and_refusal(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "pruned"
    check_output(out)  # no side effects
    assert not out.parent.exists()
    with prepared_output(out) as work:
        assert work.parent == out.parent and work.name.startswith(".pruned.tmp-")
        (work / "a.txt").write_text("new")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "new"
    assert _leftovers(out.parent) == []
    with pytest.raises(OutputExistsError, match="--overwrite"):
        check_output(out)
    with pytest.raises(OutputExistsError, match="exists and is not empty"):
        with prepared_output(out):
            raise AssertionError("must not run")
    assert _leftovers(out.parent) == [] and (out / "a.txt").read_text() == "new"
    empty = tmp_path / "empty"
    empty.mkdir()
    with prepared_output(empty) as work:
        (work / "b.txt").write_text("b")
    assert (empty / "b.txt").exists()
    with pytest.raises(MoePruneError, match="must be kept"):
        check_output(tmp_path, overwrite=True, protect=[empty])


def test_prepared_output_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with prepared_output(out, overwrite=True) as work:
        (work / "new.txt").write_text("new")
        assert (out / "old.txt").exists()  # old output untouched while working
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert _leftovers(tmp_path) == []


def test_prepared_output_exception_cleanup(tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with prepared_output(out, overwrite=True) as work:
            (work / "half.safetensors").write_bytes(b"partial")
            raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert (out / "old.txt").read_text() == "old"
    assert _leftovers(tmp_path) == []
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        with prepared_output(fresh):
            raise KeyboardInterrupt
    assert not fresh.exists() and _leftovers(tmp_path) == []


def test_atomic_writes(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "plan.json"
    atomic_write_json(path, {"kept": [1, 2]})
    assert json.loads(path.read_text()) == {"kept": [1, 2]}
    with pytest.raises(OutputExistsError, match="--overwrite"):
        atomic_write_json(path, {})
    atomic_write_text(path, "x", overwrite=True)
    assert path.read_text() == "x"
    assert [p.name for p in path.parent.iterdir()] == ["plan.json"]


# ----------------------------------------------------------------------------- companions
def test_copy_companion_files_and_model_card(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    companions = [
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
        "tokenizer.model", "chat_template.jinja", "generation_config.json", "LICENSE", "modeling_custom.py",
    ]
    skipped = [
        "model.safetensors", "model-00001-of-00002.safetensors", INDEX_NAME, "pytorch_model.bin",
        "pytorch_model.bin.index.json", "training_args.pt", "config.json", "moeprune_plan.json",
        "README.md", ".gitattributes",
    ]
    for name in companions + skipped:
        (src / name).write_text(name)
    (src / "original").mkdir()
    (src / "original" / "params.json").write_text("{}")
    copied = copy_companion_files(src, dst)
    assert sorted(p.name for p in copied) == sorted(companions)
    assert sorted(p.name for p in dst.iterdir()) == sorted(companions)
    assert (dst / "tokenizer.json").read_text() == "tokenizer.json"

    card = write_model_card(
        dst, base_model="mistralai/Mixtral-8x7B-v0.1", method="reap", ratio=0.25, data="c4 (128 x 2048)",
        moeprune_version="0.1.0", kept_summary="layers 0-31: 6 of 8 experts", extra={"seed": 0},
    )
    text = card.read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["base_model"] == "mistralai/Mixtral-8x7B-v0.1"
    assert front["tags"] == ["moeprune", "moe", "pruned"]
    for needle in ("## How it was made", "## Experts kept per layer", "## How to load", "6 of 8 experts",
                   "AutoModelForCausalLM.from_pretrained", "| seed | 0 |", "| Pruning ratio | 0.25 |"):
        assert needle in text, needle


def test_fingerprint_tells_apart_same_architecture_different_weights(tmp_path):
    """A fine-tune (same config, names and shapes, other values) must not share the base's fingerprint."""
    import json as _json

    import torch as _torch
    from safetensors.torch import save_file as _save

    from moeprune.io.checkpoint import LazyCheckpoint as _Lazy

    base, tuned, resharded = tmp_path / "base", tmp_path / "tuned", tmp_path / "resharded"
    tensors = {"a.weight": _torch.arange(12.0).reshape(3, 4), "b.weight": _torch.ones(5)}
    for folder in (base, tuned, resharded):
        folder.mkdir()
        (folder / "config.json").write_text(_json.dumps({"model_type": "mixtral"}))
    _save(tensors, str(base / "model.safetensors"))
    _save({**tensors, "a.weight": tensors["a.weight"] + 1}, str(tuned / "model.safetensors"))
    _save({"b.weight": tensors["b.weight"]}, str(resharded / "model-00001-of-00002.safetensors"))
    _save({"a.weight": tensors["a.weight"]}, str(resharded / "model-00002-of-00002.safetensors"))
    index = {"metadata": {"total_size": 68}, "weight_map": {"b.weight": "model-00001-of-00002.safetensors",
                                                             "a.weight": "model-00002-of-00002.safetensors"}}
    (resharded / "model.safetensors.index.json").write_text(_json.dumps(index))
    assert _Lazy(base).fingerprint() != _Lazy(tuned).fingerprint()
    assert _Lazy(base).fingerprint() == _Lazy(resharded).fingerprint()
