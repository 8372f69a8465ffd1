"""Reliability: every class of bad input ends in one clear error, nothing wrong is written, nothing
is left behind after an interruption.

The table :data:`BAD_INPUTS` runs the CLI as a user would (``main([...])``): each class must exit 2
with one ``moeprune: error: ...`` line naming the problem, and no traceback. docs/reliability.md
lists the same classes with their test names and messages.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import SAMPLES, SEQ_LEN
from moeprune import api
from moeprune.cli import main
from moeprune.errors import MoePruneError, PlanError, StatsError
from moeprune.plan import Plan

ROOT = Path(__file__).resolve().parents[1]
LAYER = 1  # a MoE layer of the tiny Mixtral
EXPERT = f"model.layers.{LAYER}.block_sparse_moe.experts.0.w1.weight"
ROUTER = f"model.layers.{LAYER}.block_sparse_moe.gate.weight"


# --------------------------------------------------------------------------------------------------
# helpers


def copy_model(src: Path, dst: Path, *, tokenizer: bool = True) -> Path:
    """A private copy of a checkpoint folder (without its tokenizer files when ``tokenizer`` is False)."""
    shutil.copytree(src, dst)
    if not tokenizer:
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
            (dst / name).unlink(missing_ok=True)
    return dst


def rewrite_tensor(model: Path, name: str, change) -> None:
    """Replace tensor ``name`` of a single-file checkpoint by ``change(tensor)``."""
    path = model / "model.safetensors"
    tensors = load_file(path)
    tensors[name] = change(tensors[name]).contiguous()
    save_file(tensors, path, metadata={"format": "pt"})


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(code: int, err: str, message: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert "error:" in err and message in err, err


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary files/folders of moeprune in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


@pytest.fixture
def model(tiny_checkpoint, tmp_path) -> Path:
    """A private copy of the tiny Mixtral that a test may damage."""
    return copy_model(tiny_checkpoint("mixtral"), tmp_path / "model")


@pytest.fixture(scope="module")
def stats_file(tiny_checkpoint, family_stats, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stats") / "stats.safetensors"
    family_stats("mixtral").save(path)
    return path


# --------------------------------------------------------------------------------------------------
# the table: one row per class of bad input -> (make(ctx) -> argv, message the error must contain)


def _config_not_object(ctx):
    (ctx.model / "config.json").write_text("[1, 2, 3]\n")
    return ["inspect", ctx.model]


def _config_invalid_json(ctx):
    (ctx.model / "config.json").write_text('{"model_type": "mixtral",')
    return ["inspect", ctx.model]


def _truncated_shard(ctx):
    shard = ctx.model / "model.safetensors"
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size - 100)
    return ["inspect", ctx.model]


def _misshaped_expert(ctx):
    rewrite_tensor(ctx.model, EXPERT, lambda t: t[:-1])
    return ["inspect", ctx.model]


def _misshaped_router(ctx):
    rewrite_tensor(ctx.model, ROUTER, lambda t: t[:-1])
    return ["collect", ctx.model, "--data", ctx.calib, "--out", ctx.tmp / "s.safetensors"]


def _stats_wrong_length(ctx):
    from safetensors import safe_open

    tensors = load_file(ctx.stats)
    with safe_open(str(ctx.stats), framework="pt") as handle:  # keep the moeprune metadata
        metadata = handle.metadata()
    tensors[f"layers.{LAYER}.frequency"] = tensors[f"layers.{LAYER}.frequency"][:-1].contiguous()
    bad = ctx.tmp / "bad-stats.safetensors"
    save_file(tensors, bad, metadata=metadata)
    return ["super-experts", ctx.model, "--stats", bad]


def _plan(ctx, **fields) -> Path:
    data = {"method": "manual", "num_experts": 8, "layers": {str(layer): [0, 1, 2, 3] for layer in (0, 1, 2)}}
    data.update(fields)
    path = ctx.tmp / "plan.json"
    path.write_text(json.dumps(data))
    return path


def _plan_field_type(ctx):
    return ["apply", ctx.model, "--plan", _plan(ctx, num_experts="eight"), "--out", ctx.tmp / "out"]


def _plan_budget_type(ctx):
    return ["apply", ctx.model, "--plan", _plan(ctx, budget={"ratio": "half"}), "--out", ctx.tmp / "out"]


def _plan_omits_layer(ctx):
    return ["apply", ctx.model, "--plan", _plan(ctx, layers={"0": [0, 1, 2, 3], "1": [0, 1, 2, 3]}),
            "--out", ctx.tmp / "out"]


def _out_not_writable(ctx):
    blocker = ctx.tmp / "a-file"
    blocker.write_text("not a folder")
    return ["collect", ctx.model, "--data", ctx.calib, "--out", blocker / "s.safetensors"]


def _offload_dir_is_a_file(ctx):
    blocker = ctx.tmp / "a-file"
    blocker.write_text("not a folder")
    return ["collect", ctx.model, "--data", ctx.calib, "--out", ctx.tmp / "s.safetensors", "--offload-dir", blocker]


def _no_tokenizer(ctx):
    bare = copy_model(ctx.model, ctx.tmp / "bare", tokenizer=False)
    return ["collect", bare, "--data", ctx.calib, "--out", ctx.tmp / "s.safetensors"]


def _seq_len_beyond_positions(ctx):
    return ["collect", ctx.model, "--data", ctx.calib, "--out", ctx.tmp / "s.safetensors", "--seq-len", "100000"]


BAD_INPUTS = {
    "config_not_object": (_config_not_object, "not an object"),
    "config_invalid_json": (_config_invalid_json, "is not valid JSON"),
    "truncated_shard": (_truncated_shard, "past the end of the file"),
    "misshaped_expert": (_misshaped_expert, f"tensor '{EXPERT}' has shape [15, 32], but"),
    "misshaped_router": (_misshaped_router, f"tensor '{ROUTER}' has shape [7, 32], but"),
    "stats_wrong_length": (_stats_wrong_length, "frequency has shape [7], expected [8]"),
    "plan_field_type": (_plan_field_type, "'num_experts' must be a non-negative integer"),
    "plan_budget_type": (_plan_budget_type, "budget 'ratio' must be a number"),
    "plan_omits_moe_layer": (_plan_omits_layer, "omits MoE layer(s) [2]"),
    "out_not_writable": (_out_not_writable, "is not a folder"),
    "offload_dir_is_a_file": (_offload_dir_is_a_file, "a-file is a file; pass a folder"),
    "no_tokenizer": (_no_tokenizer, "pass --tokenizer DIR"),
    "seq_len_beyond_positions": (_seq_len_beyond_positions, "max_position_embeddings (256)"),
}


class Context:
    def __init__(self, model, calib, stats, tmp):
        self.model, self.calib, self.stats, self.tmp = model, calib, stats, tmp


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_error(case, model, calib_file, stats_file, tmp_path, capsys, monkeypatch):
    """Every class: exit 2, one `moeprune: error:` line naming the problem, no traceback, nothing
    written, and no calibration started (the checks run first)."""
    import moeprune.calibration.engine as engine

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration started before the input was checked")

    monkeypatch.setattr(engine, "collect_stats", no_calibration)
    monkeypatch.setattr(api, "collect_stats", no_calibration)
    make, message = BAD_INPUTS[case]
    argv = make(Context(model, calib_file, stats_file, tmp_path))
    code, _, err = run_cli(capsys, argv)
    assert_user_error(code, err, message)
    assert err.count("moeprune: error:") == 1 and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "s.safetensors").exists()
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# numeric options out of range: argument errors (argparse, exit 2), before anything is read


@pytest.mark.parametrize("argv", [
    ["collect", "M", "--data", "D", "--out", "O", "--samples", "0"],
    ["collect", "M", "--data", "D", "--out", "O", "--seq-len", "-5"],
    ["collect", "M", "--data", "D", "--out", "O", "--batch-size", "0"],
    ["collect", "M", "--data", "D", "--out", "O", "--tcess-r", "1.5"],
    ["--threads", "0", "inspect", "M"],
    ["inspect", "M", "--threads", "-1"],
    ["prune", "M", "--method", "reap", "--ratio", "1.5", "--out", "O"],
    ["prune", "M", "--method", "reap", "--keep", "0", "--out", "O"],
    ["profile", "match", "M", "--prompt", "x", "--max-tokens", "0"],
    ["profile", "match", "M", "--prompt", "x", "--max-tokens", "-3"],
    ["eval", "M", "--seq-len", "1"],
    ["eval", "M", "--batch-size", "0"],
    ["demo", "--eval-tokens", "0"],
], ids=lambda argv: " ".join(argv))
def test_numeric_option_out_of_range_is_an_argument_error(argv, capsys):
    code, _, err = run_cli(capsys, argv)
    assert code == 2 and "Traceback" not in err
    assert "error: argument" in err and ("must be" in err or "expected" in err), err


# --------------------------------------------------------------------------------------------------
# the environment: full disk, Ctrl-C, SIGTERM, SIGKILL, closed pipe, internal bugs


def test_disk_full_is_one_error_and_leaves_nothing(model, calib_file, tmp_path, capsys, monkeypatch):
    import moeprune.io.output as output

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(output, "save_file", full)
    out = tmp_path / "stats.safetensors"
    code, _, err = run_cli(capsys, ["-q", "collect", model, "--data", calib_file, "--out", out,
                                    "--samples", SAMPLES, "--seq-len", SEQ_LEN])
    assert_user_error(code, err, "no space left on the device")
    assert not out.exists() and leftovers(tmp_path) == []


def test_ctrl_c_exits_130_with_one_line_and_removes_the_output(model, stats_file, tmp_path, capsys, monkeypatch):
    import moeprune.write as write

    def interrupted(layout, edit, tmp, **kwargs):
        (Path(tmp) / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(write, "write_edit", interrupted)
    out = tmp_path / "pruned"
    code, _, err = run_cli(capsys, ["-q", "prune", model, "--method", "frequency", "--ratio", "0.5",
                                    "--stats", stats_file, "--out", out])
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines() == [err.strip()] and "interrupted (SIGINT)" in err
    assert not out.exists() and leftovers(tmp_path) == []


_KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    import moeprune.io.output as output
    import moeprune.write as write

    how = sys.argv[1]
    def die(*args, **kwargs):
        target = args[2] if how.endswith("folder") else args[1]
        if how.endswith("folder"):
            (target / "model.safetensors").write_bytes(b"half")
        else:
            open(target, "wb").write(b"half")
        os.kill(os.getpid(), signal.SIGKILL if how.startswith("kill") else signal.SIGTERM)
        import time; time.sleep(30)

    if how.endswith("folder"):
        write.write_edit = die
    else:
        output.save_file = die
    from moeprune.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def _run_killed(how: str, argv: list) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", _KILLED_RUN, how, *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_sigterm_is_handled_like_ctrl_c(tiny_checkpoint, calib_file, tmp_path):
    model = tiny_checkpoint("mixtral")
    out = tmp_path / "pruned"
    done = _run_killed("term-folder", ["-q", "prune", model, "--method", "frequency", "--ratio", "0.5",
                                       "--data", calib_file, "--samples", SAMPLES, "--seq-len", SEQ_LEN, "--out", out])
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert "Traceback" not in done.stderr and "interrupted (SIGTERM)" in done.stderr
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("what", ["file", "folder"])
def test_after_sigkill_the_next_run_removes_stale_temporaries(what, tiny_checkpoint, calib_file, tmp_path, capsys):
    """A killed run cannot clean up; the next run into the same output removes what it left (the
    temporary is named after the dead process), and writes a complete output."""
    model = tiny_checkpoint("mixtral")
    data = ["--data", calib_file, "--samples", SAMPLES, "--seq-len", SEQ_LEN]
    if what == "file":
        out = tmp_path / "stats.safetensors"
        argv = ["-q", "collect", model, *data, "--out", out]
    else:
        out = tmp_path / "pruned"
        argv = ["-q", "prune", model, "--method", "frequency", "--ratio", "0.5", *data, "--out", out]
    killed = _run_killed(f"kill-{what}", argv)
    assert killed.returncode == -signal.SIGKILL
    stale = leftovers(tmp_path)
    assert len(stale) == 1 and not out.exists()
    live = tmp_path / f".{out.name}.tmp-{os.getpid()}-live"  # this process's: in use, must stay
    live.mkdir()
    code, _, err = run_cli(capsys, argv)
    assert code == 0, err
    assert leftovers(tmp_path) == [live.name] and out.exists()
    if what == "file":
        assert api.RouterStats.load(out).metadata["num_tokens"] > 0
    else:
        assert Plan.load(out).layers


def test_closed_stdout_pipe_is_quiet(tiny_checkpoint):
    """`moeprune inspect M | head -0`: the reader is gone before moeprune writes; no traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "moeprune.cli", "inspect", str(tiny_checkpoint("mixtral")), "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait(timeout=300) == 128 + signal.SIGPIPE
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_internal_bug_exits_1_asking_for_a_report(tiny_checkpoint, capsys, monkeypatch):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(api, "inspect", bug)
    code, _, err = run_cli(capsys, ["inspect", tiny_checkpoint("mixtral")])
    assert code == 1 and "Traceback" not in err
    assert "internal error: ZeroDivisionError: division by zero" in err and "please report it" in err
    code, _, err = run_cli(capsys, ["-v", "inspect", tiny_checkpoint("mixtral")])
    assert code == 1 and "Traceback" in err and "ZeroDivisionError" in err


