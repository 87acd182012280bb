"""One LoRA training step, adapterflow's layers against PEFT's, side by side; peak memory with and without gradient
checkpointing; where the time goes.

    python benchmarks/bench_training.py                               # CPU, fp32, ~3-5 min on 2 cores
    python benchmarks/bench_training.py --steps 6 --skip-memory      # quick check
    python benchmarks/bench_training.py --device cuda --precision bf16   # on a GPU machine

Both libraries wrap deep copies of one Llama (hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 2048, built
from a config with a fixed seed): LoRA r=16, alpha=32 on all linear layers. PEFT's adapter tensors are copied from
ours, so both start equal. The same loop (autocast per --precision, loss.backward, clip_grad_norm_, AdamW step) runs
on the same batches (8 x 128 random tokens), alternating ours/PEFT step by step (the order flips every step).
Reports medians and checks that both models still agree after the timed steps. See benchmarks/README.md.
"""

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ.update(DO_NOT_TRACK="1", HF_HUB_DISABLE_TELEMETRY="1", TRANSFORMERS_VERBOSITY="error")

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import adapterflow  # noqa: E402
from adapterflow import LoraConfig, get_adapter_model  # noqa: E402
from adapterflow.runtime.training import autocast, enable_gradient_checkpointing  # noqa: E402

warnings.filterwarnings("ignore")
transformers.logging.set_verbosity_error()
LORA = dict(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
LIBS = ("ours", "peft")


def build_base(args) -> LlamaForCausalLM:
    torch.manual_seed(args.seed)
    config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=args.layers,
                         num_attention_heads=8, num_key_value_heads=8, vocab_size=2048, max_position_embeddings=512,
                         tie_word_embeddings=False, use_cache=False)
    return LlamaForCausalLM(config).to(args.device, getattr(torch, args.base_dtype))


def build_pair(base, seed: int) -> dict:
    """Ours and PEFT's adapter model on copies of `base`; every adapter tensor of PEFT's set to ours, whose B
    factors get small random values (as after some training) so that every factor has a gradient from step 1."""
    ours = get_adapter_model(copy.deepcopy(base), LoraConfig(**LORA))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**LORA))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
        mine = dict(ours.named_parameters())
        copied = 0
        for name, param in theirs.named_parameters():
            if param.requires_grad:
                param.copy_(mine[name])
                copied += 1
    assert copied == sum(p.requires_grad for p in ours.parameters()), "parameter names differ"
    models = {"ours": ours.train(), "peft": theirs.train()}
    return {lib: (m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3))
            for lib, m in models.items()}


