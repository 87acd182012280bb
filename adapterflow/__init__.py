"""adapterflow: PEFT-compatible LoRA / PiSSA adapters on torch + safetensors.

    from adapterflow import LoraConfig, get_adapter_model, AdapterModel
"""

from adapterflow.config import ConfigError, LoraConfig
from adapterflow.model import AdapterModel, get_adapter_model
from adapterflow.pissa import ConversionError, convert_pissa_to_lora
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
    "TargetError",
    "convert_pissa_to_lora",
    "get_adapter_model",
    "get_adapter_state_dict",
    "read_adapter",
    "write_adapters",
]
