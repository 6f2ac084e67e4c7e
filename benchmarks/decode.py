"""Greedy decode throughput: nanoseek's Engine vs ``transformers``' ``generate``, one process.

Both hold the SAME weights (transformers gets nanoseek's state dict), in bf16 on accelerators and
float32 on the CPU. For each batch size B: B random prompts of P tokens, greedy decoding of exactly
N new tokens (EOS ignored), timed end to end — prefill of the prompts plus N decode steps, device
synchronised — after warm-up runs; tokens/s = B × N / median time. Rows:

* ``nanoseek``: :class:`nanoseek.infer.Engine` (latent MLA cache, absorbed attention, B cache slots),
* ``nanoseek-mtp`` (``--speculative``, when the model has MTP modules; ``--mtp`` adds one to presets
  without): the same engine drafting with MTP module 0. With random weights the acceptance rate is
  meaningless; it is reported so trained checkpoints can be compared,
* ``transformers``: ``DeepseekV3ForCausalLM.generate`` with sdpa attention, grouped_mm experts and a
  static cache (transformers then compiles the decode step itself on CUDA; ``--hf-cache dynamic`` and
  ``--hf-no-compile`` turn these off).

``token_match`` is the fraction of generated tokens equal to transformers' (same weights: 1.0 in
float32; bf16 rounding may let long greedy runs drift apart).

    python benchmarks/decode.py --preset bench --prompt-len 128 --new-tokens 128 --batch-sizes 1,32 \\
        --json results/decode_bench.json
    python benchmarks/decode.py --preset tiny --steps 2 --warmup 1 --device cpu   # smoke
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
    median,
    write_json,
)
from nanoseek.config import get_preset  # noqa: E402
from nanoseek.device import autocast_dtype, pick_device  # noqa: E402

DEFAULTS = {"tiny": (16, 8, "1,4"), "small": (64, 32, "1,8"), "bench": (128, 128, "1,32")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench", choices=sorted(DEFAULTS))
    p.add_argument("--prompt-len", type=int, default=None, help="P (default: bench 128, small 64, tiny 16)")
    p.add_argument("--new-tokens", type=int, default=None, help="N (default: bench 128, small 32, tiny 8)")
    p.add_argument("--batch-sizes", default=None, help="comma list (default: bench 1,32, small 1,8, tiny 1,4)")
    p.add_argument("--steps", type=int, default=3, help="timed generate() calls per batch size (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed generate() calls first")
    p.add_argument("--speculative", action="store_true", help="add the MTP speculative-decoding row")
    p.add_argument("--mtp", action="store_true", help="give presets without MTP one module (for --speculative)")
    p.add_argument("--hf-cache", default="static", choices=["static", "dynamic"])
    p.add_argument("--hf-no-compile", action="store_true", help="stop generate() from compiling the static-cache step")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    prompt, new, sizes = DEFAULTS[args.preset]
    args.prompt_len = args.prompt_len or prompt
    args.new_tokens = args.new_tokens or new
    try:
        args.batch_list = [int(b) for b in (args.batch_sizes or sizes).split(",")]
    except ValueError:
        p.error(f"--batch-sizes must be a comma list of integers, got {args.batch_sizes!r}")
    if any(b < 1 for b in args.batch_list) or args.steps < 1 or args.warmup < 0:
        p.error("batch sizes and --steps must be >= 1, --warmup >= 0")
    return args


def time_runs(fn, n_warm: int, n_timed: int, device: torch.device) -> tuple[list[float], object]:
    for _ in range(n_warm):
        fn()
    times, out = [], None
    for _ in range(n_timed):
        with Timer(device) as t:
            out = fn()
        times.append(t.seconds)
    return times, out


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.device)
    dtype = autocast_dtype(device) or torch.float32
    cfg = get_preset(args.preset)
    if args.mtp and cfg.num_nextn_predict_layers == 0:
        cfg = cfg.replace(num_nextn_predict_layers=1)
    total_len = args.prompt_len + args.new_tokens
    if total_len + 2 > cfg.max_position_embeddings:
        cfg = cfg.replace(max_position_embeddings=total_len + 2)
    speculative = args.speculative and cfg.num_nextn_predict_layers > 0
    if args.speculative and not speculative:
        print(f"note: preset {args.preset} has no MTP module; pass --mtp to add one. Skipping --speculative.")

    info = header(device)
    print(f"{info['device']}, {str(dtype).replace('torch.', '')} weights", flush=True)

    from nanoseek.infer.engine import Engine
    from nanoseek.infer.sampling import SamplingParams
    from nanoseek.model import DeepSeekV3

    torch.manual_seed(args.seed)
    model = DeepSeekV3(cfg).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(args.seed + 1)
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True, logprobs=False)

    impls = ["nanoseek"] + (["nanoseek-mtp"] if speculative else [])
    rows, outputs = [], {}
    for b in args.batch_list:
        prompts = torch.randint(2, cfg.vocab_size, (b, args.prompt_len), generator=g)
        for name in impls:
            free_memory(device)
            engine = Engine(model, max_slots=b, max_seq_len=total_len + 2, device=device, dtype=dtype,
                             speculative="mtp" if name == "nanoseek-mtp" else None)
            prompt_lists = prompts.tolist()
            with PeakMemory(device) as mem:
                times, done = time_runs(lambda: engine.generate(prompt_lists, params), args.warmup, args.steps, device)
            tokens = torch.tensor([c.token_ids for c in done])
            assert tokens.shape == (b, args.new_tokens), tokens.shape
            outputs[(name, b)] = tokens
            stats = engine.stats  # counters over all runs; the two reported are ratios
            rows.append({"impl": name, "batch": b, "time_median_s": median(times), "times_s": times,
                         "tokens_per_s": b * args.new_tokens / median(times), "peak_mem_bytes": mem.peak,
                         "mem_kind": mem.kind, "acceptance_rate": stats.acceptance_rate,
                         "tokens_per_forward": stats.tokens_per_forward})
            print(f"  {name:<13} batch {b:>3}: {rows[-1]['tokens_per_s']:,.1f} tokens/s", flush=True)
            del engine

    if not args.skip_transformers:
        del model
        free_memory(device)
        hf, impl = build_transformers_model(cfg, device, state, dtype=dtype)
        hf.eval()
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = 0
        if args.hf_no_compile:
            hf.generation_config.disable_compile = True
        g = torch.Generator().manual_seed(args.seed + 1)  # the same prompts again
        for b in args.batch_list:
            prompts = torch.randint(2, cfg.vocab_size, (b, args.prompt_len), generator=g).to(device)
            mask = torch.ones_like(prompts)
            kwargs = dict(attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False)
            if args.hf_cache == "static":
                kwargs["cache_implementation"] = "static"

            def gen():
                with torch.no_grad():
                    return hf.generate(prompts, **kwargs)

            with PeakMemory(device) as mem:
                times, out = time_runs(gen, args.warmup, args.steps, device)
            tokens = out[:, args.prompt_len:].cpu()
            assert tokens.shape == (b, args.new_tokens), tokens.shape
            outputs[("transformers", b)] = tokens
            rows.append({"impl": "transformers", "batch": b, "time_median_s": median(times), "times_s": times,
                         "tokens_per_s": b * args.new_tokens / median(times), "peak_mem_bytes": mem.peak,
                         "mem_kind": mem.kind, "detail": f"attn {impl['attn']}, experts {impl['experts']}, "
                                                         f"{args.hf_cache} cache"})
            print(f"  {'transformers':<13} batch {b:>3}: {rows[-1]['tokens_per_s']:,.1f} tokens/s", flush=True)
        del hf
        free_memory(device)

    for r in rows:
        ref = next((x for x in rows if x["impl"] == "transformers" and x["batch"] == r["batch"]), None)
        r["ratio_vs_transformers"] = r["tokens_per_s"] / ref["tokens_per_s"] if ref else None
        ref_tokens = outputs.get(("transformers", r["batch"]))
        if ref_tokens is not None:
            r["token_match"] = (outputs[(r["impl"], r["batch"])] == ref_tokens).float().mean().item()
        r["peak_mem_gib"] = r["peak_mem_bytes"] / 2 ** 30
    rows.sort(key=lambda r: (r["batch"], r["impl"] == "transformers", r["impl"]))

    print()
    print(f"greedy decode: preset {args.preset}, prompt {args.prompt_len} + {args.new_tokens} new tokens, "
          f"{str(dtype).replace('torch.', '')}, median of {args.steps} after {args.warmup} warm-up")
    mem_label = "peak mem GiB" + (" (alloc)" if device.type == "cuda" else " (RSS)")
    print(format_table(rows, [("implementation", "impl", ""), ("batch", "batch", "d"),
                              ("tokens/s", "tokens_per_s", ",.1f"), ("x transformers", "ratio_vs_transformers", ".2f"),
                              ("token match", "token_match", ".3f"), ("MTP accept", "acceptance_rate", ".2f"),
                              (mem_label, "peak_mem_gib", ".2f")]))
    payload = {"benchmark": "decode", **info, "preset": args.preset, "prompt_len": args.prompt_len,
               "new_tokens": args.new_tokens, "batch_sizes": args.batch_list, "steps": args.steps,
               "warmup": args.warmup, "dtype": str(dtype).replace("torch.", ""), "hf_cache": args.hf_cache,
               "model_config": cfg.to_dict(), "rows": rows}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
