"""Side-by-side benchmark of adapterflow and PEFT: creation, PiSSA init, save, PiSSA->LoRA conversion, load.

    python benchmarks/bench_core.py                      # full run (minutes: includes one full-SVD PiSSA layer)
    python benchmarks/bench_core.py --layers 2 --reps 3 --skip-full-pissa   # quick check

Both libraries run in the same process on identical base weights (deep copies of one model built from a config
with a fixed seed); copies, directory setup and cleanup are outside the timed region. See benchmarks/README.md.
"""

import argparse
import copy
import ctypes
import datetime
import gc
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

os.environ.update(DO_NOT_TRACK="1", HF_HUB_DISABLE_TELEMETRY="1", TRANSFORMERS_VERBOSITY="error")

import peft  # noqa: E402
import safetensors  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import adapterflow  # noqa: E402
from adapterflow import AdapterModel, LoraConfig, get_adapter_model, get_adapter_state_dict  # noqa: E402

warnings.filterwarnings("ignore")
transformers.logging.set_verbosity_error()

ONE_LAYER = r"model\.layers\.0\.mlp\.down_proj"  # full-SVD PiSSA target (4096 x 11008)


# Model and adapters --------------------------------------------------------------------------------------------


def build_base(layers: int, seed: int) -> LlamaForCausalLM:
    """Llama with 7B layer dims, `layers` blocks, a small vocabulary, bf16; built once, no download."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                         num_hidden_layers=layers, vocab_size=1024, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def lora_kwargs(init, targets="all-linear") -> dict:
    return dict(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=init, task_type="CAUSAL_LM")


def create(lib: str, base, init=True, targets="all-linear"):
    """A fresh adapter model of `lib` ("ours" | "peft") on a deep copy of `base` (the copy is not timed)."""
    return wrap(lib, copy.deepcopy(base), init, targets)


def wrap(lib: str, fresh, init, targets):
    torch.manual_seed(0)
    if lib == "ours":
        return get_adapter_model(fresh, LoraConfig(**lora_kwargs(init, targets)))
    return peft.get_peft_model(fresh, peft.LoraConfig(**lora_kwargs(init, targets)))


@torch.no_grad()
def perturb(model, seed: int = 1) -> None:
    """Change every trainable (adapter) tensor, as training would."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.01)


def nbytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


# Measuring -----------------------------------------------------------------------------------------------------


def compare(cases: dict, reps: int, warmup: int = 1) -> dict:
    """Run each case `warmup + reps` times, interleaved; {name: [seconds]}.

    A case is (setup, fn, teardown): setup() -> arg (untimed), fn(arg) (timed), teardown(arg, result) (untimed).
    Every repetition runs all cases, starting one case later than the last (ours, peft, raw / peft, raw, ours / ...),
    so no case always runs first or right after the same other case.
    """
    times = {name: [] for name in cases}
    names = list(cases)
    for i in range(warmup + reps):
        for name in names[i % len(names):] + names[: i % len(names)]:
            setup, fn, teardown = cases[name]
            arg = setup()
            gc.collect()
            start = time.perf_counter()
            result = fn(arg)
            elapsed = time.perf_counter() - start
            teardown(arg, result)
            del arg, result
            gc.collect()
            if i >= warmup:
                times[name].append(elapsed)
    return times


_LIBC = ctypes.CDLL(None)


def _proc_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def peak_extra_mb(fn) -> float:
    """Peak RSS growth (MB) while fn() runs: reset the high-water mark, run, VmHWM - VmRSS before (Linux)."""
    gc.collect()
    _LIBC.malloc_trim(0)  # freed-but-resident heap pages would hide re-used memory from the RSS peak
    Path("/proc/self/clear_refs").write_text("5")
    before = _proc_kb("VmRSS")
    fn()
    return (_proc_kb("VmHWM") - before) / 1024


