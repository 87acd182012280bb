"""The `evaluate` and `promote` sections of the save-adapter flow's parameters (issue 15): what the
evaluate-adapter step measures, and the gate that moves the registered model's promotion alias.

Gate (adapterflow.runtime.gate): the new adapter is promoted when its `promote.metric` beats the base model's
(with `require_better_than_base`) and the alias holder's by at least `min_improvement`; the first version of a
registered model (no alias yet) only has to beat the base.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from adapterflow.flows import names

PREVIOUS_ALIAS = "previous"  # the alias the former holder of promote.alias gets (a rollback is one alias move)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")  # as flows/parameters.py: a misspelt key is an error


class EvaluateSettings(_Section):
    """What the evaluate-adapter step measures, for the base model, the new adapter and the alias holder."""

    dataset: Optional[str] = Field(
        None, description="a separate evaluation dataset (the forms dataset.path takes; the dataset section's "
                          "column names and chat template apply), read whole; default: the held-out "
                          "dataset.eval_fraction of the training data")
    split: str = Field("train", min_length=1, description="split of evaluate.dataset to read (a file has one: train)")
    exact_match: bool = Field(False, description="also generate greedily from each prompt/completion pair's prompt "
                                                 "and count completions matched exactly (after stripping spaces)")
    max_new_tokens: int = Field(32, ge=1, le=4096, description="tokens generated per prompt for exact_match")


class PromoteSettings(_Section):
    """The promotion gate on an MLflow alias of the registered model (needs mlflow.enabled)."""

    enabled: bool = Field(True, description="compare the new version with the base model and the alias holder and "
                                            "move the alias only if it is better; false registers without a gate")
    alias: str = Field("champion", description="the registered model alias that marks the version in production; "
                                               "its former holder gets the alias previous")
    metric: Literal["eval_loss", "perplexity", "exact_match"] = Field(
        "eval_loss", description="what the gate compares: eval_loss and perplexity (lower is better) or "
                                 "exact_match (higher is better, needs evaluate.exact_match)")
    min_improvement: float = Field(0.0, json_schema_extra={"minimum": 0},  # finite: checked in _finite
                                   description="how much better than the alias holder the new version must be, in "
                                               "the metric's units (absolute): a finite number, 0 or more")
    require_better_than_base: bool = Field(True, description="the new version must also beat the base model "
                                                             "without any adapter")
    require_approval: bool = Field(False, description="pause before moving the alias until a person approves or "
                                                      "rejects in the Prefect UI (the flow run's Resume form)")
    approval_timeout_minutes: float = Field(1440, gt=0, description="how long to wait for approval; no answer in "
                                                                    "time: not promoted")

    @field_validator("alias")
    @classmethod
    def _valid_alias(cls, value: str) -> str:
        problem = names.alias_problem(value, "promote.alias")
        if problem:
            raise ValueError(getattr(problem, "detail", problem))
        if value == PREVIOUS_ALIAS:
            raise ValueError(f"promote.alias={value!r} is the alias the former holder gets; use e.g. 'champion'")
        return value

    @field_validator("min_improvement")
    @classmethod
    def _finite(cls, value: float) -> float:
        """nan would compare false with everything and inf could never be met: both are mistakes."""
        if not (math.isfinite(value) and value >= 0):
            raise ValueError("must be a finite number greater than or equal to 0 (an absolute improvement in the "
                             "metric's units, e.g. 0 or 0.01)")
        return value

    def explicitly_enabled(self) -> bool:
        """promote.enabled was given (not left at its default): a run that also turns MLflow off is a mistake."""
        return self.enabled and "enabled" in self.model_fields_set


def promotion_active(config) -> bool:
    """Whether the gate runs: promote.enabled with mlflow.enabled (left at its default, promote.enabled follows
    MLflow: `--set mlflow.enabled=false` alone runs without a gate; tasks/parameter_checks refuses the explicit
    combination)."""
    return config.promote.enabled and config.mlflow.enabled


def hub_push_allowed(config, promotion: dict) -> Optional[str]:
    """None when the Hub push may run; else why it is skipped (not promoted, hub.push_when_not_promoted false)."""
    if not promotion or promotion.get("promoted", True) or config.hub.push_when_not_promoted:
        return None
    return (f"Skipped: not promoted ({promotion.get('reason')}); set hub.push_when_not_promoted=true to push "
            f"anyway")
