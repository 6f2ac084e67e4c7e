"""Greedy decode throughput: nanoseek's Engine (eager, compiled, MTP speculation) vs ``transformers``.

Both hold the SAME weights (transformers gets nanoseek's state dict), in bf16 on accelerators and
float32 on the CPU. For each batch size B: B prompts, greedy decoding of exactly N new tokens (EOS
ignored), timed end to end — prefill plus N decode steps, device synchronised — after warm-up runs
(which is where ``torch.compile`` compiles; the first warm-up's time is reported as ``first s``);
tokens/s = B × N / median time.

Prompts: ``--ckpt DIR --task NAME[:D]`` decodes a trained checkpoint on real task prompts in its chat
form (so the MTP module's acceptance rate means something); otherwise ``--preset`` builds a model
with random weights and random prompts of ``--prompt-len`` tokens (acceptance is then meaningless).

Rows (``--impls``, default all that apply):

* ``nanoseek``: :class:`nanoseek.infer.Engine` (latent MLA cache, absorbed attention), eager;
* ``nanoseek-compiled``: the same engine with its decode step through ``torch.compile``
  (inductor on the CPU, CUDA graphs on CUDA);
* ``nanoseek-mtp`` / ``nanoseek-mtp-compiled``: drafting with MTP module 0 (when the model has one;
  ``--mtp`` adds a random one to presets without);
* ``transformers``: ``DeepseekV3ForCausalLM.generate`` with sdpa attention, grouped_mm experts and a
  static cache (transformers compiles the decode step itself on CUDA; ``--hf-cache dynamic`` and
  ``--hf-no-compile`` turn these off). Batches of prompts of unequal length are left-padded.

``token_match`` is the fraction of generated tokens equal to transformers' (same weights: 1.0 in
float32 up to near-ties; bf16 rounding may let long greedy runs drift apart); ``match_plain`` the
fraction equal to the eager nanoseek row (speculation and compilation must not change greedy tokens).

    python benchmarks/decode.py --ckpt runs/speedrun/final --task arithmetic:2 --batch-sizes 1,16
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
CKPT_DEFAULTS = (110, "1,16")  # new tokens, batch sizes for --ckpt
IMPLS = ("nanoseek", "nanoseek-compiled", "nanoseek-mtp", "nanoseek-mtp-compiled", "transformers")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="a trained checkpoint directory (with its tokenizer)")
    p.add_argument("--task", default=None,
                   help="with --ckpt: the task whose prompts to decode, NAME or NAME:DIFFICULTY")
    p.add_argument("--preset", default="bench", choices=sorted(DEFAULTS), help="without --ckpt: random weights")
    p.add_argument("--prompt-len", type=int, default=None, help="P (default: bench 128, small 64, tiny 16)")
    p.add_argument("--new-tokens", type=int, default=None,
                   help="N (default: --ckpt 110, bench 128, small 32, tiny 8)")
    p.add_argument("--batch-sizes", default=None,
                   help="comma list (default: --ckpt 1,16, bench 1,32, small 1,8, tiny 1,4)")
    p.add_argument("--impls", default=None, help=f"comma list of {', '.join(IMPLS)} (default: all that apply)")
    p.add_argument("--steps", type=int, default=3, help="timed generate() calls per batch size (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed generate() calls first")
    p.add_argument("--mtp", action="store_true", help="give presets without MTP one module (for the MTP rows)")
    p.add_argument("--hf-cache", default="static", choices=["static", "dynamic"])
    p.add_argument("--hf-no-compile", action="store_true", help="stop generate() from compiling the static-cache step")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if (args.ckpt is None) != (args.task is None):
        p.error("--ckpt and --task go together")
    if args.ckpt:
        new, sizes = CKPT_DEFAULTS
    else:
        prompt, new, sizes = DEFAULTS[args.preset]
        args.prompt_len = args.prompt_len or prompt
    args.new_tokens = args.new_tokens or new
    try:
        args.batch_list = [int(b) for b in (args.batch_sizes or sizes).split(",")]
    except ValueError:
        p.error(f"--batch-sizes must be a comma list of integers, got {args.batch_sizes!r}")
    if any(b < 1 for b in args.batch_list) or args.steps < 1 or args.warmup < 0:
        p.error("batch sizes and --steps must be >= 1, --warmup >= 0")
    args.impl_list = args.impls.split(",") if args.impls else list(IMPLS)
    unknown = sorted(set(args.impl_list) - set(IMPLS))
    if unknown:
        p.error(f"--impls: unknown {', '.join(unknown)} (choose from {', '.join(IMPLS)})")
    if args.skip_transformers and "transformers" in args.impl_list:
        args.impl_list.remove("transformers")
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


def load_workload(args, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer or None, prompts [B_max lists of ids], description): a checkpoint on task
    prompts, or a preset with random weights on random prompts."""
    from nanoseek import load_with_tokenizer
    from nanoseek.model import DeepSeekV3

    n_prompts = max(args.batch_list)
    if args.ckpt:
        from nanoseek.tasks import get_task
        from nanoseek.tasks.base import parse_task_spec
        from nanoseek.tasks.evaluate import chat_prompt

        model, tok = load_with_tokenizer(args.ckpt, device=device, dtype=dtype)
        name, difficulty = parse_task_spec(args.task, "--task")
        problems = get_task(name).generate(args.seed + 10_000, n_prompts, difficulty or 1)
        prompts = [tok.encode(chat_prompt(tok, p)) for p in problems]
        return model.eval(), tok, prompts, f"checkpoint {args.ckpt}, task {args.task}"
    cfg = get_preset(args.preset)
    if args.mtp and cfg.num_nextn_predict_layers == 0:
        cfg = cfg.replace(num_nextn_predict_layers=1)
    total = args.prompt_len + args.new_tokens
    if total + 2 > cfg.max_position_embeddings:
        cfg = cfg.replace(max_position_embeddings=total + 2)
    torch.manual_seed(args.seed)
    model = DeepSeekV3(cfg).eval()
    g = torch.Generator().manual_seed(args.seed + 1)
    prompts = torch.randint(2, cfg.vocab_size, (n_prompts, args.prompt_len), generator=g).tolist()
    return model, None, prompts, f"preset {args.preset} (random weights), prompt {args.prompt_len} tokens"


