"""Structural rules of the code base: PEFT is a test-only dependency, the core imports no orchestration or
tracking client, and modules stay small enough to read in one sitting."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGES = ("adapterflow", "flows", "tasks")
SOURCES = sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))
MAX_LINES = 400


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_runtime_import_of_peft(path):
    assert "peft" not in imported_modules(path)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_stay_small(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_core_package_imports_only_torch_and_safetensors():
    code = ("import sys, adapterflow; "
            "print(sorted(m for m in ('prefect', 'mlflow', 'huggingface_hub', 'transformers', 'peft') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == "[]"


def test_core_modules_never_import_prefect_or_mlflow():
    for path in (ROOT / "adapterflow").rglob("*.py"):
        assert not imported_modules(path) & {"prefect", "mlflow"}, path


def test_adapter_library_does_not_import_the_runtime():
    """adapterflow/*.py is the adapter library; the training runtime (transformers, tokenizers, datasets) lives in
    adapterflow/runtime/ and the pipeline in flows/ and tasks/, which the library never imports."""
    for path in (ROOT / "adapterflow").glob("*.py"):
        imported = {name for name in _full_imports(path)}
        assert not {m for m in imported if m.split(".")[0] in ("transformers", "tokenizers", "datasets")}, path
        assert not {m for m in imported if m.startswith(("adapterflow.runtime", "adapterflow.flows",
                                                          "adapterflow.tasks"))}, path


def _full_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_every_package_is_installed():
    """pyproject.toml lists the packages by hand (flows/ and tasks/ are mapped into the adapterflow namespace), so
    a new subpackage must be added there, or a non-editable install silently lacks it."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {folder: package for package, folder in setuptools.get("package-dir", {}).items()}
    found = set()
    for init in ROOT.glob("**/__init__.py"):
        folder = init.parent.relative_to(ROOT)
        top = folder.parts[0]
        if top == "adapterflow":
            found.add(".".join(folder.parts))
        elif top in mapped:
            found.add(".".join((mapped[top], *folder.parts[1:])))
    assert set(setuptools["packages"]) == found
    data = setuptools["package-data"]
    assert all(package in found for package in data)
