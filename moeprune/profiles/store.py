"""The profile store: a folder of ``<name>.json`` profiles plus their ``<name>.safetensors`` window
signatures, written atomically (:mod:`moeprune.io.output`) and validated on load."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import OutputExistsError
from ..io.output import atomic_write_safetensors, atomic_write_text, final_path
from .profile import Profile
from .settings import _REBUILD, PROFILE_FORMAT, ProfileError, check_profile_name

logger = logging.getLogger(__name__)


def _compact_json(obj) -> str:
    """JSON with 2-space indentation but each list of numbers on one line (readable vectors)."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False)

    def inline(match: re.Match) -> str:
        return "[" + ", ".join(item.strip() for item in match.group(1).split(",")) + "]"

    return re.sub(r"\[\s*([-+0-9.eE,\s]+?)\s*\]", inline, text) + "\n"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------
# the store


class ProfileStore:
    """A folder of profiles: ``<name>.json`` plus ``<name>.safetensors`` (window signatures:
    tensors ``windows.<length>`` (TCESS) and ``logit_windows.<length>`` (mean router logits), float16)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()

    def __repr__(self) -> str:
        return f"ProfileStore({str(self.folder)!r})"

    @classmethod
    def default(cls) -> "ProfileStore":
        """The profiles shipped with moeprune for the default testbed (``moeprune._profiles``)."""
        return cls(Path(str(resources.files("moeprune._profiles"))))

    def _existing(self) -> Path:
        if not self.folder.is_dir():
            raise ProfileError(
                f"profile store {self.folder} does not exist or is not a folder; build profiles into it with "
                f"`moeprune profile build MODEL --task NAME --data FILE --store {self.folder}`"
            )
        return self.folder

    def names(self) -> list[str]:
        """Names of the profiles in the store (``*.json`` files), sorted."""
        return sorted(p.stem for p in self._existing().glob("*.json") if not p.name.startswith("."))

    def path(self, name: str) -> Path:
        return self.folder / f"{check_profile_name(name)}.json"

    def __contains__(self, name: str) -> bool:
        return self.folder.is_dir() and (self.folder / f"{name}.json").is_file()

    def load(self, name: str) -> Profile:
        """The validated profile ``name``; missing, corrupt or foreign files are a ProfileError."""
        path = self.path(name)
        if not path.is_file():
            known = ", ".join(self.names()) or "none"
            raise ProfileError(f"no profile {name!r} in store {self.folder} (profiles: {known}); build it with "
                               "`moeprune profile build` or pick another --task")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProfileError(f"{path} is corrupt (not valid JSON: {exc}); {_REBUILD}") from None
        windows = self._load_windows(path, data)
        profile = Profile.from_json(data, where=str(path), windows=windows.get("windows"),
                                    logit_windows=windows.get("logit_windows"))
        if profile.task != name:
            raise ProfileError(f"{path} holds profile {profile.task!r}, not {name!r}; rename the file or {_REBUILD}")
        return profile

    def _load_windows(self, path: Path, data) -> dict[str, dict[int, torch.Tensor]]:
        """``{"windows": {length: tensor}, "logit_windows": {...}}`` from the file the JSON names."""
        info = data.get("windows") if isinstance(data, Mapping) else None
        if not info:
            return {}

        if not isinstance(info, Mapping) or "file" not in info or "sha256" not in info:
            raise ProfileError(f"{path}: 'windows' must name a file and its sha256; {_REBUILD}")
        file = self.folder / Path(str(info["file"])).name
        if not file.is_file():
            raise ProfileError(f"{path} refers to {file.name}, which is missing from {self.folder}; {_REBUILD}")
        if _sha256(file) != info["sha256"]:
            raise ProfileError(f"{file} does not match the checksum recorded in {path.name} (corrupt or from "
                               f"another build); {_REBUILD}")
        try:
            tables: dict[str, dict[int, torch.Tensor]] = {}
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    kind, length = key.split(".", 1)
                    tables.setdefault(kind, {})[int(length)] = handle.get_tensor(key).double()
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise ProfileError(f"cannot read window signatures from {file}: {exc}; {_REBUILD}") from exc
        stray = sorted(set(tables) - {"windows", "logit_windows"})
        if stray:
            raise ProfileError(f"{file} holds unknown tensors {stray}; {_REBUILD}")
        return tables

    def load_all(self) -> dict[str, Profile]:
        """Every profile of the store, by name."""
        return {name: self.load(name) for name in self.names()}

    def check_writable(self, name: str, overwrite: bool = False) -> Path:
        """Raise OutputExistsError if profile ``name`` exists and ``overwrite`` is False."""
        path = self.path(name)
        if path.exists() and not overwrite:
            raise OutputExistsError(f"profile {name!r} exists in {self.folder}; pass --overwrite to replace it, "
                                    "or choose another --task/--name")
        if self.folder.exists() and not self.folder.is_dir():
            raise ProfileError(f"profile store {self.folder} is a file; choose a folder for --store")
        return path

    def save(self, profile: Profile, overwrite: bool = False) -> Path:
        """Write ``profile`` (validated) as ``<task>.json`` and ``<task>.safetensors``; returns the JSON path.

        Both files go through the atomic writers of :mod:`moeprune.io.output` (temporary name, then
        rename), the windows first, so a reader never sees a JSON whose window file is half-written.
        """
        profile.validate(f"profile {profile.task!r}")
        path = self.check_writable(profile.task, overwrite)
        self.folder.mkdir(parents=True, exist_ok=True)
        data = profile.to_json()
        windows_file = self.folder / f"{profile.task}.safetensors"
        if profile.windows or profile.logit_windows:
            tensors = {f"{kind}.{length}": t.to(torch.float16).contiguous()
                       for kind, table in (("windows", profile.windows), ("logit_windows", profile.logit_windows))
                       for length, t in sorted(table.items())}
            atomic_write_safetensors(windows_file, tensors, {"format": PROFILE_FORMAT, "task": profile.task},
                                     overwrite=True)
            data["windows"] = {"file": windows_file.name, "sha256": _sha256(windows_file),
                               "kinds": [k for k, t in (("tcess", profile.windows), ("logits", profile.logit_windows)) if t],
                               "lengths": sorted(set(profile.windows) | set(profile.logit_windows)),
                               "count": {str(k): int(v.shape[0]) for k, v in sorted(profile.windows.items())}}
        elif windows_file.exists():
            windows_file.unlink()
        atomic_write_text(path, _compact_json(data), overwrite=True)
        logger.info("saved profile %s to %s", profile.task, final_path(path))
        return path


def _as_store(store) -> ProfileStore:
    if store is None:
        return ProfileStore.default()
    return store if isinstance(store, ProfileStore) else ProfileStore(store)
