"""Helpers for running the save-adapter flow in tests and reading back what Prefect recorded."""

from __future__ import annotations

import json
import time

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from adapterflow.flows.parameters import SaveAdapterParameters
from adapterflow.flows.save_adapter import save_adapter

FLOW_TASKS = {"prepare-run", "train-adapter", "extract-adapter", "convert-pissa-to-lora", "save-adapter",
              "verify-adapter", "export-merged", "evaluate-adapter", "log-to-mlflow", "promote-adapter", "push-to-hub"}
TINY_TRAINING = {"steps": 8, "batch_size": 8, "max_seq_len": 32, "checkpoint_every": 4, "warmup_steps": 2}


def parameters(runs_root, **sections) -> SaveAdapterParameters:
    data = {"runs_root": str(runs_root), "training": dict(TINY_TRAINING), "adapter": {"r": 4, "init": "pissa_niter_2"}}
    sections.setdefault("mlflow", {"enabled": False})  # tests that check MLflow point it at the session's server
    for name, value in sections.items():
        data[name] = {**data.get(name, {}), **value} if isinstance(value, dict) else value
    return SaveAdapterParameters.model_validate(data)


def run_flow(runs_root, **sections):
    """Run the flow in-process against the session's Prefect API; returns its final state."""
    return save_adapter(config=parameters(runs_root, **sections), return_state=True)


def flow_run_id(state) -> str:
    return str(state.state_details.flow_run_id)


def task_runs(state, *expect: str, timeout: float = 20) -> dict[str, object]:
    """The flow run's task runs by task name (e.g. "train-adapter"), once the server has recorded their final
    states (task run states reach the server as events, shortly after the flow returns; a completed flow ran every
    task, so all of them must have arrived; for a failed flow, name the task runs to wait for in `expect`)."""
    deadline = time.monotonic() + timeout
    expected = (FLOW_TASKS if state.is_completed() else set()) | set(expect)
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id(state)])))
            by_name = {run.name.rsplit("-", 1)[0]: run for run in runs}
            if (set(by_name) >= expected and all(run.state and run.state.is_final() for run in runs)) \
                    or time.monotonic() > deadline:
                return by_name
            time.sleep(0.2)


def artifacts(state) -> dict[str, object]:
    """The flow run's artifacts by key; table data decoded from JSON."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id(state)])))
    result = {}
    for artifact in found:
        data = artifact.data
        if artifact.type == "table" and isinstance(data, str):
            data = json.loads(data)
        result[artifact.key] = (artifact.type, data)
    return result


def flow_logs(state, until=lambda messages: True, timeout: float = 20) -> list[str]:
    """The flow run's log messages in order, once `until(messages)` holds (logs reach the API in batches)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            messages = [log.message for log in client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id(state)])),
                sort=LogSort.TIMESTAMP_ASC)]
            if until(messages) or time.monotonic() > deadline:
                return messages
            time.sleep(0.5)