def _cpu_seconds() -> tuple[float, float]:
    """(CPU seconds all processes have been busy, CPU seconds of this process), for `others_cpu_share`."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    own = os.times()
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"), own.user + own.system


def others_cpu_share(step):
    """Run step(); return (its result, share of all CPUs used by OTHER processes meanwhile): a noise indicator."""
    (busy0, own0), wall0 = _cpu_seconds(), time.perf_counter()
    result = step()
    (busy1, own1), wall = _cpu_seconds(), time.perf_counter() - wall0
    return result, max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall * os.cpu_count())


class Dirs:
    """Fresh, not yet existing directories under one temp root; removed (and flushed) after each use."""

    def __init__(self, root: Path):
        self.root, self.count = root, 0

    def new(self, create: bool = False) -> Path:
        self.count += 1
        path = self.root / f"d{self.count}"
        if create:
            path.mkdir()
        return path

    @staticmethod
    def drop(path: Path, _result=None) -> None:
        shutil.rmtree(path, ignore_errors=True)
        os.sync()  # no dirty pages of one case left for the next case's fsync to wait on


def fsynced_save_file(state: dict, path: Path) -> None:
    save_file(state, path, metadata={"format": "pt"})
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


_WRITEBACK_CHUNK = 1 << 20
_SYNC_FILE_RANGE_WRITE = 2  # from <linux/fs.h>


def durable_bytes(blob: memoryview, path: Path) -> None:
    """Write `blob` (the adapter's bytes, already one contiguous buffer) durably and do nothing else, without any
    adapterflow code: 1 MB writes, each followed by sync_file_range(SYNC_FILE_RANGE_WRITE) so the disk starts at
    once (the fastest way found on this disk), then fsync of the file and of its folder. What any durable save of
    these bytes pays to the disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for offset in range(0, len(blob), _WRITEBACK_CHUNK):
            chunk = blob[offset : offset + _WRITEBACK_CHUNK]
            os.write(fd, chunk)
            _LIBC.sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(len(chunk)), _SYNC_FILE_RANGE_WRITE)
        os.fsync(fd)
    finally:
        os.close(fd)
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(folder)
    os.close(folder)


def durable_bytes_hashed(blob: memoryview, path: Path) -> str:
    """`durable_bytes` with the sha256 of the same bytes computed meanwhile in a second thread (hashlib releases
    the GIL; one call over the contiguous blob): the least a save that records its file's sha256 (the integrity
    manifest) can cost here. Returns the hex digest."""
    sha = hashlib.sha256()
    thread = threading.Thread(target=sha.update, args=(blob,))
    thread.start()
    try:
        durable_bytes(blob, path)
    finally:
        thread.join()
    return sha.hexdigest()


def safetensors_bytes(state: dict) -> memoryview:
    """The exact bytes `save_file` writes for `state` (what `durable_bytes` writes)."""
    return memoryview(safetensors.torch.save(state, metadata={"format": "pt"}))


# Benchmarks ----------------------------------------------------------------------------------------------------


def bench_creation(base, init, reps: int, targets="all-linear", warmup: int = 1) -> dict:
    cases = {lib: (lambda: copy.deepcopy(base), lambda m, lib=lib: wrap(lib, m, init, targets), lambda *a: None)
             for lib in ("ours", "peft")}
    return compare(cases, reps, warmup)


def bench_save(base, dirs: Dirs, reps: int, reference: Path) -> tuple[dict, dict, dict]:
    """Plain save: ours, PEFT, the raw save_file floor (and + fsync), the bytes alone written durably; also saves
    PEFT's adapter to `reference` for loading."""
    models = {lib: create(lib, base) for lib in ("ours", "peft")}
    for model in models.values():
        perturb(model)
    ours = models["ours"]
    state = {k: t.contiguous() for k, t in get_adapter_state_dict(ours, ours.peft_config["default"]).items()}
    peft_keys = set(peft.get_peft_model_state_dict(models["peft"]))
    assert set(state) == peft_keys, "ours and PEFT save different keys"
    blob = safetensors_bytes(state)
    cases = {
        "ours": (dirs.new, lambda d: ours.save_pretrained(d), dirs.drop),
        "peft": (dirs.new, lambda d: models["peft"].save_pretrained(d), dirs.drop),
        "raw": (lambda: dirs.new(create=True),
                lambda d: save_file(state, d / "adapter_model.safetensors", metadata={"format": "pt"}), dirs.drop),
        "raw_fsync": (lambda: dirs.new(create=True),
                      lambda d: fsynced_save_file(state, d / "adapter_model.safetensors"), dirs.drop),
        "durable_bytes": (lambda: dirs.new(create=True),
                          lambda d: durable_bytes(blob, d / "adapter_model.safetensors"), dirs.drop),
        "durable_bytes_sha256": (lambda: dirs.new(create=True),
                                 lambda d: durable_bytes_hashed(blob, d / "adapter_model.safetensors"), dirs.drop),
        "sha256_alone": (dirs.new, lambda d: hashlib.sha256(blob).hexdigest(), dirs.drop),  # one core, no disk
    }
    times = compare(cases, reps)
    memory = {}
    for name, (setup, fn, teardown) in cases.items():
        arg = setup()
        memory[name] = peak_extra_mb(lambda: fn(arg))
        teardown(arg)
    models["peft"].save_pretrained(reference)
    return times, memory, {"adapter_mb": nbytes(state) / 2**20}


