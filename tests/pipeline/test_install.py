"""The package as a stranger gets it: `pip install .` (not editable) into a fresh venv, then `adapterflow run` from
their own folder, far from the checkout."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


@pytest.mark.slow
def test_non_editable_install_runs_from_any_folder(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile", "-c", str(ROOT / "constraints.txt")]
    if shutil.which("nvidia-smi") is None:  # the CPU build first, as scripts/install.sh does
        subprocess.run([*pip, "torch"], check=True, timeout=900, capture_output=True)
    source = tmp_path / "source"  # the committed files, as a clone has them (pip builds in the source folder)
    for name in subprocess.check_output(["git", "ls-files"], cwd=ROOT, text=True).splitlines():
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    installed = subprocess.run([*pip, str(source)], timeout=900, capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-3000:]

    site = Path(subprocess.check_output([venv / "bin" / "python", "-c",
                                         "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    assert not (site / "flows").exists() and not (site / "tasks").exists()  # no generic top-level names
    assert (site / "adapterflow" / "flows" / "cli.py").is_file() and not (site / "adapterflow.egg-link").exists()
    # In the project's own folder its adapterflow/ shadows the installed one (the current directory comes first on
    # sys.path, as for `prefect deploy` there): the pipeline must still import.
    in_source = subprocess.run([venv / "bin" / "python", "-c", "import adapterflow.flows.save_adapter"], cwd=source,
                               capture_output=True, text=True, timeout=300)
    assert in_source.returncode == 0, in_source.stderr[-2000:]
    package_before = _tree(site / "adapterflow")

    user = tmp_path / "my project"
    user.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "VIRTUAL_ENV", "PYTHONPATH")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    result = subprocess.run([venv / "bin" / "adapterflow", "run", "--set", "training.steps=5"], cwd=user, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    adapter = Path(re.search(r"^adapter:\s+(.+)$", result.stdout, re.M).group(1).strip())
    assert adapter.is_relative_to(user / "runs") and (adapter / "adapter_model.safetensors").is_file()
    assert (user / "runs" / "mlflow.db").is_file()  # the default MLflow store, beside the runs
    assert _tree(site / "adapterflow") == package_before  # nothing written into the installed package
    assert "Traceback" not in result.stderr
