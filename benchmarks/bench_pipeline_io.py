"""Count the I/O of one save-adapter run: base-model weight reads, adapter tensor writes and adapter tensor reads.

Counts, not timings. The run is `adapterflow run` in this process (its own temporary Prefect server, MLflow on the
default sqlite store), so every task's file access is seen:

- base-model weight reads: calls of transformers' `PreTrainedModel.from_pretrained` (what
  `adapterflow.runtime.base_models.load_base_model` uses; config-only and meta-device models read no weights);
- adapter tensor writes: opens for writing of an adapter weights file (`adapter_model.safetensors`,
  `adapter_model.bin`, and the old checkpoint file `trainable.safetensors`), through `os.open` (our writer) or
  `open` (copies: shutil), and renames of a temporary file onto such a name (MLflow's local artifact store
  stages every upload in a `mkstemp` file, then `os.replace`s it);
- adapter tensor reads: `safetensors.torch.safe_open` (under `load_file`) and `open` for reading of those files
  (loading, hashing for the saved-files table, copies); the read-only `os.open` of an fsync is not a read.

Each access is attributed to the folder it lands in (`initial`, `checkpoints`, `extracted`, `converted`, `adapter`,
`hub`, `mlartifacts`, ...; staging folders count as the folder they become). The script uses only what both the
old and the new pipeline have, so it runs unchanged on an older checkout:

    python benchmarks/bench_pipeline_io.py --steps 20 --checkpoint-every 5 --json /tmp/io-new.json
"""

from __future__ import annotations

import argparse
import builtins
import collections
import json
import os
import re
import sys
import tempfile
from pathlib import Path

WEIGHT_FILES = {"adapter_model.safetensors", "adapter_model.bin", "trainable.safetensors"}
_STAGING = re.compile(r"^\.+(?P<name>.+?)\.(staging|replaced)-.*$")


class Counter:
    def __init__(self, runs_root: Path) -> None:
        self.runs_root = runs_root
        self.writes: collections.Counter[str] = collections.Counter()
        self.reads: collections.Counter[str] = collections.Counter()
        self.base_reads: list[str] = []

    def where(self, path: str) -> str:
        """The run folder (or runs_root entry) a path belongs to, staging names resolved."""
        path = Path(os.path.abspath(path))
        try:
            parts = path.relative_to(self.runs_root).parts
        except ValueError:
            return "outside runs_root"
        if parts[0] == "mlartifacts":
            return "mlartifacts"
        top = parts[1] if len(parts) > 2 else parts[0]  # <runs_root>/<run>/<folder>/...
        match = _STAGING.match(top)
        return match.group("name") if match else top

    def install(self) -> None:
        from transformers import PreTrainedModel
        import safetensors.torch

        counter, real_os_open, real_open, real_replace = self, os.open, builtins.open, os.replace
        real_safe_open, real_from_pretrained = safetensors.torch.safe_open, PreTrainedModel.from_pretrained.__func__

        def os_open(path, flags, *args, **kwargs):
            # Writes only: our reads go through safe_open / open, and a read-only os.open is an fsync.
            if flags & (os.O_WRONLY | os.O_RDWR) and os.path.basename(os.fsdecode(path)) in WEIGHT_FILES:
                counter.writes[counter.where(os.fsdecode(path))] += 1
            return real_os_open(path, flags, *args, **kwargs)

        def open_(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)) and os.path.basename(os.fsdecode(file)) in WEIGHT_FILES:
                table = counter.writes if any(c in mode for c in "wax+") else counter.reads
                table[counter.where(os.fsdecode(file))] += 1
            return real_open(file, mode, *args, **kwargs)

        def replace(src, dst, *args, **kwargs):
            # A weights file written under a temporary name and renamed into place (MLflow's local artifact
            # store stages each upload in a mkstemp file): the write is counted where the file lands.
            if os.path.basename(os.fsdecode(dst)) in WEIGHT_FILES and \
                    os.path.basename(os.fsdecode(src)) not in WEIGHT_FILES:
                counter.writes[counter.where(os.fsdecode(dst))] += 1
            return real_replace(src, dst, *args, **kwargs)

        def safe_open(filename, *args, **kwargs):
            if os.path.basename(os.fsdecode(filename)) in WEIGHT_FILES:
                counter.reads[counter.where(os.fsdecode(filename))] += 1
            return real_safe_open(filename, *args, **kwargs)

        def from_pretrained(cls, name_or_path, *args, **kwargs):
            counter.base_reads.append(str(name_or_path))
            return real_from_pretrained(cls, name_or_path, *args, **kwargs)

        os.open, builtins.open, safetensors.torch.safe_open, os.replace = os_open, open_, safe_open, replace
        PreTrainedModel.from_pretrained = classmethod(from_pretrained)

    def report(self) -> dict:
        return {"base_model_weight_reads": len(self.base_reads),
                "adapter_writes": sum(self.writes.values()),
                "adapter_writes_by_folder": dict(sorted(self.writes.items())),
                "adapter_reads": sum(self.reads.values()), "adapter_reads_by_folder": dict(sorted(self.reads.items()))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--init", default=None, help="adapter.init (default: the run's default, pissa_niter_4)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", help="also write the counts here")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-io-"))
    os.environ.setdefault("ADAPTERFLOW_CACHE", str(work / "cache"))
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect-home"))
    from adapterflow.flows.cli import run_command
    from adapterflow.runtime.base_models import resolve_base_model

    resolve_base_model("builtin:tiny-llama")  # build the builtin model before counting (it writes, not reads)
    runs_root = (work / "runs").resolve()
    overrides = [f"runs_root={runs_root}", "run_name=bench", f"training.steps={args.steps}",
                 f"training.checkpoint_every={args.checkpoint_every}", "training.device=cpu", *args.overrides]
    if args.init:
        overrides.append(f"adapter.init={args.init}")
    counter = Counter(runs_root)
    counter.install()
    summary = run_command(None, overrides)
    result = {"overrides": overrides, "converted": summary["converted"], **counter.report()}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
