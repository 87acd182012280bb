#!/usr/bin/env bash
# The README's pictures: bring up the stack (scripts/stack.sh: Prefect server, MLflow server, work pool,
# deployments, worker), run the save-adapter deployment once, and capture what a user sees with headless
# Chromium (driven by scripts/capture_pages.py) into docs/images/*.png: 1280x800 pages, downscaled to 960 pixels
# wide, 256-colour PNGs (about 50-70 KiB each).
#
#   apt-get install -y chromium        # Debian's package (about 50 s here, 130 packages)
#   scripts/screenshots.sh
#
# Settings (environment): ADAPTERFLOW_SCREENSHOTS_DIR (where the PNGs go; default docs/images),
# ADAPTERFLOW_STACK_DIR (default .stack-screenshots, emptied first: a fresh stack), PREFECT_PORT (4230),
# MLFLOW_PORT (5030), SCREENSHOT_CONFIG (the run's parameters as JSON; default: the demo with 120 steps).
# The stack is stopped at the end, also on failure (stack.sh down: by PID).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${ADAPTERFLOW_BIN:-$ROOT/.venv/bin}
OUT=${ADAPTERFLOW_SCREENSHOTS_DIR:-$ROOT/docs/images}
export ADAPTERFLOW_STACK_DIR=${ADAPTERFLOW_STACK_DIR:-$ROOT/.stack-screenshots}
export PREFECT_PORT=${PREFECT_PORT:-4230} MLFLOW_PORT=${MLFLOW_PORT:-5030}
export ADAPTERFLOW_RUNS_ROOT=${ADAPTERFLOW_RUNS_ROOT:-$ADAPTERFLOW_STACK_DIR/runs}
export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true HF_HUB_DISABLE_TELEMETRY=1
CONFIG=${SCREENSHOT_CONFIG:-'{"training": {"steps": 120}}'}
command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null \
  || { echo "no chromium on PATH; install it with: apt-get install -y chromium" >&2; exit 2; }

"$ROOT/scripts/stack.sh" down >/dev/null 2>&1 || true
rm -rf "$ADAPTERFLOW_STACK_DIR"
mkdir -p "$OUT" "$ADAPTERFLOW_STACK_DIR/shots"
trap '"$ROOT/scripts/stack.sh" down >/dev/null' EXIT
"$ROOT/scripts/stack.sh" up >/dev/null

echo "running save-adapter/local once (parameters: $CONFIG)"
"$BIN/prefect" deployment run 'save-adapter/local' --param "config=$CONFIG" --watch --watch-timeout 900 \
  >"$ADAPTERFLOW_STACK_DIR/watch.log" 2>&1 || { tail -30 "$ADAPTERFLOW_STACK_DIR/watch.log" >&2; exit 1; }
FLOW_RUN=$(sed -n 's/.*UUID: *\([0-9a-f-]\{36\}\).*/\1/p' "$ADAPTERFLOW_STACK_DIR/watch.log" | head -1)

# NAME=URL[|ACTION...] for each page (capture_pages.py), from what the run recorded in Prefect and MLflow
"$BIN/python" - "$FLOW_RUN" >"$ADAPTERFLOW_STACK_DIR/pages.txt" <<'PY'
import os, sys
from urllib.parse import quote
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

flow_run_id, mlflow_uri = sys.argv[1], os.environ["MLFLOW_TRACKING_URI"]
prefect_ui = os.environ["PREFECT_API_URL"].removesuffix("/api")
client = MlflowClient(mlflow_uri, mlflow_uri)
experiment = client.get_experiment_by_name("adapterflow").experiment_id
[run] = client.search_runs([experiment], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
[version] = client.search_model_versions(f"run_id = '{run.info.run_id}'")
with get_client(sync_client=True) as prefect:
    deployment = prefect.read_deployment_by_name("save-adapter/local").id
    [summary] = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["run-summary"])),
                                       flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
run_page = f"{mlflow_uri}/#/experiments/{experiment}/runs/{run.info.run_id}"
for name, url in [("mlflow-runs", f"{mlflow_uri}/#/experiments/{experiment}/runs|click:Model training"),
                  ("mlflow-run", run_page),
                  ("mlflow-train-loss", f"{run_page}/model-metrics|type:Search metric charts=loss"),
                  ("mlflow-models", f"{mlflow_uri}/#/experiments/{experiment}/models"),
                  ("mlflow-model-version", f"{mlflow_uri}/#/models/{quote(version.name)}/versions/{version.version}"),
                  ("prefect-flow-run", f"{prefect_ui}/runs/flow-run/{flow_run_id}"),
                  ("prefect-artifacts", f"{prefect_ui}/runs/flow-run/{flow_run_id}|click:Artifacts|scroll:Flow run"),
                  ("prefect-run-summary", f"{prefect_ui}/artifacts/artifact/{summary.id}"),
                  ("prefect-deployment-form", f"{prefect_ui}/deployments/deployment/{deployment}/run")]:
    print(f"{name}={url}")
PY

mapfile -t PAGES <"$ADAPTERFLOW_STACK_DIR/pages.txt"
timeout 900 "$BIN/python" "$ROOT/scripts/capture_pages.py" "$ADAPTERFLOW_STACK_DIR/shots" "${PAGES[@]}"

# Smaller files for the repository: 960 pixels wide, 256 colours (Pillow comes with matplotlib).
"$BIN/python" - "$ADAPTERFLOW_STACK_DIR/shots" "$OUT" <<'PY'
import sys
from pathlib import Path
from PIL import Image

for shot in sorted(Path(sys.argv[1]).glob("*.png")):
    image = Image.open(shot).convert("RGB")
    image = image.resize((960, round(image.height * 960 / image.width)), Image.LANCZOS)
    target = Path(sys.argv[2]) / shot.name
    image.quantize(256, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)
    print(f"{target}: {target.stat().st_size // 1024} KiB")
PY