# --------------------------------------------------------------------------------------------------
# the Python API: moeprune's own errors for wrong arguments; statistics paths accepted


@pytest.mark.parametrize("kwargs", [{"samples": "4"}, {"seq_len": 16.5}, {"batch_size": 0}, {"seed": True},
                                    {"tcess_r": 2.0}, {"tcess_pool": "x"}])
def test_api_collect_refuses_wrong_numbers(kwargs, tiny_checkpoint, calib_file):
    with pytest.raises(MoePruneError, match="must be"):
        api.collect(tiny_checkpoint("mixtral"), calib_file, progress=False, **kwargs)


@pytest.mark.parametrize("kwargs", [{"ratio": "0.5"}, {"keep": 2.5}, {"seed": "0", "ratio": 0.5},
                                    {"per_layer": [4, 4]}])
def test_api_plan_pruning_refuses_wrong_types(kwargs, tiny_checkpoint):
    with pytest.raises(MoePruneError, match="must be"):
        api.plan_pruning(tiny_checkpoint("mixtral"), method="random", **kwargs)


def test_api_accepts_a_statistics_path(tiny_checkpoint, family_stats, stats_file):
    ckpt, stats = tiny_checkpoint("mixtral"), family_stats("mixtral")
    assert api.super_experts(ckpt, stats_file) == api.super_experts(ckpt, stats)
    by_path = api.plan_pruning(ckpt, method="frequency", ratio=0.5, stats=stats_file)
    assert by_path.layers == api.plan_pruning(ckpt, method="frequency", ratio=0.5, stats=stats).layers
    with pytest.raises(StatsError, match="not found"):
        api.super_experts(ckpt, stats_file.with_name("missing.safetensors"))


