"""The promotion gate: is a new adapter better than the base model and than the version holding the alias?

Plain Python on numbers (no Prefect, no MLflow). The rule, the champion/challenger comparison MLflow's model
registry docs describe for aliases ("Deploy and organize models with aliases and tags"), with SageMaker
Pipelines' condition-step shape (a threshold on one metric):

- `metric` eval_loss or perplexity: lower is better; exact_match: higher is better. improvement(a over b) is
  b - a for the former, a - b for the latter (absolute, in the metric's units).
- ties: a difference within float noise, |improvement| <= TIE_RTOL * max(1, |reference|) (TIE_RTOL = 1e-6;
  the reference is the base's or the holder's number), counts as no improvement. The new adapter's loss and
  the holder's are computed by different code paths (train-adapter's eval pass, a reloaded adapter) whose float32
  sums differ in their last bits (two identical PiSSA runs measured -2.2e-07 apart). A real improvement smaller
  than that is below what float32 losses resolve anyway.
- require_better_than_base: the new adapter's improvement over the base model must be > 0 and not a tie.
- no alias holder yet (the registered model's first gated version): promoted if the base check passes.
- an alias holder: its improvement over the holder must be > 0, not a tie, and >= min_improvement (so
  min_improvement 0 asks for strictly better; a tie keeps the holder).
- a number that could not be measured (NaN, or no exact-match pair: chat and plain-text rows have none), or a
  holder that could not be evaluated: not promoted, with the reason.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

LOWER_IS_BETTER = {"eval_loss": True, "perplexity": True, "exact_match": False}
SCORE_FIELD = {"eval_loss": "loss", "perplexity": "perplexity", "exact_match": "exact_match"}
TIE_RTOL = 1e-6  # a difference within TIE_RTOL * max(1, |reference|) is float noise (module docstring)


@dataclass(frozen=True)
class GateDecision:
    """promote: whether the alias moves; reason: one sentence with the numbers; the metric's values (None: not
    measured / no holder); improvements: how much better the new adapter is (positive: better)."""

    promote: bool
    reason: str
    metric: str
    new: Optional[float]
    base: Optional[float]
    champion: Optional[float]
    champion_version: Optional[str] = None
    over_base: Optional[float] = None
    over_champion: Optional[float] = None

    def to_dict(self) -> dict:
        return asdict(self)


def improvement(metric: str, new: float, old: float) -> float:
    """How much better `new` is than `old` in `metric` (positive: better)."""
    return old - new if LOWER_IS_BETTER[metric] else new - old


def is_tie(improvement_: float, reference: float) -> bool:
    """Whether an improvement over `reference` is within float noise: |improvement| <= TIE_RTOL * max(1,
    |reference|) (absolute for metrics below 1, relative above)."""
    return abs(improvement_) <= TIE_RTOL * max(1.0, abs(reference))


def _not_better(over: float, reference: float) -> bool:
    return over <= 0 or is_tie(over, reference)


def _measured(value: Optional[float]) -> bool:
    return value is not None and not math.isnan(value)


def decide(metric: str, new: Optional[float], base: Optional[float], champion: Optional[float], *,
           min_improvement: float = 0.0, require_better_than_base: bool = True,
           champion_version: Optional[str] = None, champion_problem: Optional[str] = None) -> GateDecision:
    """The gate's decision (rules in the module docstring).

    Args:
        metric: eval_loss, perplexity or exact_match.
        new, base, champion: the metric for the new adapter, the base model and the alias holder (None: no
            holder, or not measured).
        champion_version: the holder's registered model version, for the reason.
        champion_problem: why the holder exists but could not be evaluated (then not promoted).

    Returns:
        GateDecision (over_base / over_champion are the raw improvements, ties included).
    """
    def verdict(promote: bool, reason: str) -> GateDecision:
        return GateDecision(promote, reason, metric, new, base, champion, champion_version, over_base, over_champion)

    over_base = improvement(metric, new, base) if _measured(new) and _measured(base) else None
    over_champion = improvement(metric, new, champion) if _measured(new) and _measured(champion) else None
    if not _measured(new):
        why = (": the evaluation examples have no prompt/completion pairs (chat and plain-text rows have none); "
               "evaluate on prompt/completion data (evaluate.dataset), or use promote.metric=eval_loss"
               if metric == "exact_match" and new is None else f" ({new})")
        return verdict(False, f"the new adapter's {metric} could not be measured{why}")
    if require_better_than_base and over_base is None:
        return verdict(False, f"the base model's {metric} could not be measured ({base})")
    if require_better_than_base and _not_better(over_base, base):
        tie = " (a tie within float noise)" if is_tie(over_base, base) else ""
        return verdict(False, f"new {metric} {new:.6g} is not better than the base model's {base:.6g}{tie}")
    if champion_problem:
        return verdict(False, f"the alias holder (version {champion_version}) could not be evaluated: "
                              f"{champion_problem}")
    if champion_version is None:
        base_note = f", better than the base model's {base:.6g}" if over_base is not None else ""
        return verdict(True, f"first version under the alias: new {metric} {new:.6g}{base_note}")
    if over_champion is None:
        return verdict(False, f"version {champion_version}'s {metric} could not be measured ({champion})")
    if _not_better(over_champion, champion) or over_champion < min_improvement:
        need = f" by at least {min_improvement:g}" if min_improvement > 0 else ""
        tie = ", a tie within float noise" if is_tie(over_champion, champion) else ""
        return verdict(False, f"new {metric} {new:.6g} is not better than version {champion_version}'s "
                              f"{champion:.6g}{need} (improvement {over_champion:.6g}{tie})")
    return verdict(True, f"new {metric} {new:.6g} beats version {champion_version}'s {champion:.6g} by "
                         f"{over_champion:.6g}")
