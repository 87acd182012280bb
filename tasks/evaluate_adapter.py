"""evaluate-adapter: the eval loss, perplexity and (optionally) exact match of the base model, the new adapter
and the adapter holding the promotion alias, on the same examples; a Prefect table artifact shows them.

The computation is adapterflow.runtime.evaluation's. Numbers the train step already computed are reused where
they are the same number (same held-out split, same base, tokenization, batch size and device): the new
adapter's loss is train-adapter's eval_loss_after, and the base model's is its eval_loss_before when the adapter
started as the identity (init lora or gaussian: lora_B = 0; PiSSA's residual only reproduces the base up to
rounding, so it is computed). With evaluate.dataset everything is computed. The alias holder is downloaded from
the MLflow registry (its adapter files only) and loaded onto the base its run recorded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from adapterflow.flows.parameters import MlflowSettings, local_path
from adapterflow.flows.parameters_promote import EvaluateSettings, PromoteSettings
from adapterflow.model_references import BUILTIN_PREFIX, is_hub_model_id
from adapterflow.runtime.evaluation import ModelScore, evaluation_examples, load_model, score
from adapterflow.tasks.retries import RESULT_OPTIONS, RETRY_OPTIONS, is_transient
from adapterflow.tasks.run_plan import DTYPES, RunPlan, evaluation_spec

IDENTITY_INITS = (True, "gaussian")  # init_lora_weights values with lora_B = 0: the base model's outputs


@task(name="evaluate-adapter", **RETRY_OPTIONS, **RESULT_OPTIONS)
def evaluate_adapter(plan: RunPlan, settings: EvaluateSettings, promote: PromoteSettings, mlflow: MlflowSettings,
                     training: dict, saved: dict) -> dict:
    """Returns {"base", "new", "champion" (ModelScore dicts; champion None without a holder), "champion_version",
    "champion_problem" (why the holder could not be evaluated; "champion_unreachable" when MLflow was), "alias", "registered_model_name", "dataset",
    "examples"}. The holder is looked up only when the gate runs (promote.enabled and mlflow.enabled)."""
    from adapterflow.runtime.base_models import load_tokenizer

    examples = plan_examples(plan, settings)
    tokenizer, same_split = load_tokenizer(plan.base_model_path), settings.dataset is None
    base_reuse = ((training["eval_loss_before"], "train-adapter eval_loss_before (identity init, same split)")
                  if same_split and plan.lora_config.get("init_lora_weights") in IDENTITY_INITS else None)
    new_reuse = (training["eval_loss_after"], "train-adapter eval_loss_after (same split)") if same_split else None
    models = _Models(plan, settings.exact_match or base_reuse is None or new_reuse is None)
    base = _score(models.base(), tokenizer, examples, plan, settings, base_reuse)
    new = _score(models.adapter(saved["adapter_dir"]), tokenizer, examples, plan, settings, new_reuse)
    del models
    result = {"base": base.to_dict(), "new": new.to_dict(), "champion": None, "champion_version": None,
              "champion_problem": None, "alias": promote.alias, "registered_model_name": None,
              "dataset": settings.dataset or f"held-out {plan.eval_fraction:g} of {plan.dataset_path}",
              "examples": len(examples)}
    if promote.enabled and mlflow.enabled:
        result.update(champion_scores(plan, settings, promote, mlflow, examples))
    create_table_artifact(key="evaluation", table=evaluation_rows(result),
                          description=f"Eval loss, perplexity and exact match on {result['dataset']} "
                                      f"({len(examples)} examples)")
    if result["champion_problem"]:
        get_run_logger().warning("The %s holder (version %s) could not be evaluated: %s", promote.alias,
                                 result["champion_version"], result["champion_problem"])
    get_run_logger().info("Eval loss: base %.4f, new %.4f%s", base.loss, new.loss,
                          f", {promote.alias} (version {result['champion_version']}) {result['champion']['loss']:.4f}"
                          if result["champion"] else "")
    return result


def plan_examples(plan: RunPlan, settings: EvaluateSettings):
    """The evaluation examples: evaluate.dataset (read with the dataset section's columns and template) or the
    run's held-out split."""
    spec = plan.data_spec()
    separate = evaluation_spec(settings, spec)
    return evaluation_examples(spec, plan.eval_fraction, plan.training_settings().seed, separate)


def champion_scores(plan: RunPlan, settings: EvaluateSettings, promote: PromoteSettings, mlflow: MlflowSettings,
                    examples, holder: Optional[dict] = None) -> dict:
    """The alias holder's part of the result: {"registered_model_name", "champion", "champion_version",
    "champion_problem"}; `holder` (mlflow_promotion.champion) is looked up when not given."""
    from adapterflow.integrations.mlflow_logging import (MlflowUnavailableError, registered_model_name,
                                                         resolve_tracking_uri)
    from adapterflow.integrations.mlflow_promotion import champion, download_champion_adapter, temporary_folder
    from adapterflow.runtime.base_models import load_tokenizer

    name = registered_model_name(mlflow, plan.model_dump(mode="json"))
    uri = resolve_tracking_uri(mlflow, local_path(plan.parameters["runs_root"]))
    found = {"registered_model_name": name, "champion": None, "champion_version": None, "champion_problem": None}
    try:
        holder = holder or champion(mlflow, uri, name, promote.alias)
    except MlflowUnavailableError as exc:  # log-to-mlflow reports (and retries) that; promote-adapter asks again
        return {**found, "champion_problem": str(exc)[:500], "champion_unreachable": True}
    if holder is None:
        return found
    found["champion_version"] = holder["version"]
    try:
        base_path = champion_base(holder)
        with temporary_folder() as tmp:
            adapter = download_champion_adapter(mlflow, uri, holder, tmp)
            model = load_model(base_path, DTYPES.get(holder.get("base_model.dtype") or plan.dtype, plan.torch_dtype),
                               adapter, holder.get("adapter.name") or "default", plan.training["device"])
            found["champion"] = _score(model, load_tokenizer(base_path), examples, plan, settings, None).to_dict()
    except Exception as exc:  # noqa: BLE001 - a holder we cannot read is the gate's reason, unless a retry helps
        if is_transient(exc):
            raise
        found["champion_problem"] = f"{type(exc).__name__}: {exc}"[:500]
    return found


def champion_base(holder: dict) -> Path:
    """The holder's base model folder: the folder its run used when it is on this machine, else its base as the
    user named it when that is a builtin: model or a Hub id (resolved, i.e. built or downloaded).

    Raises:
        FileNotFoundError: neither is available here."""
    from adapterflow.runtime.base_models import resolve_base_model

    recorded, given = holder.get("base_model"), holder.get("base_model.name_or_path")
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    if given and (given.startswith(BUILTIN_PREFIX) or is_hub_model_id(given)):
        return resolve_base_model(given)
    raise FileNotFoundError(f"its base model ({recorded or given!r}) is not on this machine; make that folder "
                            f"available, or move the alias by hand")


def evaluation_rows(result: dict) -> list[dict]:
    """The artifact's table: one row per model."""
    rows = []
    for label, key in (("base model", "base"), ("new adapter", "new"),
                       (f"{result['alias']} (version {result['champion_version']})", "champion")):
        found = result.get(key)
        if found:
            exact = "" if found["exact_match"] is None else f"{found['exact_match']:.3f} of {found['pairs']}"
            rows.append({"model": label, "eval_loss": f"{found['loss']:.4f}", "perplexity": f"{found['perplexity']:.3f}",
                         "exact_match": exact, "examples": found["examples"], "source": found["loss_source"]})
        elif key == "champion" and result.get("champion_version"):
            rows.append({"model": label, "eval_loss": "", "perplexity": "", "exact_match": "", "examples": 0,
                         "source": result.get("champion_problem") or ""})
    return rows


class _Models:
    """The base model, loaded once and only when a number needs a forward pass; the adapter is then loaded onto
    it (after the base was scored)."""

    def __init__(self, plan: RunPlan, needed: bool) -> None:
        self.plan, self.needed, self.model = plan, needed, None

    def base(self):
        if self.needed and self.model is None:
            self.model = load_model(self.plan.base_model_path, self.plan.torch_dtype,
                                    device=self.plan.training["device"])
        return self.model

    def adapter(self, adapter_dir: str):
        from adapterflow import AdapterModel

        base = self.base()
        return None if base is None else AdapterModel.from_pretrained(base, adapter_dir,
                                                                      adapter_name=self.plan.adapter_name)


def _score(model, tokenizer, examples, plan: RunPlan, settings: EvaluateSettings, reuse) -> ModelScore:
    return score(model, tokenizer, examples, max_seq_len=plan.max_seq_len, batch_size=plan.training["batch_size"],
                 device=plan.training["device"], chat_template=plan.dataset.get("chat_template"),
                 exact_match=settings.exact_match, max_new_tokens=settings.max_new_tokens, reuse_loss=reuse)

