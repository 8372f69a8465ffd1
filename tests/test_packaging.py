"""routers/ and profiles/ ship inside the installed package, not only in the source tree."""

import subprocess
import sys
import zipfile

import pytest
from pathlib import Path

from moeprune.tiny import TINY_FAMILIES

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_contains_router_specs(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    wheel = next(tmp_path.glob("moeprune-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    specs = sorted(p.name for p in (ROOT / "routers").glob("*.toml"))
    assert specs == sorted(f"{name}.toml" for name in TINY_FAMILIES)  # one spec per family with a tiny model
    for spec in specs:
        assert f"moeprune/_routers/{spec}" in names
    assert "moeprune/_profiles/__init__.py" in names
    shipped = sorted(p.name for p in (ROOT / "profiles").iterdir() if p.suffix in (".json", ".safetensors"))
    assert "code.json" in shipped and "general.safetensors" in shipped
    for profile_file in shipped:
        assert f"moeprune/_profiles/{profile_file}" in names
    package = ROOT / "moeprune"
    modules = sorted(str(p.relative_to(ROOT)) for p in package.rglob("*.py") if "_routers" not in p.parts
                     and "_profiles" not in p.parts and (p.parent / "__init__.py").is_file())
    assert "moeprune/plan/model.py" in modules and "moeprune/ops/recipe.py" in modules
    missing = [module for module in modules if module not in names]
    assert not missing, f"add their packages to pyproject.toml's [tool.setuptools] packages: {missing}"


def test_installed_package_finds_every_family():
    from moeprune.arch import known_families

    assert sorted(known_families()) == sorted(p.stem for p in (ROOT / "routers").glob("*.toml"))


def test_top_level_partial_load_entry_points():
    import moeprune
    from moeprune.loader import load_with_experts
    from moeprune.profiles import load_profile

    assert moeprune.load_profile is load_profile
    assert moeprune.load_with_experts is load_with_experts
    with pytest.raises(AttributeError, match="no_such_name"):
        moeprune.no_such_name


def test_every_module_imports_on_its_own():
    """No import cycle bites a module imported first (e.g. moeprune.units -> ops -> ops.neurons -> units)."""
    script = """
import importlib, pkgutil, sys
import moeprune
names = sorted(m.name for m in pkgutil.walk_packages(moeprune.__path__, "moeprune.") if "._" not in m.name)
failed = []
for name in names:
    for loaded in [m for m in sys.modules if m == "moeprune" or m.startswith("moeprune.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
print(len(names))
print("\\n".join(failed))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    count, *failed = done.stdout.strip().split("\n")
    assert int(count) > 80 and not [f for f in failed if f], failed
