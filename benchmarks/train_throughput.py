"""Training throughput: nanoseek's DeepSeekV3 vs ``transformers.DeepseekV3ForCausalLM``, one process.

Both models are built from the SAME config with the SAME weights (transformers gets nanoseek's
initial state dict; the state-dict keys coincide), see the same random token batches, and run the
same step: forward with loss (``--precision``, as training's setting: by default bf16 autocast over
float32 master weights where the chip computes in bf16 natively, else plain float32), backward, gradient clipping at 1.0, AdamW (fused
where this torch supports it for the device, else foreach; β = (0.9, 0.95), weight decay 0.1).
transformers runs with ``attn_implementation="sdpa"`` and ``experts_implementation="grouped_mm"``
(transformers ≥ 5 has that switch; its default falls back to eager where grouped_mm cannot run).
The ``nanoseek-muon`` row (``--impls``) runs the same step with ``--optimizer muon``
(``nanoseek/train/muon.py``), to show what its Newton-Schulz iterations cost per step.
The MTP modules are left out by default (transformers has none); ``--mtp`` keeps them in nanoseek,
and its FLOPs then count them.

Reported per implementation: tokens/s (batch × seq over the MEDIAN timed step), TFLOP/s
(tokens/s × FLOPs/token of ``nanoseek.info.training_flops_per_token``, the PaLM / nanoGPT
convention: 6 × matmul parameters touched per token, LM head in, embedding out,
+ 6·L·H·T·(qk_head_dim + v_head_dim) attention over the full square), MFU against
``--peak-tflops`` (default: measured here, an 8192³ matmul on accelerators, a 4096³ one on the CPU,
in the dtype the benchmark computes in), peak memory (``torch.cuda.max_memory_allocated`` on
CUDA, sampled process RSS elsewhere) and the ratio to transformers' tokens/s.

    python benchmarks/train_throughput.py --preset bench --batch-size 8 --seq-len 2048 \\
        --steps 20 --warmup 5 --json results/train_bench.json
    python benchmarks/train_throughput.py --preset tiny --steps 3 --warmup 1 --device cpu   # smoke
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import (  # noqa: E402
    PeakMemory,
    Timer,
    build_transformers_model,
    format_table,
    free_memory,
    header,
    measure_matmul_peak_tflops,
    median,
    write_json,
)
from nanoseek.config import PRECISIONS, get_preset  # noqa: E402
from nanoseek.device import autocast_dtype, pick_device  # noqa: E402
from nanoseek.info import training_flops_per_token  # noqa: E402

DEFAULT_SHAPES = {"tiny": (2, 32), "small": (4, 256), "bench": (8, 2048)}
IMPLS = ("nanoseek", "nanoseek-compiled", "nanoseek-fp8", "nanoseek-muon", "transformers")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench", choices=sorted(DEFAULT_SHAPES))
    p.add_argument("--batch-size", type=int, default=None, help="default: bench 8, small 4, tiny 2")
    p.add_argument("--seq-len", type=int, default=None, help="default: bench 2048, small 256, tiny 32")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--compile", action="store_true", help="torch.compile every row (transformers too)")
    p.add_argument("--fp8", action="store_true",
                   help="add a nanoseek row with convert_to_fp8 (block-wise FP8 GEMMs; emulation backend "
                        "until the Triton kernels exist, so expect it slower than bf16)")
    p.add_argument("--fp8-ue8m0", action="store_true", help="power-of-two FP8 scales (with --fp8)")
    p.add_argument("--impls", default=None,
                   help=f"comma list from {', '.join(IMPLS)} (default: nanoseek,nanoseek-compiled,transformers; "
                        "--fp8 adds nanoseek-fp8)")
    p.add_argument("--mtp", action="store_true", help="keep the preset's MTP modules in nanoseek")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="as training's setting (nanoseek.device.autocast_dtype): auto = bf16 autocast where the "
                        "chip computes in it natively (recent GPUs, CPUs with AVX512-BF16/AMX), else float32")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="MFU denominator; default: measured matmul peak of this device")
    p.add_argument("--peak-size", type=int, default=None, help="matmul size for the peak (default 8192, CPU 4096)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--json", default=None, help="write all numbers here")
    args = p.parse_args(argv)
    b, t = DEFAULT_SHAPES[args.preset]
    args.batch_size = args.batch_size or b
    args.seq_len = args.seq_len or t
    impls = args.impls.split(",") if args.impls else ["nanoseek", "nanoseek-compiled", "transformers"]
    if args.fp8 and "nanoseek-fp8" not in impls:
        impls.insert(impls.index("nanoseek") + 1 if "nanoseek" in impls else 0, "nanoseek-fp8")
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        p.error(f"unknown implementation(s) {bad}; choose from {', '.join(IMPLS)}")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    args.impl_list = impls
    return args


def make_optimizer(model: torch.nn.Module, device: torch.device, lr: float, precision: str,
                   muon: bool = False) -> tuple[torch.optim.Optimizer, str]:
    if muon:  # nanoseek's own choice of groups: Muon on the hidden matrices, AdamW on the rest
        from nanoseek.train.config import TrainConfig
        from nanoseek.train.optim import build_optimizer

        cfg = TrainConfig(optimizer="muon", lr=lr, precision=precision)  # Newton-Schulz in the step's dtype
        return build_optimizer(model, cfg, device, lr=lr), "muon + adamw"
    params = [p for p in model.parameters() if p.requires_grad]
    for kind, kwargs in (("fused", {"fused": True}), ("foreach", {"foreach": True})):
        try:
            opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1, **kwargs)
            return opt, kind
        except (RuntimeError, TypeError, ValueError):
            continue
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1), "for-loop"


def batches(cfg, n: int, batch: int, seq: int, seed: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        rows = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
        out.append((rows[:, :-1].contiguous().to(device), rows[:, 1:].contiguous().to(device)))
    return out


def run_one(name: str, model: torch.nn.Module, step_loss, data, args, device, amp, compile: bool) -> dict:
    """Warm-up then timed steps of ``step_loss`` (forward + loss) + backward + clip + AdamW (Muon for
    ``nanoseek-muon``).
    ``first_step_s`` is the first step's time (where ``torch.compile`` compiles)."""
    model.train()
    opt, opt_kind = make_optimizer(model, device, args.lr, args.precision, muon=name == "nanoseek-muon")
    forward = torch.compile(model) if compile else model
    times, losses, first = [], [], None
    with PeakMemory(device) as mem:
        for i, (x, y) in enumerate(data):
            with Timer(device) as t:
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    loss = step_loss(forward, x, y)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            first = t.seconds if first is None else first
            if i >= args.warmup:
                times.append(t.seconds)
    step = median(times)
    return {"impl": name, "optimizer": opt_kind, "step_time_median_s": step, "step_times_s": times,
            "tokens_per_s": args.batch_size * args.seq_len / step, "peak_mem_bytes": mem.peak,
            "mem_kind": mem.kind, "loss_first": losses[0], "loss_last": losses[-1], "first_step_s": first}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    amp = autocast_dtype(device, args.precision)
    compute_dtype = amp or torch.float32

    cfg = get_preset(args.preset)
    if not args.mtp:
        cfg = cfg.replace(num_nextn_predict_layers=0)
    if args.seq_len > cfg.max_position_embeddings:
        cfg = cfg.replace(max_position_embeddings=args.seq_len)

    info = header(device)
    if args.peak_tflops is not None:
        peak, peak_source = args.peak_tflops, "--peak-tflops"
    else:
        size = args.peak_size or (4096 if device.type == "cpu" else 8192)
        reps = 2 if device.type == "cpu" else 10
        dname = str(compute_dtype).replace("torch.", "")
        peak = measure_matmul_peak_tflops(device, compute_dtype, size, reps)
        peak_source = f"measured: {dname} {size}^3 matmul, median of {reps}"
    print(f"{info['device']}, precision {'bf16 autocast' if amp else 'float32'}, "
          f"peak {peak:.2f} TFLOP/s ({peak_source})", flush=True)

    from nanoseek.model import DeepSeekV3

    def build_nanoseek() -> torch.nn.Module:
        torch.manual_seed(args.seed)
        return DeepSeekV3(cfg)  # float32 master weights, built on the CPU (device-independent init)

    init_state = {k: v.clone() for k, v in build_nanoseek().state_dict().items()}
    data = batches(cfg, args.warmup + args.steps, args.batch_size, args.seq_len, args.seed + 1, device)

    rows = []
    for name in args.impl_list:
        free_memory(device)
        if name.startswith("nanoseek"):
            model = build_nanoseek()
            model.load_state_dict(init_state)
            model = model.to(device)
            if name == "nanoseek-fp8":
                from nanoseek.fp8_training import convert_to_fp8

                convert_to_fp8(model, ue8m0=args.fp8_ue8m0)
            flops = training_flops_per_token(cfg, args.seq_len, include_mtp=cfg.num_nextn_predict_layers > 0)

            def step_loss(fwd, x, y):
                return fwd(x, labels=y).loss
            from nanoseek.model.moe import _grouped_mm_works

            gmm = "grouped_mm" if _grouped_mm_works(device.type, compute_dtype) else "loop"
            impl_detail = "sdpa attention, experts " + ("fp8 emulation" if name == "nanoseek-fp8" else gmm)
            if name == "nanoseek-compiled" or args.compile:
                impl_detail += ", torch.compile"
        else:
            model, impl = build_transformers_model(cfg, device, init_state)
            flops = training_flops_per_token(cfg.replace(num_nextn_predict_layers=0), args.seq_len)

            def step_loss(fwd, x, y):  # shift_labels: the same targets as nanoseek, no position lost
                return fwd(input_ids=x, labels=y, shift_labels=y).loss
            impl_detail = f"attn {impl['attn']}, experts {impl['experts']}"
        print(f"running {name} ({impl_detail}) ...", flush=True)
        row = run_one(name, model, step_loss, data, args, device, amp, args.compile or name == "nanoseek-compiled")
        row["detail"] = impl_detail
        row["flops_per_token"] = flops
        row["tflops"] = row["tokens_per_s"] * flops / 1e12
        row["mfu"] = row["tflops"] / peak if peak else None
        rows.append(row)
        del model
    free_memory(device)

    ref = next((r for r in rows if r["impl"] == "transformers"), None)
    for r in rows:
        r["ratio_vs_transformers"] = r["tokens_per_s"] / ref["tokens_per_s"] if ref else None
        r["peak_mem_gib"] = r["peak_mem_bytes"] / 2 ** 30
        r["mfu_pct"] = 100 * r["mfu"] if r["mfu"] is not None else None

    mem_label = "peak mem GiB" + (" (alloc)" if device.type == "cuda" else " (RSS)")
    print()
    print(f"train throughput: preset {args.preset}, batch {args.batch_size} x seq {args.seq_len}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, {'bf16 autocast' if amp else 'float32'}"
          f"{', compiled' if args.compile else ''}")
    print(format_table(rows, [("implementation", "impl", ""), ("tokens/s", "tokens_per_s", ",.0f"),
                              ("TFLOP/s", "tflops", ".3f"), ("MFU %", "mfu_pct", ".2f"),
                              (mem_label, "peak_mem_gib", ".2f"), ("x transformers", "ratio_vs_transformers", ".2f"),
                              ("loss first", "loss_first", ".4f"), ("first step s", "first_step_s", ".1f")]))
    payload = {"benchmark": "train_throughput", **info, "preset": args.preset, "batch_size": args.batch_size,
               "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup, "compile": args.compile,
               "precision": "bf16-autocast" if amp else "fp32", "peak_tflops": peak, "peak_source": peak_source,
               "model_config": cfg.to_dict(), "rows": rows}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
