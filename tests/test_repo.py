"""Repository rules: package list vs folder tree, the operator/ stdlib-shadowing guard, torch-free
operator and planner, module size budget (docs/architecture.md#layout, docs/architecture.md#import-rules,
docs/architecture.md#habits)."""
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPING = {"operator": "longserve.operator", "server": "longserve.server", "kernels": "longserve.kernels",
           "bench": "longserve.bench"}
SKIP_DIRS = {"__pycache__"}


def _declared_packages():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(data["tool"]["setuptools"]["packages"]), data["tool"]["setuptools"]["package-dir"]


def test_package_list_matches_tree():
    declared, package_dir = _declared_packages()
    assert package_dir == {v: k for k, v in MAPPING.items()}
    found = set()
    for folder, name in MAPPING.items():
        for path, dirs, files in os.walk(ROOT / folder):
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
            if any(f.endswith(".py") for f in files):
                rel = Path(path).relative_to(ROOT / folder)
                found.add(".".join([name, *rel.parts]) if rel.parts else name)
    assert found == declared, f"undeclared: {sorted(found - declared)}; missing: {sorted(declared - found)}"


def test_operator_folder_never_shadows_stdlib():
    assert not (ROOT / "operator" / "__init__.py").exists()
    assert not (ROOT / "conftest.py").exists()
    run = subprocess.run([sys.executable, "-c", "import collections, operator; print(operator.__file__)"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert str(ROOT / "operator") not in run.stdout


BLOCK_TORCH = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'triton', 'transformers'):
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
"""


def test_operator_and_planner_import_without_torch():
    modules = sorted(f"longserve.operator.{p.stem}" for p in (ROOT / "operator").glob("*.py"))
    code = BLOCK_TORCH + f"""
import importlib
for name in {modules!r} + ['longserve.server.config', 'longserve.server.sampling', 'longserve.server.cli']:
    importlib.import_module(name)
assert 'torch' not in sys.modules
from longserve.server.cli import main
rc = main(['plan', '--model', 'Qwen/Qwen2.5-7B-Instruct-1M', '--gpu', 'H200-141GB', '-o', 'json'])
assert rc == 0, rc
assert 'torch' not in sys.modules
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONSAFEPATH": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert '"tensorParallelSize": 1' in run.stdout


def _python_modules():
    for folder in list(MAPPING) + ["tests", "tools"]:
        for path in (ROOT / folder).rglob("*.py"):
            if "pb" in path.parts or "__pycache__" in path.parts:
                continue
            yield path


@pytest.mark.parametrize("limit", [800])
def test_module_size_budget(limit):
    too_big = {str(p.relative_to(ROOT)): n for p in _python_modules()
               if (n := len(p.read_text(encoding="utf-8").splitlines())) > limit}
    assert not too_big, f"modules over {limit} lines (split them): {too_big}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make test" in ci


def test_one_python_floor_everywhere():
    """Python 3.11 is the floor (tomllib, typing and asyncio features the code uses): the package metadata, the
    README and the image's base say the same."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["requires-python"] == ">=3.11"
    assert "Python 3.11+" in (ROOT / "README.md").read_text()
    assert "ARG BASE_IMAGE=python:3.11-" in (ROOT / "Dockerfile").read_text()
    assert sys.version_info >= (3, 11)
