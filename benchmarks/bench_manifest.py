"""What the integrity manifest (adapterflow.json) costs a save and a load, next to PEFT and the durable floor.

The save rows of bench_core.py (same model, adapter, interleaving and disk hygiene) plus one more case: our save
with the manifest's work switched off in this process only (no sha256 of the weights, no fingerprint, an empty
manifest file), so `ours - ours without manifest` is the manifest's cost in the same run. Loads: our own save
loaded with the manifest checked (the default) and with `verify_manifest=False`.

    python benchmarks/bench_manifest.py                     # 4 layers, 15 save repetitions
    python benchmarks/bench_manifest.py --layers 2 --reps 7 --tmpdir /dev/shm
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench_core as bc  # noqa: E402

import adapterflow.digest  # noqa: E402
import adapterflow.save  # noqa: E402
from adapterflow import AdapterModel  # noqa: E402


@contextlib.contextmanager
def manifest_work_off():
    """Our save without the manifest's work: digests not fed, no base fingerprint, '{}' as the manifest."""
    saved = (adapterflow.digest.StreamDigest.update, adapterflow.save.FolderManifest.document,
             adapterflow.save.base_fingerprint)
    adapterflow.digest.StreamDigest.update = lambda self, buffer: None
    adapterflow.save.FolderManifest.document = lambda self: b"{}"
    adapterflow.save.base_fingerprint = lambda *args, **kwargs: None
    try:
        yield
    finally:
        (adapterflow.digest.StreamDigest.update, adapterflow.save.FolderManifest.document,
         adapterflow.save.base_fingerprint) = saved


def with_unmanifested_case(compare):
    """bench_core.compare, with "ours_no_manifest" added next to "ours" in the plain-save comparison."""
    def wrapped(cases, reps, warmup=1):
        if "durable_bytes" in cases:
            setup, save, teardown = cases["ours"]

            def save_without(d):
                with manifest_work_off():
                    return save(d)
            cases = {**cases, "ours_no_manifest": (setup, save_without, teardown)}
        return compare(cases, reps, warmup)
    return wrapped


def bench_loads(base, root: Path, reps: int) -> dict:
    model = bc.create("ours", base)
    bc.perturb(model)
    model.save_pretrained(root / "ours-saved")
    fresh = lambda: copy.deepcopy(base)  # noqa: E731
    return bc.compare({
        "verified": (fresh, lambda b: AdapterModel.from_pretrained(b, root / "ours-saved"), lambda *a: None),
        "unverified": (fresh, lambda b: AdapterModel.from_pretrained(b, root / "ours-saved", verify_manifest=False),
                       lambda *a: None)}, reps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--reps", type=int, default=15, help="timed repetitions of each save (plus one warm-up)")
    parser.add_argument("--load-reps", type=int, default=7)
    parser.add_argument("--tmpdir", default=None)
    parser.add_argument("--json", default=str(Path(__file__).with_name("results_manifest.json")))
    args = parser.parse_args()
    base = bc.build_base(args.layers, 0)
    root = Path(tempfile.mkdtemp(prefix="bench-manifest-", dir=args.tmpdir))
    bc.compare = with_unmanifested_case(bc.compare)
    try:
        (saves, _, sizes), others = bc.others_cpu_share(lambda: bc.bench_save(base, bc.Dirs(root), args.reps,
                                                                              root / "reference"))
        loads = bench_loads(base, root, args.load_reps)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ms = {name: bc.med(times) * 1000 for name, times in {**saves, **loads}.items()}
    rows = [f"| {name} | {ms[name]:.1f} ms |" for name in ms]
    cost = ms["ours"] - ms["ours_no_manifest"]
    print("| case (median) | time |\n|---|---|\n" + "\n".join(rows))
    print(f"\nadapter {sizes['adapter_mb']:.1f} MB; others' CPU {others:.0%}")
    print(f"save: ours/PEFT {ms['ours'] / ms['peft']:.2f}x (goal <= 1.0x), ours/durable bytes "
          f"{ms['ours'] / ms['durable_bytes']:.2f}x (goal <= 1.2x); manifest {cost:+.1f} ms, ours/ours without "
          f"manifest {ms['ours'] / ms['ours_no_manifest']:.2f}x")
    print(f"the least a hashed save costs here: durable bytes + their sha256 in a second thread "
          f"{ms['durable_bytes_sha256']:.1f} ms = {ms['durable_bytes_sha256'] / ms['durable_bytes']:.2f}x durable "
          f"bytes (ours/that {ms['ours'] / ms['durable_bytes_sha256']:.2f}x); sha256 alone (one core) "
          f"{ms['sha256_alone']:.1f} ms = {ms['sha256_alone'] / ms['durable_bytes']:.2f}x")
    print(f"load of our save: checked {ms['verified']:.1f} ms, verify_manifest=False {ms['unverified']:.1f} ms "
          f"({ms['verified'] - ms['unverified']:+.1f} ms)")
    Path(args.json).write_text(json.dumps({"seconds": {**saves, **loads}, "others_cpu": others,
                                           "args": vars(args)}, indent=1) + "\n")


if __name__ == "__main__":
    main()