def test_api_tokenizer_argument(tiny_checkpoint, calib_file, tmp_path):
    """A checkpoint without tokenizer files: a clear error; with tokenizer=DIR the same tokens."""
    original = tiny_checkpoint("mixtral")
    bare = copy_model(original, tmp_path / "bare", tokenizer=False)
    with pytest.raises(MoePruneError, match="--tokenizer DIR"):
        api.calibration_data(bare, calib_file, samples=SAMPLES, seq_len=SEQ_LEN)
    given = api.calibration_data(bare, calib_file, samples=SAMPLES, seq_len=SEQ_LEN, tokenizer=original)
    own = api.calibration_data(original, calib_file, samples=SAMPLES, seq_len=SEQ_LEN)
    assert torch.equal(given.input_ids, own.input_ids) and given.data_hash == own.data_hash


def test_default_seq_len_is_clamped_to_the_positions(tiny_checkpoint):
    config = api.read_config(tiny_checkpoint("mixtral"))
    assert config.max_position_embeddings == 256 and api.default_seq_len(config) == 256


# --------------------------------------------------------------------------------------------------
# nothing wrong is written


def test_plan_omitting_a_layer_is_accepted_only_when_counts_stay_uniform(tiny_checkpoint):
    """An omitted MoE layer keeps all experts: fine for a plan that keeps all experts everywhere."""
    from moeprune.checks import check_plan_complete

    geometry = api.model_info(tiny_checkpoint("mixtral")).geometry
    full = list(range(geometry.num_experts))
    check_plan_complete(Plan(layers={0: full}, method="manual"), geometry)
    with pytest.raises(PlanError, match=r"omits MoE layer\(s\) \[1, 2\]"):
        check_plan_complete(Plan(layers={0: full[:4]}, method="manual"), geometry)


