#!/usr/bin/env bash
# The local stack for deployments: Prefect server, MLflow server, the process work pool, the deployments and a
# worker, all on 127.0.0.1, in the background, stopped by PID.
#
#   scripts/stack.sh up        start everything (idempotent: parts already running are left alone)
#   scripts/stack.sh down      stop everything that `up` started
#   scripts/stack.sh status    what is running
#
# Settings (environment): ADAPTERFLOW_STACK_DIR (state, logs, PID files; default .stack), PREFECT_PORT (4200),
# MLFLOW_PORT (5000), ADAPTERFLOW_RUNS_ROOT (run directories; default runs/ in the project).
set -euo pipefail
set -m  # each background server gets its own process group: one SIGTERM to the group stops it and its children

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${ADAPTERFLOW_BIN:-$ROOT/.venv/bin}
STACK_DIR=${ADAPTERFLOW_STACK_DIR:-$ROOT/.stack}
PREFECT_PORT=${PREFECT_PORT:-4200}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
POOL=adapterflow-local
SERVICES=(worker mlflow prefect-server)  # stop order

export PREFECT_HOME=$STACK_DIR/prefect-home
export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true HF_HUB_DISABLE_TELEMETRY=1

running() { [[ -f $STACK_DIR/$1.pid ]] && kill -0 "$(cat "$STACK_DIR/$1.pid")" 2>/dev/null; }

start() {  # start NAME COMMAND...: in the background, output to NAME.log, PID to NAME.pid
  local name=$1; shift
  if running "$name"; then echo "$name already running (pid $(cat "$STACK_DIR/$name.pid"))"; return; fi
  nohup "$@" >"$STACK_DIR/$name.log" 2>&1 &
  echo $! >"$STACK_DIR/$name.pid"
}

wait_healthy() {  # wait_healthy NAME URL
  for _ in $(seq 1 600); do
    "$BIN/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$2" 2>/dev/null && return
    running "$1" || { echo "$1 exited; see $STACK_DIR/$1.log" >&2; tail -20 "$STACK_DIR/$1.log" >&2; exit 1; }
    sleep 0.2
  done
  echo "$1 not healthy after 120 s; see $STACK_DIR/$1.log" >&2; exit 1
}

up() {
  mkdir -p "$STACK_DIR"
  # Log streaming on: `prefect deployment run ... --watch` then prints the flow's logs (the adapter folder and the
  # MLflow and Hub links are its last lines), not only state events; both settings default to false.
  PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED=true PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED=true \
    start prefect-server "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false start mlflow "$BIN/mlflow" server \
    --backend-store-uri "sqlite:///$STACK_DIR/mlflow.db" --artifacts-destination "$STACK_DIR/mlartifacts" \
    --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1
  wait_healthy prefect-server "$PREFECT_API_URL/health"
  wait_healthy mlflow "$MLFLOW_TRACKING_URI/health"
  "$BIN/prefect" work-pool create "$POOL" --type process --overwrite >/dev/null
  (cd "$ROOT" && "$BIN/prefect" --no-prompt deploy --prefect-file deployments/prefect.yaml --all >"$STACK_DIR/deploy.log" 2>&1) \
    || { cat "$STACK_DIR/deploy.log" >&2; exit 1; }
  PREFECT_WORKER_QUERY_SECONDS=2 start worker "$BIN/prefect" worker start --pool "$POOL"
  cat <<EOF
Stack is up (state and logs in $STACK_DIR).
  Prefect UI:  http://127.0.0.1:$PREFECT_PORT
  MLflow UI:   $MLFLOW_TRACKING_URI
Use it from this shell with:
  export PREFECT_API_URL=$PREFECT_API_URL MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI
  prefect deployment run 'save-adapter/local' --watch
EOF
}

down() {
  for name in "${SERVICES[@]}"; do
    running "$name" || { rm -f "$STACK_DIR/$name.pid"; continue; }
    local pid; pid=$(cat "$STACK_DIR/$name.pid")
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for _ in $(seq 1 75); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -KILL -- "-$pid" 2>/dev/null
    rm -f "$STACK_DIR/$name.pid"
    echo "stopped $name (pid $pid)"
  done
}

status() {
  for name in "${SERVICES[@]}"; do
    if running "$name"; then echo "$name: running (pid $(cat "$STACK_DIR/$name.pid"))"; else echo "$name: stopped"; fi
  done
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
