"""The adapter as an MLflow pyfunc model ("models from code"): base model + adapter -> generated text.

`adapterflow.integrations.mlflow_registry` saves this file as the model's code (`python_model=<this file>`); MLflow
stores it next to the model and runs it when the model is loaded. The model's files are the adapter folder (the
`adapter` artifact) and a copy of the library's and runtime's `.py` files (`code_paths`), so loading needs
torch, transformers and safetensors only: no peft, no Prefect, nothing of the pipeline. The base model is not
packaged: its folder comes from `model_config["base_model_path"]`, else from the adapter's
adapter_config.json (`base_model_name_or_path`), and must exist where the model is loaded.

    model = mlflow.pyfunc.load_model("models:/<name>@candidate")
    model.predict(["Write a haiku about autumn."], params={"max_new_tokens": 16})   # -> ["...generated..."]
"""

from __future__ import annotations

import json
import os
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

DEFAULT_MAX_NEW_TOKENS = 32


class AdapterTextGenerator(PythonModel):
    """Greedy (or sampled, with temperature > 0) text generation with the base model plus the adapter."""

    def load_context(self, context) -> None:
        # Imported here: `adapterflow` is found through the model's code path only once MLflow has added it.
        from adapterflow import AdapterModel
        from adapterflow.runtime.base_models import load_base_model, load_tokenizer

        config = dict(context.model_config or {})
        adapter_dir = context.artifacts["adapter"]
        base_path = config.get("base_model_path") or _adapter_base_path(adapter_dir)
        if not base_path or not os.path.isdir(base_path):
            raise FileNotFoundError(
                f"Base model folder {base_path!r} not found: the adapter needs its base model on this machine. "
                f"Load the model with model_config={{'base_model_path': '<local folder>'}}.")
        self.tokenizer = load_tokenizer(base_path)
        self.model = AdapterModel.from_pretrained(load_base_model(base_path), adapter_dir,
                                                  adapter_name=config.get("adapter_name", "default")).eval()

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        """Prompts -> generated texts (without the prompt). Through pyfunc, a list of strings or a one-column
        DataFrame (e.g. `prompt`) arrives as a DataFrame; a plain list or string works when called directly.
        params (the logged signature's defaults apply): `max_new_tokens` (32), `temperature` (0 = greedy).

        The DataFrame type hint tells MLflow to use the logged signature instead of inferring one from the hint.
        """
        import torch

        params = params or {}
        max_new_tokens = int(params.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        temperature = float(params.get("temperature") or 0.0)
        outputs = []
        for prompt in _prompts(model_input):
            # A prompt rendered by a chat template (the input example of chat data) already starts with <bos>.
            bos = self.tokenizer.bos_token
            encoded = self.tokenizer(prompt, return_tensors="pt",
                                     add_special_tokens=not (bos and prompt.startswith(bos)))
            sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
            with torch.no_grad():
                generated = self.model.generate(**encoded, max_new_tokens=max_new_tokens,
                                                pad_token_id=self.tokenizer.pad_token_id, **sampling)
            new_tokens = generated[0, encoded["input_ids"].shape[1]:]
            outputs.append(self.tokenizer.decode(new_tokens, skip_special_tokens=True))
        return outputs


def _prompts(model_input) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):  # pandas DataFrame
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(value) for value in model_input[column].tolist()]
    if isinstance(model_input, dict):
        values = model_input.get("prompt", next(iter(model_input.values()), []))
        return [values] if isinstance(values, str) else [str(value) for value in values]
    return [str(value) for value in model_input]


def _adapter_base_path(adapter_dir: str) -> str | None:
    try:
        with open(os.path.join(adapter_dir, "adapter_config.json")) as file:
            return json.load(file).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None


mlflow.models.set_model(AdapterTextGenerator())