def bench_conversion(base, dirs: Dirs, reps: int) -> tuple[dict, dict, dict]:
    """PiSSA->LoRA conversion on save, each library against its own initial adapter saved before 'training'."""
    cases, sizes = {}, {}
    for lib in ("ours", "peft"):
        model = create(lib, base, init="pissa_niter_4")
        initial = dirs.root / f"initial_{lib}"  # PEFT uses the basename as a temporary adapter name
        model.save_pretrained(initial)
        perturb(model)
        cases[lib] = (dirs.new, lambda d, m=model, i=initial: m.save_pretrained(
            d, path_initial_model_for_weight_conversion=str(i)), dirs.drop)
    times = compare(cases, reps)
    memory = {}
    for name, (setup, fn, teardown) in cases.items():
        arg = setup()
        memory[name] = peak_extra_mb(lambda: fn(arg))
        if name == "ours":
            sizes["converted_adapter_mb"] = nbytes(adapterflow.read_adapter(arg)[0]) / 2**20
        teardown(arg)
    return times, memory, sizes


def bench_load(base, folder: Path, reps: int) -> dict:
    cases = {
        "ours": (lambda: copy.deepcopy(base), lambda m: AdapterModel.from_pretrained(m, folder), lambda *a: None),
        "peft": (lambda: copy.deepcopy(base), lambda m: peft.PeftModel.from_pretrained(m, folder), lambda *a: None),
    }
    return compare(cases, reps)


# Report --------------------------------------------------------------------------------------------------------