def test_every_output_kind_loads_in_vanilla_transformers(tiny_checkpoint, calib_file, tmp_path, capsys):
    """prune, apply and profile export write checkpoints plain transformers loads cleanly."""
    from conftest import vanilla

    model = tiny_checkpoint("mixtral")
    data = ["--data", calib_file, "--samples", SAMPLES, "--seq-len", SEQ_LEN]
    outputs = {"prune": tmp_path / "pruned", "apply": tmp_path / "applied", "export": tmp_path / "exported"}
    runs = [
        ["-q", "prune", model, "--method", "reap", "--ratio", "0.5", *data, "--out", outputs["prune"]],
        ["-q", "apply", model, "--plan", outputs["prune"] / "moeprune_plan.json", "--out", outputs["apply"]],
        ["-q", "profile", "build", model, "--task", "prose", *data, "--store", tmp_path / "store"],
        ["-q", "profile", "export", model, "--store", tmp_path / "store", "--task", "prose", "--out", outputs["export"]],
    ]
    for argv in runs:
        code, _, err = run_cli(capsys, argv)
        assert code == 0, err
    for out in outputs.values():
        pruned = vanilla(out)
        assert pruned.config.num_local_experts == 4


def test_outputs_get_the_folders_normal_permissions(tiny_checkpoint, calib_file, tmp_path, capsys):
    """Statistics, plans and shards all get the mode a plain open() gives under the umask."""
    model = tiny_checkpoint("mixtral")
    data = ["--data", calib_file, "--samples", SAMPLES, "--seq-len", SEQ_LEN]
    stats, out = tmp_path / "stats.safetensors", tmp_path / "pruned"
    assert run_cli(capsys, ["-q", "collect", model, *data, "--out", stats])[0] == 0
    assert run_cli(capsys, ["-q", "prune", model, "--method", "reap", "--ratio", "0.5", "--stats", stats,
                            "--out", out])[0] == 0
    reference = tmp_path / "plain"
    reference.write_text("x")
    mode = stat.S_IMODE(reference.stat().st_mode)
    files = [stats, *sorted(p for p in out.iterdir() if p.is_file())]
    assert out / "moeprune_plan.json" in files and out / "model.safetensors" in files
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: mode for p in files}


