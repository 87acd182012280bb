"""`adapterflow run [--config FILE.yaml] [--set key=value ...]`: run the save-adapter flow locally.
(`adapterflow check ADAPTER_DIR ...`, whether a saved adapter will serve, is in `adapterflow.flows.check_cli`.)

Parameters come from the embedded defaults, then the YAML file, then each --set; everything that can be checked
without a Prefect server (parameters, names, config file, dataset, base model, targets, device, folders) is
checked first, and a mistake ends the command with one message that names the parameter or file and the fix,
exit status 2, nothing written. Without PREFECT_API_URL, a temporary local Prefect server records the run.
"""

from __future__ import annotations

import argparse
import os
import sys

for _name, _value in {"DO_NOT_TRACK": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                      "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TRANSFORMERS_VERBOSITY": "error",
                      "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}.items():
    os.environ.setdefault(_name, _value)  # before prefect is imported: its settings are read at import

USER_ERROR_EXIT = 2
FAILED_EXIT = 1
DEBUG_ENV = "ADAPTERFLOW_DEBUG"


def parse_parameters(config_file: str | None, overrides: list[str]):
    """The validated parameters (see `adapterflow.flows.loading.load_parameters`); a mistake exits with its message."""
    from adapterflow.flows.loading import load_parameters
    from adapterflow.flows.parameters import ParameterError

    try:
        return load_parameters(config_file, overrides)
    except ParameterError as exc:
        raise SystemExit(str(exc)) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="adapterflow", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the save-adapter flow")
    run.add_argument("--config", help="YAML file of flow parameters (sections: base_model, dataset, adapter, ...); "
                                      "relative paths in it resolve against its folder")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one parameter, e.g. --set training.steps=50 (repeatable); relative paths "
                          "resolve against the current directory")
    run.add_argument("--debug", action="store_true", default=os.environ.get(DEBUG_ENV) == "1",
                     help=f"show Python tracebacks (also: {DEBUG_ENV}=1)")
    from adapterflow.flows.check_cli import add_parser, check_command

    add_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "check":
        raise SystemExit(check_command(args))
    try:
        summary = run_command(args.config, args.overrides, debug=args.debug)
    except KeyboardInterrupt:
        print("adapterflow run: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as exc:  # noqa: BLE001 - the one place where errors become messages for the user
        if args.debug:
            import traceback

            traceback.print_exc()
        _report(exc, debug=args.debug)
    _print_summary(summary)


def run_command(config_file: str | None, overrides: list[str], debug: bool = False) -> dict:
    """Check everything that needs no server, then run the flow; returns the flow's summary.

    Raises:
        ParameterError (and the other permanent errors of the checks): before anything is written.
        Whatever the flow failed with, once it ran.
    """
    from adapterflow.flows.loading import load_parameters

    parameters = load_parameters(config_file, overrides)  # before the heavy imports: a typo is told in ~3 s, not ~11 s
    from adapterflow.tasks.prepare_run import check_rerun
    from adapterflow.tasks.run_plan import check_run

    from adapterflow.flows.server import handle_termination, temporary_prefect_api, uses_temporary_server

    check_rerun(parameters, check_run(parameters, temporary_prefect_api=uses_temporary_server()))

    with handle_termination(), temporary_prefect_api():  # SIGTERM acts as Ctrl-C; no server outlives the command
        from adapterflow.flows.save_adapter import save_adapter

        if not debug:
            hide_console_tracebacks()
        state = save_adapter(config=parameters, return_state=True)
    if not state.is_completed():
        raise state.result(raise_on_failure=False) or RuntimeError(state.message)
    return state.result()


def hide_console_tracebacks() -> None:
    """Prefect's console handlers print task and flow failures with their tracebacks; the user sees our message
    instead (the Prefect API still receives the full record). `--debug` keeps them."""
    import logging

    from prefect.logging.configuration import PROCESS_LOGGING_CONFIG, setup_logging

    if not PROCESS_LOGGING_CONFIG:
        setup_logging()  # what the flow engine does on first use; later calls are incremental and keep formatters
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler.formatter, _NoTraceback):
                handler.setFormatter(_NoTraceback(handler.formatter or logging.Formatter()))


class _NoTraceback:
    """A formatter that formats a record as `inner` would, without its exception text."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def format(self, record) -> str:
        saved = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text = saved

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _report(exc: BaseException, debug: bool = False) -> None:
    """One block on stderr: what is wrong and what to do, then exit 2 for a mistake in what the user gave, 1 for
    a run that failed otherwise (a failed verification included: its message says what differs, no traceback)."""
    from adapterflow.flows.parameters import ParameterError
    from adapterflow.verify import VerificationError

    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, ParameterError):  # a user error (tasks.retries.is_user_error), told without importing Prefect
        print(f"adapterflow run: {text}", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT)
    from adapterflow.tasks.retries import is_user_error

    if isinstance(exc, VerificationError):
        print(f"adapterflow run failed: {text}", file=sys.stderr)
        raise SystemExit(FAILED_EXIT)
    if is_user_error(exc):
        print(f"adapterflow run: {text}", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT)
    hint = "" if debug else f"\n(rerun with --debug, or {DEBUG_ENV}=1, for the Python traceback)"
    print(f"adapterflow run failed: {type(exc).__name__}: {text}{hint}", file=sys.stderr)
    raise SystemExit(FAILED_EXIT)


def _print_summary(summary: dict) -> None:
    from adapterflow.tasks.prefect_links import flow_run_url

    print(f"adapter:         {summary['adapter_dir']}")
    print(f"run directory:   {summary['run_dir']}")
    print(f"eval loss:       {summary['eval_loss_before']:.4f} -> {summary['eval_loss_after']:.4f}")
    if serving := (summary.get("verification") or {}).get("serving"):
        print(f"serving:         {_serving_line(serving)}")
    url = flow_run_url(summary["flow_run_id"])
    print(f"prefect run:     {summary['flow_run_id']} ({url or 'temporary local API; set PREFECT_API_URL to keep runs'})")
    tracked = summary["mlflow"]
    if tracked:
        print(f"mlflow run:      {tracked['run_id']} ({tracked['run_url'] or tracked['tracking_uri']}); "
              f"model {tracked['registered_model_name']} v{tracked['model_version']}")
    if promotion := summary.get("promotion"):
        print(f"promotion:       {'promoted' if promotion['promoted'] else 'not promoted'}: {promotion['reason']}")
    if summary["hub"]:
        print(f"hub commit:      {summary['hub']['commit_url']}")


def _serving_line(serving: dict) -> str:
    """`vLLM ok, llama.cpp fails weight_keys, PEFT ok` from the verification's serving report dict."""
    if "error" in serving:
        return f"not checked ({serving['error']})"
    labels = {"vllm": "vLLM", "llama.cpp": "llama.cpp", "peft": "PEFT"}
    return ", ".join(f"{labels.get(rt, rt)} {'ok' if r['passed'] else 'fails ' + ', '.join(r['failed_rules'])}"
                     for rt, r in serving["runtimes"].items())


if __name__ == "__main__":
    main()
