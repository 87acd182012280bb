"""Verification of a saved adapter: a fresh base model plus the files alone must reproduce the trained model."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from adapterflow import formats
from adapterflow.layers import LoraLayer
from adapterflow.model import AdapterModel
from adapterflow.state_dict import adapter_layers


class VerificationError(ValueError):
    """The saved adapter does not reproduce the trained model; `report` says how."""

    def __init__(self, message: str, report: "VerificationReport") -> None:
        super().__init__(message)
        self.report = report


@dataclass
class VerificationReport:
    adapter_dir: str
    tensors_loaded: int
    max_abs_diff: float
    atol: float
    zero_lora_b: list[str] = field(default_factory=list)  # modules whose B is all zero (untrained)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


@torch.no_grad()
def verify_adapter(base_model: nn.Module, adapter_dir: str | os.PathLike, probe: dict[str, torch.Tensor],
                   expected_logits: torch.Tensor, atol: float, adapter_name: str = "default") -> VerificationReport:
    """Load `adapter_dir` onto `base_model` with our loader and compare its logits on the probe batch.

    Loading already fails on any missing or unexpected key. On top: every LoRA B must be non-zero (a B that is
    still zero after training means the adapter learned nothing there, e.g. a ZeRO-3 gather that saved empty
    shards), and the logits must match `expected_logits` within `atol`.

    Raises:
        VerificationError: with the report attached.
        adapterflow.state_dict.AdapterLoadError: the files do not fit the base model.
    """
    model = AdapterModel.from_pretrained(base_model, adapter_dir, adapter_name=adapter_name)
    layers = [(path, layer) for path, layer in adapter_layers(model) if isinstance(layer, LoraLayer)]
    zero_b = [path.removeprefix(formats.PEFT_KEY_PREFIX) for path, layer in layers if not layer.lora_b(adapter_name).any()]
    logits = model(**probe).logits.float()
    diff = (logits - expected_logits.float()).abs().max().item()
    report = VerificationReport(str(adapter_dir), sum(len(l.adapter_tensors(adapter_name)) for _, l in layers),
                                diff, atol, zero_b)
    if zero_b:
        report.problems.append(f"lora_B is all zero in {len(zero_b)} modules (e.g. {zero_b[:3]}): nothing was trained there.")
    if not diff <= atol:  # also catches NaN
        report.problems.append(f"logits differ from the trained model's by {diff:.3g} > atol {atol:g}.")
    if report.problems:
        raise VerificationError("Verification of the saved adapter failed:\n" + "\n".join(
            f"  - {p}" for p in report.problems), report)
    return report


def check_extracted_state(model: nn.Module, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
    """`check_adapter_state` with the adapted modules taken from `model` (an AdapterModel holding `adapter_name`).

    Raises:
        VerificationError: listing every problem.
    """
    check_adapter_state(state, {path for path, layer in adapter_layers(model) if adapter_name in layer.adapter_names})


def check_adapter_state(state: dict[str, torch.Tensor], adapted_modules: Iterable[str]) -> None:
    """Refuse an adapter state dict (checkpoint keys) that cannot be right: empty tensors (what a ZeRO-3 state dict
    gathered without its shards looks like), NaN/Inf values, a LoRA A without its B (or B without A), or an
    adapted module that contributed no tensors.

    Args:
        state: {checkpoint key: tensor}, e.g. from `read_adapter` or `get_adapter_state_dict`.
        adapted_modules: the module paths the adapter targets, with the `base_model.model.` prefix (LoRA layers and
            modules_to_save).

    Raises:
        VerificationError: listing every problem.
    """
    problems = [f"{k}: empty tensor {tuple(t.shape)}" for k, t in state.items() if t.numel() == 0]
    problems += [f"{k}: contains NaN or Inf" for k, t in state.items() if t.numel() and not torch.isfinite(t).all()]
    problems += [f"{k}: has no partner {formats.lora_partner(k)}" for k in sorted(state)
                 if formats.lora_partner(k) is not None and formats.lora_partner(k) not in state]
    saved_modules = {formats.module_of_key(key) for key in state}
    missing = sorted(set(adapted_modules) - saved_modules)
    problems += [f"{m}: targeted but has no tensors in the state dict" for m in missing]
    if problems:
        report = VerificationReport("<extracted state>", len(state), float("nan"), 0.0, problems=problems)
        raise VerificationError("The extracted adapter is broken:\n" + "\n".join(f"  - {p}" for p in problems), report)