# --------------------------------------------------------------------------------------------------
# the checks themselves, in every family and by hand


@pytest.mark.parametrize("what", ["router", "expert"])
def test_misshaped_tensor_is_refused_in_every_family(what, family_checkpoint, tmp_path):
    """Per-expert (Mixtral, Qwen, DeepSeek) and fused (GPT-OSS) layouts: one row fewer in the first
    router or routed-expert tensor of a MoE layer is refused, naming that tensor, before any work."""
    from moeprune.errors import CheckpointError
    from moeprune.io.checkpoint import LazyCheckpoint
    from moeprune.layout import CheckpointLayout

    _, source = family_checkpoint
    info = api.model_info(source)  # the intact checkpoint passes
    layer = info.geometry.moe_layers[0]
    entry = CheckpointLayout.build(info.family, LazyCheckpoint(source), info.geometry.moe_layers).layers[layer]
    name = entry.router[0] if what == "router" else entry.expert_keys[0]
    model = copy_model(source, tmp_path / "model")
    shards = sorted(model.glob("*.safetensors"))
    shard = next(s for s in shards if name in load_file(s))
    tensors = load_file(shard)
    shape = list(tensors[name].shape)
    tensors[name] = tensors[name][:-1].contiguous()
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' has shape \[{shape[0] - 1}.*implies \[{shape[0]}"):
        api.inspect(model)


def test_check_number_by_hand():
    from moeprune.checks import check_number

    assert check_number("n", 3, minimum=1) == 3 and check_number("n", None) is None
    assert check_number("r", 1, integer=False, minimum=0.0, maximum=1.0) == 1
    for value, kwargs, message in [(0, {"minimum": 1}, "n must be >= 1, got 0"),
                                   (True, {}, "n must be an integer, got True"),
                                   (2.0, {}, "n must be an integer, got 2.0"),
                                   ("2", {"integer": False}, "n must be a number, got '2'"),
                                   (float("nan"), {"integer": False}, "n must be a finite number"),
                                   (1.5, {"integer": False, "maximum": 1.0}, "n must be <= 1.0, got 1.5"),
                                   (None, {"optional": False}, "n must be an integer, got None")]:
        with pytest.raises(MoePruneError, match=message.replace("(", r"\(").replace(".", r"\.")):
            check_number("n", value, **kwargs)


