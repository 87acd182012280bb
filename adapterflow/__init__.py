"""adapterflow: PEFT-compatible LoRA / PiSSA adapters on torch + safetensors.

    from adapterflow import LoraConfig, get_adapter_model, AdapterModel
"""

import os as _os

# In a source checkout the pipeline's folders flows/ and tasks/ sit beside this package and install as
# adapterflow.flows / adapterflow.tasks (pyproject.toml's package-dir). When this checkout's adapterflow/ is the one
# imported even though the package is installed elsewhere (the current directory comes first on sys.path: e.g.
# `prefect deploy` or a flow run in the project root next to a non-editable install), the checkout root joins the
# package's search path so that those two names resolve to the same files. In site-packages nothing changes.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "flows", "save_adapter.py")) and _checkout not in __path__:
    __path__.append(_checkout)

from adapterflow.config import ConfigError, LoraConfig  # noqa: E402
from adapterflow.model import AdapterModel, get_adapter_model
from adapterflow.conversion import ConversionError, convert_pissa_to_lora
from adapterflow.manifest import ManifestError, verify_manifest
from adapterflow.save import read_adapter, write_adapters
from adapterflow.state_dict import AdapterLoadError, get_adapter_state_dict
from adapterflow.targeting import TargetError

__version__ = "0.1.0"

__all__ = [
    "AdapterLoadError",
    "AdapterModel",
    "ConfigError",
    "ConversionError",
    "LoraConfig",
    "ManifestError",
    "TargetError",
    "convert_pissa_to_lora",
    "get_adapter_model",
    "get_adapter_state_dict",
    "read_adapter",
    "verify_manifest",
    "write_adapters",
]
