"""Integrations: MLflow tracking and registry, and the Hugging Face Hub push, for a saved adapter (plain Python, no
Prefect).

The adapter library (adapterflow/*.py) never imports these at module level; the pipeline's tasks do, and
`AdapterModel.push_to_hub` (PEFT's public API) imports `hub` when it is called. Each module has one job:
mlflow_client (the client, its settings and errors), mlflow_run (the run's params, tags, metrics, artifacts),
mlflow_registry (the LoggedModel holding the adapter, and its registered version), mlflow_pyfunc (the model's
code, run by MLflow when the model is loaded), mlflow_logging (the whole record of one pipeline run), hub (push a
saved adapter folder as one commit) and hub_errors (the Hub errors, each saying whether a retry may help).
"""
