"""`adapterflow run [--config FILE.yaml] [--set key=value ...]`: run the save-adapter flow locally.

Without PREFECT_API_URL, Prefect starts a temporary local API server for the run; with it, the run is recorded
on that server. Parameters come from the embedded defaults, then the YAML file, then each --set.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

for _name, _value in {"DO_NOT_TRACK": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                      "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TRANSFORMERS_VERBOSITY": "error",
                      "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}.items():
    os.environ.setdefault(_name, _value)  # before prefect is imported: its settings are read at import


def parse_parameters(config_file: str | None, overrides: list[str]):
    """Defaults < YAML file < --set overrides, validated by the flow's pydantic model.

    Relative paths inside the YAML file resolve against the file's folder; relative paths given with --set
    against the current directory (see `resolve_paths`)."""
    import yaml
    from pydantic import ValidationError

    from adapterflow.flows.parameters import SaveAdapterParameters, apply_overrides, merge, resolve_paths

    data = {}
    if config_file:
        data = yaml.safe_load(Path(config_file).read_text()) or {}
        if not isinstance(data, dict):
            raise SystemExit(f"{config_file}: expected a mapping of parameter sections, got {type(data).__name__}")
        resolve_paths(data, Path(config_file).expanduser().absolute().parent)
    try:
        given = resolve_paths(apply_overrides({}, overrides), Path.cwd())
        return SaveAdapterParameters.model_validate(merge(data, given))
    except (ValidationError, ValueError) as exc:
        raise SystemExit(f"Invalid parameters:\n{exc}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="adapterflow", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the save-adapter flow")
    run.add_argument("--config", help="YAML file of flow parameters (sections: base_model, dataset, adapter, ...)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one parameter, e.g. --set training.steps=50 (repeatable)")
    args = parser.parse_args(argv)
    parameters = parse_parameters(args.config, args.overrides)

    from adapterflow.flows.save_adapter import save_adapter
    from adapterflow.tasks.prefect_links import flow_run_url

    state = save_adapter(config=parameters, return_state=True)
    if not state.is_completed():
        print(f"save-adapter failed: {state.message}", file=sys.stderr)
        raise SystemExit(1)
    summary = state.result()
    print(f"adapter:         {summary['adapter_dir']}")
    print(f"run directory:   {summary['run_dir']}")
    print(f"eval loss:       {summary['eval_loss_before']:.4f} -> {summary['eval_loss_after']:.4f}")
    url = flow_run_url(summary["flow_run_id"])
    print(f"prefect run:     {summary['flow_run_id']} ({url or 'temporary local API; set PREFECT_API_URL to keep runs'})")
    tracked = summary["mlflow"]
    if tracked:
        print(f"mlflow run:      {tracked['run_id']} ({tracked['run_url'] or tracked['tracking_uri']}); "
              f"model {tracked['registered_model_name']} v{tracked['model_version']}")
    if summary["hub"]:
        print(f"hub commit:      {summary['hub']['commit_url']}")


if __name__ == "__main__":
    main()
