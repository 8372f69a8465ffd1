"""Safe output folders and files: nothing half-written, nothing replaced without ``--overwrite``.

:func:`prepared_output` hands the caller a fresh temporary folder next to the requested output and
swaps it into place only when the work finished; :func:`check_output` runs the same refusal check
up front (before hours of work). :func:`atomic_write_text` / :func:`atomic_write_json` do the same
for single files (temporary file + ``os.replace``).

Temporary folders and files are named ``.{name}.tmp-<pid>-<random>`` (``pid``: the writing
process) and the replaced old output ``.{name}.old-<random>``, both in the output's parent so that
renames stay on one filesystem. A run killed with SIGKILL cannot clean up; the next run writing the
same output removes the temporary folders and files whose process is gone
(:func:`remove_stale_temporaries`); ones without a pid (older moeprune) are only reported.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from moeprune.errors import MoePruneError, OutputExistsError

logger = logging.getLogger(__name__)


def _is_nonempty(path: Path) -> bool:
    """True when ``path`` exists and is a non-empty folder, a file, or a (possibly dangling) link."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        return True
    if path.is_dir():
        return any(path.iterdir())
    return False


def _nearest_existing(path: Path) -> Path:
    """The closest ancestor of ``path`` (itself included) that exists."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


def _contains(parent: Path, child: Path) -> bool:
    """True when ``child`` is ``parent`` or lies inside it (resolved paths)."""
    return child == parent or parent in child.parents


def check_output(out: str | Path, overwrite: bool = False, *, protect: Iterable[str | Path] = ()) -> Path:
    """Check, without side effects, that ``out`` may be written; return it as an absolute Path.

    Raises OutputExistsError when ``out`` exists, is not empty and ``overwrite`` is False, and
    MoePruneError when its parent is not a writable folder, or when ``overwrite`` would delete the
    filesystem root, the home or current folder, or any path in ``protect`` (e.g. the input model).
    """
    out = Path(out).expanduser().absolute()
    resolved = out.resolve()
    for guarded in (*[Path(p).expanduser() for p in protect], Path.cwd()):
        guarded = guarded.resolve()
        if _contains(resolved, guarded):
            raise MoePruneError(
                f"output {out} would contain or replace {guarded}, which must be kept; choose another --out"
            )
    if resolved == Path(resolved.anchor) or resolved == Path.home().resolve():
        raise MoePruneError(f"refusing to use {out} as output folder; choose a dedicated --out folder")
    if _is_nonempty(out) and not overwrite:
        raise OutputExistsError(
            f"{out} exists and is not empty; pass --overwrite to replace it, or choose another --out"
        )
    base = _nearest_existing(out.parent)
    if not base.is_dir():
        raise MoePruneError(f"cannot create {out}: {base} is not a folder; choose another --out")
    if not os.access(base, os.W_OK | os.X_OK):
        raise MoePruneError(f"cannot create {out}: no write permission in {base}; choose another --out")
    return out


def _default_mode(directory: bool) -> int:
    """Permissions a plain mkdir/open would give under the current umask (mkdtemp/mkstemp use 0o700/0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _remove(path: Path) -> None:
    """Delete a file, link or folder tree, ignoring errors (best-effort cleanup)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _temporary_prefix(out: Path) -> str:
    """Prefix of this process's temporary folders and files for ``out`` (``.{name}.tmp-<pid>-``)."""
    return f".{out.name}.tmp-{os.getpid()}-"


def _process_alive(pid: int) -> bool:
    """True when a process ``pid`` exists on this machine (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temporaries(out: str | Path) -> list[Path]:
    """Remove the temporary folders/files an interrupted run left next to ``out``; return them.

    A temporary ``.{name}.tmp-<pid>-<random>`` is stale when process ``pid`` no longer exists (it was
    killed before it could clean up); one of a live process (a run in progress, or this one) is
    left alone. Temporaries without a pid (written by an older moeprune) and an old output renamed
    aside (``.{name}.old-*``, the run was killed while swapping) are reported, not removed.
    Liveness is checked on this machine: do not write one output from two machines at once.
    """
    out = Path(out).expanduser().absolute()
    if not out.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.tmp-(?:(\d+)-)?[^/]+$")
    removed = []
    for aside in sorted(out.parent.glob(f".{glob.escape(out.name)}.old-*")):
        logger.warning("%s is a previous %s that an interrupted run was replacing; move it back to %s if that is "
                       "missing, else delete it", aside, out.name, out)
    for candidate in sorted(out.parent.glob(f".{glob.escape(out.name)}.tmp-*")):
        match = pattern.match(candidate.name)
        if match is None:
            continue
        if match.group(1) is None:
            logger.warning("%s looks like the temporary output of an interrupted older moeprune run; "
                           "delete it if no run is writing %s", candidate, out)
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _process_alive(pid):
            continue
        _remove(candidate)
        logger.warning("removed %s, the temporary output of an interrupted run (process %d is gone)", candidate, pid)
        removed.append(candidate)
    return removed


def _aside_name(out: Path) -> Path:
    """An unused ``.{name}.old-<random>`` path next to ``out``."""
    while True:
        candidate = out.with_name(f".{out.name}.old-{secrets.token_hex(4)}")
        if not candidate.exists() and not candidate.is_symlink():
            return candidate


def _install(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` folder to ``out``, replacing an old ``out`` only if ``overwrite``."""
    aside: Path | None = None
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        out.rmdir()
    elif _is_nonempty(out):
        if not overwrite:
            raise OutputExistsError(
                f"{out} appeared while the output was being written; the finished output is kept in {tmp}. "
                "Move it into place yourself, or re-run with --overwrite or another --out"
            )
        aside = _aside_name(out)
        os.rename(out, aside)
    try:
        os.rename(tmp, out)
    except BaseException:
        if aside is not None:
            os.rename(aside, out)
        raise
    if aside is not None:
        _remove(aside)
        logger.info("replaced previous output %s", out)


#: Temporary folders being written -> the outputs they become, so that a log line about a path inside
#: one (an output nested in another, as the default job's pruned checkpoint) names the final path.
_PENDING: dict[Path, Path] = {}


def final_path(path: str | Path) -> Path:
    """Where ``path`` will be once every enclosing :func:`prepared_output` finishes: ``path`` with a
    temporary output folder in it replaced by its final location (unchanged when none is)."""
    path = Path(path).absolute()
    for tmp, out in reversed(list(_PENDING.items())):  # innermost first
        if _contains(tmp, path):
            return final_path(out / path.relative_to(tmp))
    return path


@contextmanager
def prepared_output(
    out: str | Path, overwrite: bool = False, *, protect: Iterable[str | Path] = ()
) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out`` when the ``with`` body finishes normally.

    Refuses up front like :func:`check_output`. On normal exit the temporary folder atomically takes
    ``out``'s place (an old ``out`` is renamed aside, the new one renamed in, the old one deleted);
    if the body raises (KeyboardInterrupt included) the temporary folder is deleted, ``out`` is left
    untouched, and the exception propagates.
    """
    out = check_output(out, overwrite, protect=protect)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(out), dir=out.parent))
    os.chmod(tmp, _default_mode(directory=True))
    logger.debug("writing output to temporary folder %s", tmp)
    _PENDING[tmp] = out
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    finally:
        del _PENDING[tmp]
    try:
        _install(tmp, out, overwrite)
    except OutputExistsError:
        raise
    except BaseException:
        _remove(tmp)
        raise
    logger.info("output written to %s", final_path(out))


@contextmanager
def _atomic_file(path: str | Path, overwrite: bool) -> Iterator[tuple[int, Path]]:
    """Yield ``(fd, tmp)``: a unique temporary file next to ``path`` that replaces ``path`` when the
    ``with`` body finishes (with the folder's normal file permissions), and is removed on any error.

    Raises OutputExistsError if ``path`` is a folder, or exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(f"{path} is a folder; choose a file path")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; pass --overwrite to replace it, or choose another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp_name = tempfile.mkstemp(prefix=_temporary_prefix(path), dir=path.parent)
    tmp = Path(tmp_name)
    try:
        yield fd, tmp
        os.chmod(tmp, _default_mode(directory=False))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str, *, overwrite: bool = False, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace`` (readers never see half a file).

    Raises OutputExistsError if ``path`` exists and ``overwrite`` is False. Creates missing parent
    folders. Returns ``path``.
    """
    with _atomic_file(path, overwrite) as (fd, _tmp):
        with os.fdopen(fd, "w", encoding=encoding, newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def atomic_write_safetensors(
    path: str | Path, tensors: dict, metadata: dict[str, str] | None = None, *, overwrite: bool = False
) -> Path:
    """Write ``tensors`` as one safetensors file atomically; refuses like :func:`atomic_write_text`."""
    with _atomic_file(path, overwrite) as (fd, tmp):
        os.close(fd)
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any, *, overwrite: bool = False, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (UTF-8, trailing newline) atomically; refuses like :func:`atomic_write_text`."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False) + "\n"
    return atomic_write_text(path, text, overwrite=overwrite)