def run_nanoseek(name: str, model, tok, prompts, args, device, dtype) -> tuple[list[dict], dict]:
    """Rows of one engine configuration over the batch sizes, and its tokens per batch size."""
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True, logprobs=False)
    max_len = max(len(p) for p in prompts) + args.new_tokens + 2
    engine = Engine(model, tok, max_slots=max(args.batch_list), max_seq_len=max_len, device=device, dtype=dtype,
                    speculative="mtp" if "mtp" in name else None, compile=name.endswith("compiled"))
    rows, tokens = [], {}
    for b in args.batch_list:
        batch = prompts[:b]
        free_memory(device)
        with Timer(device) as first:
            engine.generate(batch, params)
        engine.reset_stats()
        with PeakMemory(device) as mem:
            times, done = time_runs(lambda: engine.generate(batch, params), max(args.warmup - 1, 0), args.steps, device)
        tokens[b] = torch.tensor([c.token_ids for c in done])
        stats = engine.stats
        rows.append({"impl": name, "batch": b, "time_median_s": median(times), "times_s": times,
                     "first_s": first.seconds, "tokens_per_s": b * args.new_tokens / median(times),
                     "peak_mem_bytes": mem.peak, "mem_kind": mem.kind, "acceptance_rate": stats.acceptance_rate,
                     "tokens_per_forward": stats.tokens_per_forward,
                     "compiled": engine.decode_step.compiled if name.endswith("compiled") else None})
        print(f"  {name:<22} batch {b:>3}: {rows[-1]['tokens_per_s']:,.1f} tokens/s "
              f"(first call {first.seconds:.1f} s)", flush=True)
    return rows, tokens