def test_stats_entry_shapes_by_hand():
    from moeprune.stats import check_entry_shapes

    good = {"tokens": torch.tensor(5.0, dtype=torch.float64), "frequency": torch.zeros(4, dtype=torch.float64),
            "coactivation": torch.zeros(4, 4, dtype=torch.float64), "tcess_hist": torch.zeros(4, 10, dtype=torch.float64),
            "shared_max_abs_output": torch.zeros(2, dtype=torch.float64), "unknown": torch.zeros(9)}
    assert check_entry_shapes(good, "here") == 4
    assert check_entry_shapes(good, "here", num_experts=4) == 4
    with pytest.raises(StatsError, match=r"here: frequency has shape \[4\], expected \[6\]"):
        check_entry_shapes(good, "here", num_experts=6)
    for name, bad in [("coactivation", torch.zeros(4, 3, dtype=torch.float64)),
                      ("tokens", torch.zeros(1, dtype=torch.float64)),
                      ("tcess_hist", torch.zeros(4, dtype=torch.float64))]:
        with pytest.raises(StatsError, match=rf"{name} has shape"):
            check_entry_shapes({**good, name: bad}, "here")
    with pytest.raises(StatsError, match="frequency must be a floating-point tensor"):
        check_entry_shapes({**good, "frequency": torch.zeros(4, dtype=torch.int64)}, "here")


def test_shard_span_by_hand(tmp_path):
    """A header whose offsets disagree with the shape, or run past the file, is refused."""
    import struct

    from moeprune.errors import CheckpointError
    from moeprune.io.checkpoint import LazyCheckpoint

    def shard(offsets, data: bytes) -> Path:
        folder = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        header = json.dumps({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": offsets}}).encode()
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + data)
        return folder

    assert LazyCheckpoint(shard([0, 24], bytes(24))).shape("w") == (2, 3)  # 2 x 3 x 4 bytes
    with pytest.raises(CheckpointError, match=r"tensor 'w' \[2, 3\] needs 24 bytes but its header gives offsets \[0, 20\)"):
        LazyCheckpoint(shard([0, 20], bytes(24)))
    with pytest.raises(CheckpointError, match="past the end of the file"):
        LazyCheckpoint(shard([0, 24], bytes(23)))


def test_stale_temporaries_of_live_and_unknown_runs_are_kept(tmp_path, caplog):
    """Only temporaries of processes that are gone are removed; a pid-less one is only reported."""
    from moeprune.io.output import remove_stale_temporaries

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    out = tmp_path / "stats[1].safetensors"  # glob metacharacters in the name
    gone = tmp_path / f".{out.name}.tmp-{dead}-abcd"
    gone.write_bytes(b"half")
    mine = tmp_path / f".{out.name}.tmp-{os.getpid()}-abcd"
    mine.mkdir()
    legacy = tmp_path / f".{out.name}.tmp-k2x9q"
    legacy.mkdir()
    other = tmp_path / f".other.tmp-{dead}-abcd"
    other.write_bytes(b"")
    aside = tmp_path / f".{out.name}.old-1234"
    aside.write_bytes(b"the previous output")
    with caplog.at_level("WARNING"):
        assert remove_stale_temporaries(out) == [gone]
    assert not gone.exists() and mine.exists() and legacy.exists() and other.exists() and aside.exists()
    assert str(legacy) in caplog.text and f"process {dead} is gone" in caplog.text
    assert f"{aside} is a previous {out.name}" in caplog.text


def test_tokenizer_option_on_every_tokenizing_command(tiny_checkpoint, calib_file, tmp_path, capsys):
    """collect, prune, profile build and profile match read --tokenizer DIR for a bare checkpoint."""
    original = tiny_checkpoint("mixtral")
    bare = copy_model(original, tmp_path / "bare", tokenizer=False)
    data = ["--data", calib_file, "--samples", SAMPLES, "--seq-len", SEQ_LEN, "--tokenizer", original]
    store = tmp_path / "store"
    runs = [["-q", "collect", bare, *data, "--out", tmp_path / "s.safetensors"],
            ["-q", "prune", bare, "--method", "frequency", "--ratio", "0.5", *data, "--out", tmp_path / "pruned"],
            ["-q", "profile", "build", bare, "--task", "a", *data, "--store", store],
            ["-q", "profile", "build", bare, "--task", "b", *data, "--seed", "1", "--store", store]]
    for argv in runs:
        code, _, err = run_cli(capsys, argv)
        assert code == 0, (argv, err)
    own = api.collect(original, calib_file, samples=SAMPLES, seq_len=SEQ_LEN, progress=False)
    assert api.RouterStats.load(tmp_path / "s.safetensors").metadata["data_hash"] == own.metadata["data_hash"]
    match = ["-q", "profile", "match", bare, "--store", store, "--prompt", "a prompt", "--no-fallback", "--json"]
    code, out, err = run_cli(capsys, [*match, "--tokenizer", original])
    assert code == 0 and json.loads(out)["profile"] in {"a", "b"}, err
    code, _, err = run_cli(capsys, match)
    assert_user_error(code, err, "pass --tokenizer DIR")
