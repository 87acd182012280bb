"""Deployments end to end: the operator's scripts/stack.sh brings up a real Prefect server, MLflow server, work pool,
deployments and a worker; `prefect deployment run 'save-adapter/local' --watch` runs the flow there."""

import json
import shutil
import os
import subprocess
import sys
from pathlib import Path

import pytest

from servers import free_port

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
TINY = {"training": {"steps": 6, "batch_size": 8, "max_seq_len": 32, "checkpoint_every": 3, "warmup_steps": 1},
        "adapter": {"r": 4}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    state = tmp_path_factory.mktemp("stack")
    env = {**os.environ, "ADAPTERFLOW_STACK_DIR": str(state), "PREFECT_PORT": str(free_port()),
           "MLFLOW_PORT": str(free_port()), "ADAPTERFLOW_RUNS_ROOT": str(state / "runs"), "ADAPTERFLOW_BIN": str(BIN)}
    env.pop("PREFECT_API_URL", None)
    up = subprocess.run([ROOT / "scripts" / "stack.sh", "up"], env=env, capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        env["PREFECT_API_URL"] = f"http://127.0.0.1:{env['PREFECT_PORT']}/api"
        yield env, state
    finally:
        pids = {p.stem: int(p.read_text()) for p in state.glob("*.pid")}
        down = subprocess.run([ROOT / "scripts" / "stack.sh", "down"], env=env, capture_output=True, text=True,
                              timeout=120)
        assert down.returncode == 0, down.stderr
        assert set(pids) == {"prefect-server", "mlflow", "worker"}
        for name, pid in pids.items():
            assert not _alive(pid), f"{name} (pid {pid}) still running after stack.sh down"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def deployment_run(env, config: dict, *extra: str, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BIN / "prefect", "deployment", "run", "save-adapter/local", "--param", f"config={json.dumps(config)}",
         "--watch", "--watch-timeout", str(timeout), *extra],
        env=env, capture_output=True, text=True, timeout=timeout + 60, cwd="/")


def _run_span(env, run_id: str) -> tuple[str, str]:
    inspected = subprocess.run([BIN / "prefect", "flow-run", "inspect", run_id, "--output", "json"], env=env,
                               capture_output=True, text=True, timeout=60)
    run = json.loads(inspected.stdout)
    return run["start_time"], run["end_time"]  # ISO 8601 in UTC: comparable as strings


def flow_run_id(output: str) -> str:
    for line in output.splitlines():
        if "UUID:" in line:
            return line.split("UUID:")[1].strip()
    raise AssertionError(f"no flow run id in: {output}")


@pytest.mark.slow
def test_deployment_run_with_watch(stack):
    env, state = stack
    result = deployment_run(env, TINY)
    assert result.returncode == 0, result.stdout + result.stderr
    run_id = flow_run_id(result.stdout)
    adapter = state / "runs" / run_id / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True  # TINY's PiSSA r=4, converted to LoRA r=8
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    watched = "".join(result.stdout.split())  # --watch prints the flow's logs, wrapped to the terminal width
    assert f"Adapter:{adapter}" in watched and "MLflowrun:http://127.0.0.1:" in watched  # its last lines
    assert "MLflowmodelversion:http://127.0.0.1:" in watched
    keys = subprocess.run([BIN / "python", "-c", (
        "import sys; from prefect.client.orchestration import get_client;"
        "from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId;"
        "c = get_client(sync_client=True).__enter__();"
        f"print(sorted(a.key for a in c.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=['{run_id}'])))))"
    )], env=env, capture_output=True, text=True, timeout=60)
    assert "saved-files" in keys.stdout and "training-summary" in keys.stdout and "verification-report" in keys.stdout


@pytest.mark.slow
def test_invalid_parameter_is_rejected_by_the_schema(stack):
    env, _ = stack
    result = deployment_run(env, {"adapter": {"r": 0}})
    assert result.returncode == 1
    assert "Validation failed" in result.stdout + result.stderr and "minimum of 1" in result.stdout + result.stderr


@pytest.mark.slow
def test_two_concurrent_runs_get_separate_outputs(stack):
    env, state = stack
    runs = [subprocess.Popen(
        [BIN / "prefect", "deployment", "run", "save-adapter/local", "--param", f"config={json.dumps(TINY)}",
         "--watch", "--watch-timeout", "400"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)]
    outputs = [run.communicate(timeout=460)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    ids = [flow_run_id(out) for out in outputs]
    assert ids[0] != ids[1]
    adapters = [state / "runs" / run_id / "adapter" for run_id in ids]
    assert all(json.loads((a / "adapter_config.json").read_text())["r"] == 8 for a in adapters)  # PiSSA r=4, converted
    assert adapters[0] != adapters[1]  # one folder each (the same seed gives the same bytes in both)
    spans = [_run_span(env, run_id) for run_id in ids]
    assert max(start for start, _ in spans) < min(end for _, end in spans)  # the runs overlapped: concurrent


@pytest.mark.slow
def test_plain_prefect_deploy_from_the_project_root(prefect_api, tmp_path):
    """Prefect's documented way, with no project-specific environment variable: `prefect deploy` from the project
    root, a worker on the pool, `prefect deployment run --watch`. The runs start in the folder deployed from, so
    a relative runs_root lands there."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTERFLOW_") or k == "ADAPTERFLOW_CACHE"}
    env.update(PREFECT_API_URL=prefect_api, PREFECT_WORKER_QUERY_SECONDS="2")
    pool = subprocess.run([BIN / "prefect", "work-pool", "create", "adapterflow-local", "--type", "process",
                           "--overwrite"], env=env, capture_output=True, text=True, timeout=120)
    assert pool.returncode == 0, pool.stdout + pool.stderr
    deploy = subprocess.run([BIN / "prefect", "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml",
                             "--all"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert deploy.returncode == 0 and "save-adapter/local" in deploy.stdout, deploy.stdout + deploy.stderr
    inspected = subprocess.run([BIN / "prefect", "deployment", "inspect", "save-adapter/local", "--output", "json"],
                               env=env, capture_output=True, text=True, timeout=60)
    pull = json.loads(inspected.stdout)["pull_steps"]
    assert pull == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT.resolve())}}]

    runs_root = f"runs/deploy-test-{os.getpid()}"  # relative: against the deployment's working directory
    worker = subprocess.Popen([BIN / "prefect", "worker", "start", "--pool", "adapterflow-local"], env=env,
                              cwd=tmp_path, stdout=open(tmp_path / "worker.log", "wb"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        result = deployment_run({**env, "PREFECT_API_URL": prefect_api},
                                {**TINY, "runs_root": runs_root, "mlflow": {"enabled": False}})
        assert result.returncode == 0, result.stdout + result.stderr + (tmp_path / "worker.log").read_text()[-3000:]
        adapter = ROOT / runs_root / flow_run_id(result.stdout) / "adapter"
        assert (adapter / "adapter_model.safetensors").is_file()
        assert not (tmp_path / "runs").exists()  # not the worker's own folder
    finally:
        os.killpg(worker.pid, 15)
        try:  # a Prefect worker can take a while to stop on a loaded machine; what it leaves must not outlive it
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, 9)
            worker.wait(timeout=30)
        shutil.rmtree(ROOT / runs_root, ignore_errors=True)
