"""AdapterModel: a torch model with LoRA adapters injected, with PEFT's PeftModel API.

Structure mirrors PEFT (`AdapterModel.base_model.model` is the wrapped model), so parameter names read
`base_model.model.<path>.lora_A.<adapter>.weight` and state dicts are interchangeable with PEFT's.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from adapterflow import formats
from adapterflow.config import LoraConfig
from adapterflow.init_methods import is_pissa, is_randomized_pissa
from adapterflow.inject import inject_adapter, replace_module, unwrapped
from adapterflow.layers import AdapterLayer, LoraLayer
from adapterflow.loading import adapter_folder, read_verified_adapter
from adapterflow.save import read_adapter, resolve_conversion_path, save_adapter_model
from adapterflow.state_dict import (
    AdapterLoadError,
    SaveEmbeddingLayers,
    adapter_checksums,
    adapter_layers,
    bias_parameters,
    changed_base_tensors,
    load_adapter_state_dict,
    match_checkpoint,
)


class LoraModel(nn.Module):
    """Holds the adapted model as `.model`, so that names read `base_model.model.<path>` as in PEFT."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


class AdapterModel(nn.Module):
    """A model with one or more LoRA adapters; one adapter is active at a time.

    Create it with `get_adapter_model(model, config)` or load one with `AdapterModel.from_pretrained`.
    Attributes the wrapper does not have (`config`, `generate`, ...) are read from the wrapped model.
    """

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = formats.DEFAULT_ADAPTER_NAME,
                 *, initialize: bool = True) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (e.g. a transformers model), got {type(model).__name__}.")
        if isinstance(model, AdapterModel) or any(isinstance(m, AdapterLayer) for m in model.modules()):
            raise ValueError("The model already has adapters; add more with AdapterModel.add_adapter(name, config).")
        self.base_model = LoraModel(model)
        # The wrapper keeps the model's train/eval mode (nn.Module would start in training mode).
        self.training = self.base_model.training = model.training
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapter: str | None = adapter_name
        self._inject(adapter_name, config, initialize)
        model.requires_grad_(False)
        self.set_adapter(adapter_name)

    # Construction and loading -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id_or_path: str | os.PathLike,
                        adapter_name: str = formats.DEFAULT_ADAPTER_NAME, is_trainable: bool = False,
                        subfolder: str | None = None, verify_manifest: bool = True) -> "AdapterModel":
        """Wrap `model` and load a saved adapter (ours or PEFT's) into it.

        Args:
            model: the base model the adapter was trained on (for a converted PiSSA adapter: the original one).
            model_id_or_path: a local adapter folder (download Hub repos first, e.g. with snapshot_download).
            adapter_name: the name the adapter gets in this model.
            is_trainable: False (default) freezes the adapter and puts the model in eval mode.
            subfolder: a subfolder of model_id_or_path, e.g. the folder of a non-default adapter.
            verify_manifest: check the files and `model` against the folder's adapterflow.json, when it has one
                (adapterflow.loading); False skips that.

        Raises:
            FileNotFoundError: no adapter at the path.
            adapterflow.manifest.ManifestError: a file or the base model differs from the manifest (it names which).
            adapterflow.state_dict.AdapterLoadError: keys or shapes of the checkpoint do not fit the model.
            adapterflow.config.ConfigError: the config uses a PEFT feature we do not implement.
        """
        state, config = read_verified_adapter(adapter_folder(model_id_or_path, subfolder), model, verify_manifest)
        config.inference_mode = not is_trainable
        adapter_model = cls(model, config, adapter_name, initialize=False)
        try:
            adapter_model._load_state(adapter_name, config, state)
        except Exception:
            adapter_model.delete_adapter(adapter_name)  # leave the user's model as it was
            raise
        if not is_trainable:
            adapter_model.eval()
        return adapter_model

    @classmethod
    def from_initial_adapter(cls, model: nn.Module, path: str | os.PathLike,
                             adapter_name: str = formats.DEFAULT_ADAPTER_NAME) -> "AdapterModel":
        """Rebuild a model exactly as it was right after initialisation, from the adapter saved at that moment.

        For PiSSA, the saved factors A0, B0 are subtracted from the base weights (W_res = W - s * B0 @ A0) instead
        of running the SVD again: for "pissa_niter_K" that SVD is randomized and would give another residual. The
        adapter is trainable. Used to resume training and to rebuild a trained model in a fresh process.

        Args:
            model: the original base model.
            path: the initial adapter folder, as saved right after get_adapter_model (adapterflow's conversion
                never rewrites it; one rewritten by PEFT's conversion says init_lora_weights true and loads as
                plain LoRA, without the residual).
        """
        state, config = read_adapter(adapter_folder(path, None))
        config.inference_mode = False
        adapter_model = cls(model, config, adapter_name, initialize=False)
        try:
            load_adapter_state_dict(match_checkpoint(adapter_model, state, adapter_name), state)
        except Exception:
            adapter_model.delete_adapter(adapter_name)
            raise
        if is_pissa(config.init_lora_weights):
            for _, layer in adapter_model._lora_layers(adapter_name):
                layer.restore_pissa_residual(adapter_name)
        return adapter_model

    def load_adapter(self, model_id_or_path: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     subfolder: str | None = None, verify_manifest: bool = True) -> None:
        """Load a saved adapter as an additional adapter called `adapter_name` (it does not become active).

        The other adapters keep their outputs, trainability and the model its train/eval mode; `is_trainable`
        makes the loaded adapter's tensors trainable (PEFT 0.21, `PeftModel.load_adapter`); `verify_manifest`: as
        in from_pretrained (adapterflow.manifest.ManifestError when the files or this base differ).

        Raises:
            ValueError: the name exists. FileNotFoundError: no adapter at the path.
            adapterflow.config.ConfigError: the adapter would change the outputs of the adapters already loaded
                (it trains biases, or is an unconverted PiSSA adapter), or its config is invalid.
            adapterflow.state_dict.AdapterLoadError: unreadable files, keys or shapes that do not fit, or saved
                base-model tensors (biases, embedding layers) that differ from the ones the other adapters use.
        """
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} already exists; delete it first or pick another name.")
        state, config = read_verified_adapter(adapter_folder(model_id_or_path, subfolder), self, verify_manifest)
        config.inference_mode = not is_trainable
        self._inject(adapter_name, config, initialize=False)
        try:
            self._load_state(adapter_name, config, state)
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        self._set_trainable(adapter_name, is_trainable)

    def _load_state(self, adapter_name: str, config: LoraConfig, state: dict[str, torch.Tensor]) -> None:
        pairs = match_checkpoint(self, state, adapter_name)  # every key checked before anything changes
        others = [name for name in self.peft_config if name != adapter_name]
        changed = changed_base_tensors(self, adapter_name, pairs, state) if others else []
        if changed:
            raise AdapterLoadError(
                f"Loading adapter {adapter_name!r} would overwrite base-model tensors that adapters {others} compute "
                f"with, and its values differ: {changed}. Load it into a model of its own, or save it without them "
                f"(bias='none', save_embedding_layers=False)."
            )
        if is_pissa(config.init_lora_weights):
            # The checkpoint was trained on a residual: recompute it from this (original) base model, as PEFT does.
            if is_randomized_pissa(config.init_lora_weights):
                warnings.warn(
                    f"Loading a PiSSA adapter saved without conversion ({config.init_lora_weights!r}): the randomized "
                    f"SVD runs again and gives a different residual, so outputs differ from the trained model. Save "
                    f"it with path_initial_model_for_weight_conversion to get an exact LoRA adapter.",
                    stacklevel=3,
                )
            for _, layer in self._lora_layers(adapter_name):
                layer.initialize(adapter_name, config.init_lora_weights)
        load_adapter_state_dict(pairs, state)

    def add_adapter(self, adapter_name: str, config: LoraConfig) -> None:
        """Inject a new, initialised adapter; it stays inactive (and frozen) until `set_adapter(adapter_name)`.
        The other adapters keep their outputs and trainability, the model its train/eval mode.

        Raises:
            ValueError: the name exists or is invalid.
            adapterflow.config.ConfigError: config is not a LoraConfig, or the adapter would change the outputs
                of the ones already there (bias training, PiSSA, modules_to_save over their LoRA layers).
            adapterflow.targeting.TargetError: the config does not fit the model.
        """
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} already exists; delete it first or pick another name.")
        self._inject(adapter_name, config, initialize=True)
        self._set_trainable(adapter_name, False)

    def _inject(self, adapter_name: str, config: LoraConfig, initialize: bool) -> None:
        # Everything is checked before the model changes, including that the adapters already in the model keep
        # their outputs (inject.coexistence_problems).
        self.peft_config[adapter_name] = inject_adapter(self.base_model.model, adapter_name, config, initialize,
                                                        existing=dict(self.peft_config))
        if initialize and is_randomized_pissa(config.init_lora_weights):  # save_pretrained: still the initial one?
            vars(self).setdefault("initial_checksums", {})[adapter_name] = adapter_checksums(self, adapter_name)

    def _set_trainable(self, adapter_name: str, trainable: bool) -> None:
        """requires_grad of one adapter's tensors; every other tensor keeps its own."""
        for _, layer in adapter_layers(self):
            for param in layer.adapter_parameters(adapter_name):
                param.requires_grad_(trainable)

    # Adapter management -------------------------------------------------------------------------------------

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the active adapter; only its parameters are trainable (unless inference_mode)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} not found; adapters: {list(self.peft_config)}.")
        self.active_adapter = adapter_name
        self._apply_active()

    def _apply_active(self) -> None:
        active = [self.active_adapter] if self.active_adapter else []
        config = self.peft_config.get(self.active_adapter)
        trainable = config is not None and not config.inference_mode
        for _, layer in adapter_layers(self):
            layer.set_active(active, trainable)
        for param in bias_parameters(self, config.bias if config else "none").values():
            param.requires_grad_(trainable)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; layers left without adapters are unwrapped (the base weights stay as they are)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} not found; adapters: {list(self.peft_config)}.")
        for path, layer in list(adapter_layers(self.base_model.model)):
            layer.delete_adapter(adapter_name)
            if not layer.adapter_names:
                replace_module(self.base_model.model, path, unwrapped(layer))
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.peft_config), None)
        self._apply_active()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the `with` block."""
        layers = [layer for _, layer in adapter_layers(self)]
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disabled = False

    def merge_and_unload(self) -> nn.Module:
        """Fold the active adapter into the base weights and return the plain base model."""
        model = self.base_model.model
        for path, layer in list(adapter_layers(model)):
            if isinstance(layer, LoraLayer):
                layer.merge()
            replace_module(model, path, unwrapped(layer))
        self.peft_config.clear()
        self.active_adapter = None
        return model

    # Saving -------------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        selected_adapters: Sequence[str] | None = None,
                        save_embedding_layers: SaveEmbeddingLayers = "auto", is_main_process: bool = True,
                        convert_pissa_to_lora: str | os.PathLike | None = None,
                        path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
                        base_hub_commit: str | None = None, **kwargs: Any) -> list[Path]:
        """Save the adapters (not the base model) in PEFT's format.

        Args:
            save_directory: created if missing. "default" is saved at its root, other adapters in subfolders.
            safe_serialization: adapter_model.safetensors (default) or adapter_model.bin.
            selected_adapters: names to save (default: all).
            save_embedding_layers: True, False or "auto" (when an embedding is targeted or the vocabulary was
                resized against the base model's local config.json).
            is_main_process: False writes nothing (for the non-zero ranks of distributed training).
            convert_pissa_to_lora: deprecated alias of path_initial_model_for_weight_conversion.
            path_initial_model_for_weight_conversion: folder of the PiSSA adapter saved before training; the
                trained adapter is saved as an equivalent rank-2r LoRA adapter for the original base model.
            base_hub_commit: the Hub commit of the base model, for the manifest (adapterflow.json); default: the
                commit of the huggingface_hub snapshot folder the base was loaded from, else none recorded.

        Returns:
            The written files.

        Raises:
            ValueError: save_directory is a file, unknown selected_adapters, or a conversion that cannot be
                done (adapterflow.conversion.ConversionError). Nothing is written then.
            TypeError: an unknown keyword argument.
        """
        if kwargs:
            raise TypeError(f"save_pretrained() got unexpected keyword arguments {sorted(kwargs)}.")
        initial_path = resolve_conversion_path(convert_pissa_to_lora, path_initial_model_for_weight_conversion)
        return save_adapter_model(self, save_directory, safe_serialization, selected_adapters,
                                  save_embedding_layers, is_main_process, initial_path, base_hub_commit)

    def push_to_hub(self, repo_id: str, private: bool | None = None, revision: str | None = None,
                    commit_message: str | None = None, token: str | None = None, safe_serialization: bool = True,
                    selected_adapters: Sequence[str] | None = None, create_pr: bool = False,
                    tags: Sequence[str] | None = None, **kwargs: Any):
        """Save the adapters with a Hub model card and push them to `repo_id` as one commit: PEFT's arguments, more
        in kwargs (see adapterflow.integrations.hub.push_adapter_model). Returns an adapterflow.integrations.hub.PushResult (PEFT: a
        CommitInfo). Raises adapterflow.integrations.hub.HubPushError (.transient, .status); TypeError for unknown kwargs."""
        from adapterflow.integrations.hub import push_adapter_model

        return push_adapter_model(self, repo_id, private, revision, commit_message, token, safe_serialization,
                                  selected_adapters, create_pr, tags, **kwargs)

    # Passthrough and helpers --------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        params = {id(p): p for p in self.parameters()}.values()
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def _lora_layers(self, adapter_name: str) -> list[tuple[str, LoraLayer]]:
        return [(p, l) for p, l in adapter_layers(self) if isinstance(l, LoraLayer) and adapter_name in l.adapter_names]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model.model, name)


def get_adapter_model(model: nn.Module, config: LoraConfig,
                      adapter_name: str = formats.DEFAULT_ADAPTER_NAME) -> AdapterModel:
    """Inject a LoRA adapter into `model` (modified in place) and return the AdapterModel wrapping it.

    Only the adapter's parameters (and its modules_to_save copies, and biases per `config.bias`) are trainable.
    The model keeps its train/eval mode: new LoRA layers (and their dropout) follow the module they wrap.

    Raises:
        adapterflow.targeting.TargetError: target_modules matches nothing (the message lists the module names
            that exist) or matches a layer type LoRA does not support.
        adapterflow.config.ConfigError: an invalid config, or not a LoraConfig (e.g. a dict).
        TypeError: model is not a torch.nn.Module.
    """
    return AdapterModel(model, config, adapter_name)
