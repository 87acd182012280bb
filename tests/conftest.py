"""Shared test setup: offline, quiet, one tiny Llama base model per session.

Environment variables must be set before prefect / mlflow / huggingface_hub are imported anywhere, so they are
set here at import time of the conftest, which pytest loads before any test module.
"""

import os
from pathlib import Path

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
    }
)

import pytest  # noqa: E402
import torch  # noqa: E402

import tiny  # noqa: E402


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
