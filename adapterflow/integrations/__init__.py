"""Integrations: MLflow tracking and registry for a saved adapter (plain Python, no Prefect).

The adapter library (adapterflow/*.py) never imports these; the pipeline's tasks do. Each module has one job:
mlflow_client (the client, its settings and errors), mlflow_run (the run's params, tags, metrics, artifacts),
mlflow_registry (the LoggedModel holding the adapter, and its registered version), mlflow_pyfunc (the model's
code, run by MLflow when the model is loaded), mlflow_logging (the whole record of one pipeline run). The Hub
push lives in the library (adapterflow.hub), since AdapterModel.push_to_hub is public API.
"""