def fmt(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds >= 10 else f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def med(values) -> float:
    return statistics.median(values)


def spread(values) -> str:
    return f"n={len(values)}, min {fmt(min(values))}, max {fmt(max(values))}"


def report(res: dict) -> tuple[str, list]:
    t, mem = res["times"], res["memory"]
    rows = ["| operation | ours (median) | PEFT (median) | ratio ours/PEFT | notes |", "|---|---|---|---|---|"]

    def row(label, key, notes=""):
        if key not in t:
            return
        o, p = med(t[key]["ours"]), med(t[key]["peft"])
        rows.append(f"| {label} | {fmt(o)} | {fmt(p)} | {o / p:.2f}x | ours {spread(t[key]['ours'])}; "
                    f"PEFT {spread(t[key]['peft'])}{notes}; other processes' CPU {res['others_cpu'][key]:.0%} |")

    row("create, default init (all-linear)", "create_default")
    row('create, init "pissa_niter_4" (all-linear)', "create_pissa_niter_4")
    row('create, init "pissa" (full SVD, 1 layer: down_proj)', "create_pissa_full")
    save = t["save"]
    raw, raw_fsync, durable = med(save["raw"]), med(save["raw_fsync"]), med(save["durable_bytes"])
    hashed = med(save["durable_bytes_sha256"])
    ours_save, peft_save = med(save["ours"]), med(save["peft"])
    row("save_pretrained (safetensors)", "save",
        f"; raw save_file {fmt(raw)} (ours/raw {ours_save / raw:.2f}x); raw save_file+fsync {fmt(raw_fsync)} "
        f"(ours/that {ours_save / raw_fsync:.2f}x); durable bytes {fmt(durable)} (ours/that {ours_save / durable:.2f}x, "
        f"that/PEFT {durable / peft_save:.2f}x); durable bytes + their sha256 in a second thread {fmt(hashed)} "
        f"(that/durable bytes {hashed / durable:.2f}x, ours/that {ours_save / hashed:.2f}x); "
        f"adapter {res['sizes']['adapter_mb']:.1f} MB")
    row("save with PiSSA->LoRA conversion", "convert",
        f"; converted adapter {res['sizes']['converted_adapter_mb']:.1f} MB")
    row("load (from_pretrained, PEFT-saved folder)", "load")
    rows += ["", "| save: peak extra RSS | ours | PEFT | raw save_file | raw+fsync | adapter written |",
             "|---|---|---|---|---|---|"]
    rows.append(f"| plain | {mem['save']['ours']:.1f} MB | {mem['save']['peft']:.1f} MB | {mem['save']['raw']:.1f} MB "
                f"| {mem['save']['raw_fsync']:.1f} MB | {res['sizes']['adapter_mb']:.1f} MB |")
    rows.append(f"| with conversion | {mem['convert']['ours']:.1f} MB | {mem['convert']['peft']:.1f} MB | - | - "
                f"| {res['sizes']['converted_adapter_mb']:.1f} MB |")
    targets = [
        ("save <= 0.5x PEFT (wave 1)", ours_save / peft_save, 0.5),
        ("save <= 1.5x raw floor (save_file, no fsync; wave 1)", ours_save / raw, 1.5),
        ("save <= 1.0x PEFT (wave 2)", ours_save / peft_save, 1.0),
        ("save <= 1.2x durable floor (the bytes alone written and fsynced; wave 2)", ours_save / durable, 1.2),
        ("conversion <= 0.5x PEFT", med(t["convert"]["ours"]) / med(t["convert"]["peft"]), 0.5),
        ("pissa_niter_4 init <= 1.0x PEFT",
         med(t["create_pissa_niter_4"]["ours"]) / med(t["create_pissa_niter_4"]["peft"]), 1.0),
        ("save extra memory <= 2x adapter size", mem["save"]["ours"] / res["sizes"]["adapter_mb"], 2.0),
        ("conversion-save extra memory <= 2x (converted) adapter size",
         mem["convert"]["ours"] / res["sizes"]["converted_adapter_mb"], 2.0),
    ]
    rows += ["", "| target | measured | limit | result |", "|---|---|---|---|"]
    rows += [f"| {name} | {value:.2f}x | {limit}x | {'PASS' if value <= limit else 'FAIL'} |"
             for name, value, limit in targets]
    rows.append(f"\nWriting just the adapter's bytes durably (write + fsync, no adapterflow code) took {durable / peft_save:.2f}x "
                f"PEFT's save and {durable / raw:.2f}x the raw floor in this run; our whole save took "
                f"{ours_save / durable:.2f}x that. A durable save can meet the two save targets only when the disk lets "
                f"the bytes alone do so.")
    verdicts = [{"target": n, "measured": v, "limit": lim, "pass": v <= lim} for n, v, lim in targets]
    busy = max(res["others_cpu"].values())
    if busy > 0.05:
        rows.append(f"\nWARNING: other processes used up to {busy:.0%} of the CPUs during a step; timings are noisy.")
    return "\n".join(rows), verdicts


# Main ----------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (7B dims each; default 4)")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per operation (plus one warm-up)")
    parser.add_argument("--save-reps", type=int, default=15,
                        help="timed repetitions of the plain save (fast, and the noisiest on a VM disk)")
    parser.add_argument("--pissa-reps", type=int, default=1, help="repetitions of the full-SVD PiSSA init")
    parser.add_argument("--skip-full-pissa", action="store_true", help="skip the full-SVD PiSSA init (minutes)")
    parser.add_argument("--tmpdir", default=None,
                        help="parent of the save dirs (default: the system temp dir); /dev/shm removes disk noise")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=str(Path(__file__).with_name("results.json")))
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-core-", dir=args.tmpdir))
    started = time.time()
    print(f"building base: {args.layers} layers, bf16, saves under {root}", file=sys.stderr)
    base = build_base(args.layers, args.seed)
    res = {"times": {}, "memory": {}, "sizes": {}, "others_cpu": {}}
    try:
        steps = [("create_default", lambda: bench_creation(base, True, args.reps)),
                 ("create_pissa_niter_4", lambda: bench_creation(base, "pissa_niter_4", args.reps))]
        if not args.skip_full_pissa:
            steps.append(("create_pissa_full",
                          lambda: bench_creation(base, "pissa", args.pissa_reps, ONE_LAYER, warmup=0)))
        dirs, reference = Dirs(root), root / "reference"  # reference: PEFT-saved adapter both libraries load
        steps += [("save", lambda: bench_save(base, dirs, args.save_reps, reference)),
                  ("convert", lambda: bench_conversion(base, dirs, args.reps)),
                  ("load", lambda: bench_load(base, reference, args.reps))]
        for name, step in steps:
            print(f"{name} ...", file=sys.stderr)
            out, res["others_cpu"][name] = others_cpu_share(step)
            if name in ("save", "convert"):
                res["times"][name], res["memory"][name], sizes = out
                res["sizes"].update(sizes)
            else:
                res["times"][name] = out
    finally:
        shutil.rmtree(root, ignore_errors=True)
    table, verdicts = report(res)
    res["targets"] = verdicts
    res["meta"] = {
        "command": " ".join([Path(sys.executable).name] + sys.argv), "date": datetime.datetime.now().isoformat(),
        "args": vars(args), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "safetensors": safetensors.__version__, "adapterflow": adapterflow.__version__,
        "save_root": str(root), "wall_s": time.time() - started,
    }
    Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    print(table)
    print(f"\n(raw seconds in {args.json}; total wall time {res['meta']['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
