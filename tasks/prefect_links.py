"""Links into the Prefect UI, when one is configured."""

from __future__ import annotations

from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL


def flow_run_url(flow_run_id: str) -> str | None:
    """The flow run's page in the Prefect UI; None for Prefect's temporary local API, which has no lasting UI."""
    if not PREFECT_API_URL.value():
        return None
    ui = PREFECT_UI_URL.value()
    return f"{ui}/runs/flow-run/{flow_run_id}" if ui else None
