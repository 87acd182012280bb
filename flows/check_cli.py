"""`adapterflow check ADAPTER_DIR [--base BASE] [--runtime vllm,llama.cpp,peft] [--max-lora-rank N] [--json]`.

Will the adapter serve? Runs `adapterflow.serving.check_serving` and prints a report per runtime (each rule pass,
warn or FAIL with its fix), then whether the files match the folder's integrity manifest (adapterflow.json), or all
of it as JSON. Exit status 0 when every runtime asked for passes and the files match their manifest (or there is
none), 1 when one fails, 2 on a usage error (a missing folder, an unknown runtime, a bad --max-lora-rank, a base that cannot be
read), printed as one line without a traceback. A `--base` that is a Hub repo id is read from the Hub (its
config.json and the safetensors headers, not the weights; `HF_ENDPOINT`, `HF_TOKEN`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

USAGE_EXIT, FAILED_EXIT = 2, 1
RUNTIME_ALIASES = {"llama_cpp": "llama.cpp", "llamacpp": "llama.cpp"}


class UsageError(ValueError):
    """A mistake in the command line; the message names the argument and the fix."""


def add_parser(commands) -> None:
    check = commands.add_parser("check", help="check that a saved adapter will serve in vLLM, llama.cpp and PEFT",
                                description=__doc__.splitlines()[0])
    check.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="the adapter folder (adapter_config.json and "
                                                                   "adapter_model.safetensors)")
    check.add_argument("--base", help="the base model: a local transformers folder or a Hub repo id; checks every "
                                      "module path and shape and the vocabulary against it")
    check.add_argument("--runtime", default="vllm,llama.cpp,peft",
                       help="comma-separated runtimes to check (default: vllm,llama.cpp,peft)")
    check.add_argument("--max-lora-rank", help="the vLLM server's --max-lora-rank (1, 8, 16, 32, 64, 128, 256, 320 or "
                                               "512; default: vLLM's 16, a larger rank is a warning)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")


def check_command(args: argparse.Namespace) -> int:
    """Run the check for parsed arguments; returns the exit status (prints the report or one error line)."""
    from adapterflow.serving import check_serving

    try:
        runtimes, rank = parse_runtimes(args.runtime), parse_rank(args.max_lora_rank)
        check_adapter_dir(Path(args.adapter_dir))
        base = resolve_base(args.base) if args.base is not None else None
        report = check_serving(args.adapter_dir, base=base, runtimes=runtimes, max_lora_rank=rank)
    except (UsageError, ValueError, OSError) as exc:  # AdapterLoadError is a ValueError
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"adapterflow check: {message}", file=sys.stderr)
        return USAGE_EXIT
    manifest = manifest_status(Path(args.adapter_dir))
    text = (json.dumps({**report.to_dict(), "manifest": manifest}, indent=2) if args.json
            else format_report(report) + "\n\n" + format_manifest(manifest))
    print_to_closable_stdout(text)
    return 0 if report.passed() and manifest["status"] != "fail" else FAILED_EXIT


def manifest_status(folder: Path) -> dict:
    """{"status": "ok" | "fail" | "none", "problems": [...]}: the folder's files against its adapterflow.json
    (adapterflow.manifest.verify_manifest; "none": a folder without one, e.g. written by PEFT). A folder that no
    longer matches is not the adapter that was saved and verified: the Hub push refuses it too."""
    from adapterflow.manifest import ManifestError, read_manifest, verify_manifest

    try:
        if read_manifest(folder) is None:
            return {"status": "none", "problems": []}
        problems = verify_manifest(folder)
    except ManifestError as exc:
        problems = [" ".join(str(exc).split())]
    return {"status": "fail" if problems else "ok", "problems": problems}


def format_manifest(manifest: dict) -> str:
    from adapterflow import formats

    if manifest["status"] == "none":
        return f"manifest: none (no {formats.MANIFEST_NAME}: written by PEFT or another tool; nothing to compare)"
    if manifest["status"] == "ok":
        return f"manifest: pass (every file matches {formats.MANIFEST_NAME})"
    return "\n".join([f"manifest: FAIL (the files are not the ones this folder's {formats.MANIFEST_NAME} describes; "
                       f"save or download the adapter again)", *(f"  - {p}" for p in manifest["problems"])])


def print_to_closable_stdout(text: str) -> None:
    """Print, tolerating a reader that closed the pipe early (`adapterflow check ... | head -3`): no traceback,
    and stdout is pointed at os.devnull so the flush at exit does not fail again (the recipe of the Python docs,
    `signal` module, "Note on SIGPIPE"). The exit status stays the verdict's."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def check_adapter_dir(folder: Path) -> None:
    """ADAPTER_DIR must be a folder: a file, a missing path, or a run folder whose adapter sits one level down is a
    UsageError naming what to pass instead (check_serving reports a folder without adapter_config.json itself)."""
    from adapterflow import formats

    if folder.is_file():
        hint = f" (this one is in {folder.parent})" if folder.name in (formats.CONFIG_NAME, *formats.WEIGHTS_NAMES) \
            else ""
        raise UsageError(f"ADAPTER_DIR {folder}: is a file, and an adapter is a folder holding {formats.CONFIG_NAME} "
                         f"and {formats.SAFETENSORS_WEIGHTS_NAME}; pass that folder{hint}")
    if not folder.is_dir():
        raise UsageError(f"ADAPTER_DIR {folder}: no such folder; pass the folder the adapter was saved to")
    if not (folder / formats.CONFIG_NAME).is_file():
        inner = sorted(p.parent for p in folder.glob(f"*/{formats.CONFIG_NAME}"))
        if inner:
            raise UsageError(f"ADAPTER_DIR {folder}: has no {formats.CONFIG_NAME}, but {', '.join(map(str, inner))} "
                             f"does: pass `adapterflow check {inner[0]}`")


