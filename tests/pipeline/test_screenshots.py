"""scripts/screenshots.sh end to end: the stack comes up, one deployment run, every page captured as a small PNG
that shows something (not a blank or error page), the stack goes down. Skipped without a chromium binary."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from servers import free_port

ROOT = Path(__file__).parents[2]
PAGES = {"mlflow-runs", "mlflow-run", "mlflow-train-loss", "mlflow-models", "mlflow-model-version", "prefect-flow-run",
         "prefect-artifacts", "prefect-run-summary", "prefect-deployment-form"}


@pytest.mark.slow
@pytest.mark.skipif(not any(map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))),
                    reason="no chromium binary on PATH (Debian: apt-get install -y chromium)")
def test_screenshots_script_captures_every_page(tmp_path):
    from PIL import Image

    env = {**os.environ, "ADAPTERFLOW_SCREENSHOTS_DIR": str(tmp_path / "images"),
           "ADAPTERFLOW_STACK_DIR": str(tmp_path / "stack"), "PREFECT_PORT": str(free_port()),
           "MLFLOW_PORT": str(free_port()), "ADAPTERFLOW_BIN": str(Path(sys.executable).parent),
           "SCREENSHOT_CONFIG": '{"training": {"steps": 12, "batch_size": 8, "max_seq_len": 32}}'}
    for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "ADAPTERFLOW_RUNS_ROOT"):
        env.pop(name, None)
    result = subprocess.run([ROOT / "scripts" / "screenshots.sh"], env=env, capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    shots = {p.stem: p for p in (tmp_path / "images").glob("*.png")}
    assert set(shots) == PAGES
    for name, path in shots.items():
        image = Image.open(path)
        assert image.width == 960 and 500 < image.height < 700, name
        assert path.stat().st_size < 200 * 1024, name
        assert len(image.convert("RGB").getcolors(1 << 16) or []) > 20, f"{name} looks blank"
    assert not list((tmp_path / "stack").glob("*.pid"))  # stack.sh down ran
