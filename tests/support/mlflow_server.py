"""A real MLflow tracking server for tests: `mlflow server` on sqlite with proxied artifacts, one per session.

conftest.py exposes the session fixture `mlflow_server` (the server's http URI); or use
`MlflowServer(directory).start()` / `.stop()` directly.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest

from servers import ServerProcess, free_port


class MlflowServer:
    """`mlflow server` with its store in `directory` (mlflow.db, artifacts/), on a free 127.0.0.1 port, in its
    own process group; stopped by PID (SIGTERM to the group)."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = Path(directory)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        mlflow_cli = Path(sys.executable).with_name("mlflow")
        command = [str(mlflow_cli)] if mlflow_cli.exists() else [sys.executable, "-m", "mlflow"]
        self.process = ServerProcess(
            [*command, "server", "--backend-store-uri", f"sqlite:///{self.directory / 'mlflow.db'}",
             "--artifacts-destination", str(self.directory / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            f"{self.uri}/health", self.directory / "server.log",
            # No job runner (7 huey consumers, ~1 GB): the server is healthy seconds sooner.
            env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"},
        )
        # A tracking URI inherited from the developer's shell must not point the server's own client elsewhere.
        self.process.env.pop("MLFLOW_TRACKING_URI", None)

    def start(self, timeout: float = 90) -> "MlflowServer":
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process.start(timeout=timeout)
        return self

    def stop(self) -> None:
        self.process.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """The http URI of one real MLflow tracking server shared by the session's tests."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    try:
        yield server.uri
    finally:
        server.stop()