def parse_runtimes(text: str) -> tuple[str, ...]:
    from adapterflow.serving import RUNTIMES

    names = [RUNTIME_ALIASES.get(n.strip().lower(), n.strip().lower()) for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNTIMES]
    if unknown or not names:
        raise UsageError(f"--runtime {text!r}: unknown runtime {', '.join(unknown) or '(none given)'}; use a "
                         f"comma-separated list of {', '.join(RUNTIMES)}")
    return tuple(dict.fromkeys(names))


def parse_rank(text: str | None) -> int | None:
    from adapterflow.serving_rules import VLLM_MAX_LORA_RANKS

    if text is None:
        return None
    if not text.strip().isdigit() or int(text) not in VLLM_MAX_LORA_RANKS:
        raise UsageError(f"--max-lora-rank {text!r}: vLLM accepts only {', '.join(map(str, VLLM_MAX_LORA_RANKS))}; "
                         f"pass the value your vLLM server runs with")
    return int(text)


def resolve_base(name: str):
    """A local folder as it is (check_serving reads its headers), a Hub repo id as its `BaseShapes`."""
    from adapterflow.model_references import is_hub_model_id, is_local_reference

    if not name.strip():
        raise UsageError("--base is empty: give the base model's folder or its Hub repo id (namespace/name)")
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    local = is_local_reference(name, Path.cwd()) or (len(path.parts) > 1 and Path(path.parts[0]).exists())
    if local:  # a path, not a Hub id: spelt as one (the parameters' rule), or its first folder exists here
        raise UsageError(f"--base {name}: no such folder; pass the base model's folder (config.json and weights) "
                         f"or its Hub repo id (namespace/name)")
    if not is_hub_model_id(name):
        raise UsageError(f"--base {name}: neither an existing folder nor a Hub repo id (namespace/name)")
    try:
        return hub_base_shapes(name)
    except Exception as exc:  # noqa: BLE001 - any Hub failure is named with the repo
        raise UsageError(f"--base {name}: could not read it from the Hub ({type(exc).__name__}: {exc}); check the "
                         f"repo id, HF_ENDPOINT and HF_TOKEN, or pass a local folder") from None


def hub_base_shapes(repo_id: str):
    """config.json (downloaded) and the weight shapes from the safetensors headers (`get_safetensors_metadata`
    reads only the headers, with HTTP range requests) of a Hub model repo."""
    from huggingface_hub import HfApi, hf_hub_download

    from adapterflow.serving_files import BaseShapes

    endpoint = os.environ.get("HF_ENDPOINT") or None  # as adapterflow.runtime.base_models downloads a base
    config = json.loads(Path(hf_hub_download(repo_id, "config.json", endpoint=endpoint)).read_text())
    metadata = HfApi(endpoint=endpoint).get_safetensors_metadata(repo_id)
    shapes = {name: tuple(info.shape) for file in metadata.files_metadata.values()
              for name, info in file.tensors.items()}
    return BaseShapes(config, shapes, repo_id)


def format_report(report) -> str:
    """The human report: one block per runtime, a line per rule (verdict, rule, message)."""
    labels = {"vllm": "vLLM", "llama.cpp": "llama.cpp", "peft": "PEFT"}
    lines = [f"adapter: {report.adapter_dir}", f"base:    {report.base or 'not given (--base checks module paths)'}"]
    for runtime in report.runtimes:
        failed = report.failed_rules(runtime)
        warned = sum(r.verdict == "warn" for r in report.rules(runtime))
        status = f"FAIL ({', '.join(failed)})" if failed else "pass" + (f" ({warned} warning(s))" if warned else "")
        lines += ["", f"{labels[runtime]}: {status}"]
        lines += [f"  {r.verdict.upper() if r.verdict == 'fail' else r.verdict:<5} {r.rule:<18} {r.message}"
                  for r in report.rules(runtime)]
    return "\n".join(lines)