def batches(args) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(args.seed + 1)
    return [torch.randint(0, 2048, (args.batch, args.seq_len), generator=gen).to(args.device)
            for _ in range(args.warmup + args.steps)]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_step(model, optimizer, ids: torch.Tensor, args) -> float:
    with autocast(torch.device(args.device), args.precision):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def time_steps(pair: dict, floor, data: list, args) -> dict:
    """Ours, PEFT and the no-LoRA floor take turns on the same batch, the order rotating every step (so none always
    runs first or after the same other case); {case: [seconds]} of the steps after the warm-up, and the losses."""
    cases = {**{lib: (lambda ids, m=pair[lib]: train_step(*m, ids, args)) for lib in LIBS},
             "floor": lambda ids: floor_step(floor, ids, args)}
    names = list(cases)
    times, losses = {name: [] for name in names}, {name: [] for name in names}
    for i, ids in enumerate(data):
        for name in names[i % len(names):] + names[:i % len(names)]:
            sync(args.device)
            start = time.perf_counter()
            losses[name].append(cases[name](ids))
            sync(args.device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    return {"times": times, "losses": losses}


def agreement(pair: dict) -> float:
    """Largest |ours - PEFT| over the adapter tensors after training: both ran the same steps."""
    theirs = dict(pair["peft"][0].named_parameters())
    return max((p - theirs[n]).abs().max().item() for n, p in pair["ours"][0].named_parameters() if p.requires_grad)


def floor_model(base):
    """The base model with no LoRA at all, frozen, computing the backward a LoRA step needs: the outputs of the first
    block's q/k/v projections (the first layers LoRA adapts) are made to require grad, so every input gradient
    downstream of them is computed, and none upstream (a LoRA step needs none there either). Its step, forward plus
    that backward, is what no LoRA implementation can remove."""
    model = copy.deepcopy(base).train().requires_grad_(False)
    attention = model.model.layers[0].self_attn
    for projection in (attention.q_proj, attention.k_proj, attention.v_proj):
        projection.register_forward_hook(lambda module, args, output: output.requires_grad_(True))
    return model


def floor_step(model, ids: torch.Tensor, args) -> float:
    with autocast(torch.device(args.device), args.precision):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item()


def profile(pair: dict, floor, data: list, args, steps: int = 4, top: int = 14) -> dict:
    """torch.profiler around single steps of ours, PEFT and the no-LoRA floor, taking turns (as the timing does):
    self time per op in ms per step, the top ops, and the share of matrix products (mm, addmm, bmm, attention)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    cases = {**{lib: (lambda ids, m=pair[lib]: train_step(*m, ids, args)) for lib in LIBS},
             "floor": lambda ids: floor_step(floor, ids, args)}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    attr = "self_device_time_total" if args.device == "cuda" else "self_cpu_time_total"
    ops = {name: {} for name in cases}
    names = list(cases)
    for i, ids in enumerate(data[:steps]):
        for name in names[i % len(names):] + names[:i % len(names)]:
            with torch_profile(activities=activities) as prof:
                cases[name](ids)
                sync(args.device)
            for event in prof.key_averages():
                ops[name][event.key] = ops[name].get(event.key, 0.0) + getattr(event, attr) / 1e3 / steps
    result = {}
    for name, table in ops.items():
        products = sum(v for k, v in table.items() if k in MATRIX_OPS)
        result[name] = {"total_ms": sum(table.values()), "matrix_products_ms": products,
                        "top": sorted(table.items(), key=lambda kv: -kv[1])[:top]}
    return result


MATRIX_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm",
              "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
              "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_flash_attention_backward",
              "aten::_scaled_dot_product_efficient_attention",
              "aten::_scaled_dot_product_efficient_attention_backward",
              "aten::_flash_attention_forward", "aten::_flash_attention_backward"}


def measure_memory_here(args) -> float:
    """Peak memory (MB) of one training step after two warm-up steps, in this fresh process: on CUDA
    max_memory_allocated minus the allocation before the step; on CPU the RSS high-water mark (VmHWM, reset through
    /proc/self/clear_refs) minus VmRSS before the step, with glibc's mmap threshold fixed at 64 KiB (set by the
    parent) so freed tensors go back to the kernel and RSS follows live memory."""
    base = build_base(args)
    model, optimizer = build_pair(base, args.seed)[args.lib]
    del base
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    data = batches(args)
    for ids in data[:2]:
        train_step(model, optimizer, ids, args)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        train_step(model, optimizer, data[2], args)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    import ctypes

    ctypes.CDLL(None).malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    before = _proc_kb("VmRSS")
    train_step(model, optimizer, data[2], args)
    return (_proc_kb("VmHWM") - before) / 1024


def _proc_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_table(args) -> dict:
    """{lib: {"off": MB, "on": MB}}, each configuration in a fresh subprocess (no allocator state carried over)."""
    result = {lib: {} for lib in LIBS}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for lib in LIBS:
        for checkpointing in (False, True):
            cmd = [sys.executable, __file__, "--_memory-child", lib, "--threads", str(torch.get_num_threads()), "--device", args.device, "--precision",
                   args.precision, "--base-dtype", args.base_dtype, "--layers", str(args.layers), "--batch",
                   str(args.batch), "--seq-len", str(args.seq_len), "--seed", str(args.seed)]
            cmd += ["--gradient-checkpointing"] if checkpointing else []
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            result[lib]["on" if checkpointing else "off"] = float(out.strip().splitlines()[-1])
    return result


# Report --------------------------------------------------------------------------------------------------------


def med(values) -> float:
    return statistics.median(values)


def report(res: dict) -> str:
    a = res["args"]
    tokens = a["batch"] * a["seq_len"]
    t = res["times"]
    floor = med(t["floor"])
    ours, theirs = med(t["ours"]), med(t["peft"])
    lines = [
        f"One LoRA training step: Llama 512/1376, {a['layers']} layers, vocab 2048, r=16 all-linear, AdamW, batch "
        f"{a['batch']} x {a['seq_len']} tokens, {a['device']}, precision {a['precision']}, base {a['base_dtype']}, "
        f"torch threads {res['meta']['threads']}, {a['steps']} timed steps each (after {a['warmup']} warm-up)",
        "",
        "| | ours | PEFT | ours/PEFT |",
        "|---|---|---|---|",
        f"| step time (median) | {ours * 1e3:.1f} ms | {theirs * 1e3:.1f} ms | {ours / theirs:.2f}x |",
        f"| step time (min-max) | {min(t['ours']) * 1e3:.1f}-{max(t['ours']) * 1e3:.1f} ms | "
        f"{min(t['peft']) * 1e3:.1f}-{max(t['peft']) * 1e3:.1f} ms | |",
        f"| tokens/s | {tokens / ours:,.0f} | {tokens / theirs:,.0f} | |",
        f"| LoRA's share (step - no-LoRA floor {floor * 1e3:.1f} ms) | {(ours - floor) * 1e3:.1f} ms | "
        f"{(theirs - floor) * 1e3:.1f} ms | {(ours - floor) / (theirs - floor):.2f}x |",
    ]
    if "memory" in res:
        m, unit = res["memory"], res["memory_method"]
        for key, label in (("off", "without"), ("on", "with")):
            lines.append(f"| peak step memory {label} gradient checkpointing ({unit}) | {m['ours'][key]:.1f} MB | "
                         f"{m['peft'][key]:.1f} MB | {m['ours'][key] / m['peft'][key]:.2f}x |")
    goal = "PASS" if ours / theirs <= 0.8 else "FAIL"
    lines += ["", f"Goal ours <= 0.8x PEFT's step time: {ours / theirs:.2f}x {goal}. The no-LoRA floor (the base "
              f"model's forward and input-gradient backward alone) is {floor / theirs:.2f}x PEFT's step: the lowest "
              f"ratio any LoRA implementation could reach here. Adapters agree after training: max |ours - PEFT| = "
              f"{res['max_abs_diff']:.2e}."]
    if "profile" in res:
        p = res["profile"]
        lines += ["", "Profile (torch.profiler, self time in ms per step; floor = the same step without LoRA):", "",
                  "| op | ours | PEFT | floor |", "|---|---|---|---|"]
        tables = {name: dict(p[name]["top"]) for name in p}
        for op in sorted(set().union(*tables.values()), key=lambda k: -max(t.get(k, 0) for t in tables.values())):
            lines.append(f"| {op} | " + " | ".join(f"{tables[n].get(op, 0):.1f}" for n in ("ours", "peft", "floor"))
                         + " |")
        for key, label in (("matrix_products_ms", "matrix products (mm, addmm, attention)"), ("total_ms", "all ops")):
            lines.append(f"| {label} | " + " | ".join(f"{p[n][key]:.1f}" for n in ("ours", "peft", "floor")) + " |")
    return "\n".join(lines)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--base-dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per library")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-profile", action="store_true")
    parser.add_argument("--json", default=str(Path(__file__).with_name("results_training.json")))
    parser.add_argument("--_memory-child", dest="lib", choices=LIBS, help=argparse.SUPPRESS)
    parser.add_argument("--gradient-checkpointing", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.lib:  # a memory measurement in a fresh process (memory_table)
        print(measure_memory_here(args))
        return
    wall = time.perf_counter()
    base = build_base(args)
    pair, data = build_pair(base, args.seed), batches(args)
    print(f"timing {args.steps} steps per library ...", file=sys.stderr)
    floor = floor_model(base)
    timed = time_steps(pair, floor, data, args)
    res = {"args": vars(args), "times": timed["times"], "losses": timed["losses"], "max_abs_diff": agreement(pair)}
    if not args.skip_profile:
        print("profiling ...", file=sys.stderr)
        res["profile"] = profile(pair, floor, data, args)
    if not args.skip_memory:
        print("memory, 4 fresh processes ...", file=sys.stderr)
        res["memory"] = memory_table(args)
        res["memory_method"] = "max_memory_allocated" if args.device == "cuda" else "RSS high-water mark"
    res["meta"] = {"threads": torch.get_num_threads(), "torch": torch.__version__, "peft": peft.__version__,
                   "transformers": transformers.__version__, "adapterflow": getattr(adapterflow, "__version__", "?"),
                   "python": platform.python_version(), "cpus": os.cpu_count(),
                   "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                   "wall_s": time.perf_counter() - wall}
    Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    print(report(res))
    print(f"\n(raw seconds in {args.json}; wall time {res['meta']['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
