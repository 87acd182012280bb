"""Shared test setup: offline, quiet, one tiny Llama base model per session.

Environment variables must be set before prefect / mlflow / huggingface_hub are imported anywhere, so they are
set here at import time of the conftest, which pytest loads before any test module.
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="adapterflow-tests-"))
os.environ.update(
    {
        "DO_NOT_TRACK": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
        # Prefect reads its settings at import: a private home, fast retries, a patient ephemeral server.
        "PREFECT_HOME": str(_SESSION_DIR / "prefect-home"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "ADAPTERFLOW_RETRY_BACKOFF": "0.05",
        "ADAPTERFLOW_CACHE": str(_SESSION_DIR / "cache"),
        "HF_DATASETS_CACHE": str(_SESSION_DIR / "datasets-cache"),  # datasets' Arrow cache, never ~/.cache
    }
)

sys.path.insert(0, str(Path(__file__).parent / "support"))  # tests/support: servers, tiny models, flow helpers

import pytest  # noqa: E402
import torch  # noqa: E402

import tiny  # noqa: E402
from mlflow_server import mlflow_server  # noqa: E402,F401 - session fixture


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    """A tiny Llama saved as a real transformers model folder (untied embeddings)."""
    return tiny.save_tiny_llama(tmp_path_factory.mktemp("base") / "tiny-llama")


@pytest.fixture(scope="session")
def tied_base_dir(tmp_path_factory) -> Path:
    """The same architecture with tied input/output embeddings."""
    return tiny.save_tiny_llama(tmp_path_factory.mktemp("base") / "tiny-llama-tied", tie_word_embeddings=True)


@pytest.fixture
def load_base(base_dir):
    """Factory for fresh copies of the base model."""
    return lambda path=base_dir, **kw: tiny.load_llama(path, **kw)


@pytest.fixture(scope="session")
def input_ids() -> torch.Tensor:
    return torch.randint(0, tiny.VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def isolated_hf_home(tmp_path_factory):
    """HF_HOME, token and client settings of one test module point into a temp folder, never ~/.cache/huggingface."""
    from hub_server import isolated_hub_client

    with isolated_hub_client(tmp_path_factory.mktemp("hf_home")) as home:
        yield home


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """One real Prefect server for the whole session (`prefect server start`), used by in-process flows and by
    subprocesses (pass `prefect_api` as PREFECT_API_URL)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from servers import ServerProcess, free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    server = ServerProcess(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        f"{url}/health", tmp_path_factory.mktemp("prefect") / "server.log",
        env={"PREFECT_UI_API_URL": url},  # the UI's pages call this API (its default is port 4200)
    ).start()
    try:
        # Heartbeats only serve crash detection of deployed runs; without them a flow run ends ~1 s sooner.
        with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield url
            _drain_prefect_workers()
    finally:
        server.stop()


def _drain_prefect_workers() -> None:
    # Logs and events still queued for the API must go out before the server stops, or exit hangs ~80 s.
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()
    EventsWorker.drain_all()


def pytest_sessionfinish(session, exitstatus):
    # Session fixtures (servers) are torn down by now; the Prefect home and the builtin-model cache go with them.
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)