def run_transformers(model, prompts, args, device, dtype) -> tuple[list[dict], dict]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hf, impl = build_transformers_model(model.config, device, state, dtype=dtype)
    hf.eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    if args.hf_no_compile:
        hf.generation_config.disable_compile = True
    rows, tokens = [], {}
    for b in args.batch_list:
        batch = prompts[:b]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=device)  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        kwargs = dict(attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False)
        if args.hf_cache == "static":
            kwargs["cache_implementation"] = "static"

        def gen():
            with torch.no_grad():
                return hf.generate(ids, **kwargs)

        with Timer(device) as first:
            gen()
        with PeakMemory(device) as mem:
            times, out = time_runs(gen, max(args.warmup - 1, 0), args.steps, device)
        tokens[b] = out[:, width:].cpu()
        rows.append({"impl": "transformers", "batch": b, "time_median_s": median(times), "times_s": times,
                     "first_s": first.seconds, "tokens_per_s": b * args.new_tokens / median(times),
                     "peak_mem_bytes": mem.peak, "mem_kind": mem.kind,
                     "detail": f"attn {impl['attn']}, experts {impl['experts']}, {args.hf_cache} cache"})
        print(f"  {'transformers':<22} batch {b:>3}: {rows[-1]['tokens_per_s']:,.1f} tokens/s", flush=True)
    return rows, tokens


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.device)
    # float32 on the CPU, as the engine serves there (training's auto precision may pick bf16 on some CPUs)
    dtype = torch.float32 if device.type == "cpu" else autocast_dtype(device) or torch.float32
    info = header(device)
    model, tok, prompts, workload = load_workload(args, device, dtype)
    has_mtp = len(model.mtp) > 0
    impls = [i for i in args.impl_list if has_mtp or "mtp" not in i]
    if len(impls) < len(args.impl_list):
        print("note: the model has no MTP module (a preset takes --mtp); skipping the MTP rows")
    print(f"{info['device']}, {str(dtype).replace('torch.', '')} weights; {workload}", flush=True)

    rows, outputs = [], {}
    for name in impls:
        got, tokens = (run_transformers(model, prompts, args, device, dtype) if name == "transformers"
                       else run_nanoseek(name, model, tok, prompts, args, device, dtype))
        rows += got
        outputs.update({(name, b): t for b, t in tokens.items()})
        free_memory(device)

    for r in rows:
        ref = next((x for x in rows if x["impl"] == "transformers" and x["batch"] == r["batch"]), None)
        r["ratio_vs_transformers"] = r["tokens_per_s"] / ref["tokens_per_s"] if ref else None
        plain = next((x for x in rows if x["impl"] == "nanoseek" and x["batch"] == r["batch"]), None)
        r["ratio_vs_plain"] = r["tokens_per_s"] / plain["tokens_per_s"] if plain else None
        mine = outputs[(r["impl"], r["batch"])]
        for key, other in (("token_match", "transformers"), ("match_plain", "nanoseek")):
            theirs = outputs.get((other, r["batch"]))
            r[key] = (mine == theirs).float().mean().item() if theirs is not None else None
        r["peak_mem_gib"] = r["peak_mem_bytes"] / 2 ** 30
    rows.sort(key=lambda r: (r["batch"], IMPLS.index(r["impl"])))

    print()
    print(f"greedy decode: {workload}, {args.new_tokens} new tokens, {str(dtype).replace('torch.', '')}, "
          f"median of {args.steps} after {args.warmup} warm-up")
    mem_label = "peak mem GiB" + (" (alloc)" if device.type == "cuda" else " (RSS)")
    print(format_table(rows, [("implementation", "impl", ""), ("batch", "batch", "d"),
                              ("tokens/s", "tokens_per_s", ",.1f"), ("x transformers", "ratio_vs_transformers", ".2f"),
                              ("x plain", "ratio_vs_plain", ".2f"), ("token match", "token_match", ".3f"),
                              ("match plain", "match_plain", ".3f"), ("MTP accept", "acceptance_rate", ".2f"),
                              ("first s", "first_s", ".1f"), (mem_label, "peak_mem_gib", ".2f")]))
    payload = {"benchmark": "decode", **info, "workload": workload, "ckpt": args.ckpt, "task": args.task,
               "preset": None if args.ckpt else args.preset, "prompt_lens": [len(p) for p in prompts],
               "new_tokens": args.new_tokens, "batch_sizes": args.batch_list, "steps": args.steps,
               "warmup": args.warmup, "dtype": str(dtype).replace("torch.", ""), "hf_cache": args.hf_cache,
               "model_config": model.config.to_dict(), "rows": rows}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
