"""The inference commands' arguments (generate, serve, chat) and ``nanoseek generate``. Importing
this module stays light (no torch, no FastAPI) so that building the CLI parser is fast;
handlers import what they need when they run."""

from __future__ import annotations

import argparse
import sys
import time


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``nanoseek generate``."""
    p.add_argument("--ckpt", required=True, help="checkpoint directory (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--prompt", required=True, help="the prompt text (the user message with --chat)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 means greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1.0: off)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0: off)")
    p.add_argument("--seed", type=int, default=None, help="seed for a reproducible sample")
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--speculative", action="store_true",
                   help="MTP speculative decoding (the checkpoint needs MTP weights)")
    p.add_argument("--device", default="auto", help="auto, cuda, xpu, npu, mps or cpu (default auto)")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="weights and cache dtype (default: the checkpoint's)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="cache length (default: prompt + max tokens)")
    p.add_argument("--stats", action="store_true", help="print engine statistics to stderr at the end")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (CUDA graphs on CUDA; the first request waits for the compile)")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``nanoseek serve``."""
    p.add_argument("--ckpt", required=True, help="checkpoint directory (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* and /metrics (default: $NANOSEEK_API_KEY, "
                        "else none)")
    p.add_argument("--model-name", default=None,
                   help="the model id clients use (default: the checkpoint folder's name)")
    p.add_argument("--max-slots", type=int, default=16, help="requests decoded together (cache slots; default 16)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot; more get a 429 (default 64)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="context per request, prompt + completion (default: the model's, at most 8192; more "
                        "than the model's max_position_embeddings gets a warning)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="HOST",
                   help="also answer requests whose Host header is HOST (any port; repeatable). A loopback "
                        "server answers only to localhost, 127.0.0.1 and [::1] (DNS-rebinding protection); "
                        "'*' answers to any Host")
    p.add_argument("--max-body-mb", type=float, default=4.0,
                   help="largest request body accepted, in MiB; larger ones get a 413 (default 4)")
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding (needs MTP weights)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (CUDA graphs on CUDA; the first request waits for the compile)")
    p.add_argument("--device", default="auto", help="auto, cuda, xpu, npu, mps or cpu (default auto)")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="weights and cache dtype (default: the checkpoint's)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn log level (default info)")


def add_chat_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``nanoseek chat``."""
    p.add_argument("--ckpt", required=True, help="checkpoint directory (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--system", default=None, help="a system prompt for the whole conversation")
    p.add_argument("--temperature", type=float, default=0.7, help="0 means greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1.0: off)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0: off)")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens per reply at most (default 512)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible replies")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="context length: prompt + reply (default: the model's, at most 8192)")
    p.add_argument("--device", default="auto", help="auto, cuda, xpu, npu, mps or cpu (default auto)")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="weights and cache dtype (default: the checkpoint's)")


def generate_main(args: argparse.Namespace) -> int:
    """``nanoseek generate --ckpt DIR --prompt TEXT``: stream one completion to stdout."""
    from ..hf import load_with_tokenizer
    from .engine import Engine
    from .sampling import GenerationError, SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed, stop=list(getattr(args, "stop", []) or []),
                            logprobs=False)
    model, tokenizer = load_with_tokenizer(args.ckpt, getattr(args, "device", "auto"), getattr(args, "dtype", "auto"))
    device = next(model.parameters()).device
    if args.chat:  # the prompt is a user message: text, never a special token
        prompt_ids = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        prompt_ids = tokenizer.encode(args.prompt)
    max_seq_len = getattr(args, "max_seq_len", None) or len(prompt_ids) + params.max_tokens
    if args.speculative and len(model.mtp) == 0:
        raise GenerationError(f"--speculative needs MTP weights; {args.ckpt} has none")
    engine = Engine(model, tokenizer, max_slots=1, max_seq_len=max_seq_len,
                    speculative="mtp" if args.speculative else None, compile=getattr(args, "compile", False))
    engine.add_request(prompt_ids, params)
    start = time.perf_counter()
    reason = None
    while engine.has_unfinished():
        for event in engine.step():
            if event.text:
                sys.stdout.write(event.text)
                sys.stdout.flush()
            if event.finished:
                reason = event.finish_reason
    seconds = time.perf_counter() - start
    sys.stdout.write("\n")
    sys.stdout.flush()
    if getattr(args, "stats", False):
        s = engine.stats
        line = (f"[{s.tokens_generated} tokens in {seconds:.2f}s = {s.tokens_generated / max(seconds, 1e-9):.1f} "
                f"tokens/s, finish_reason={reason}, device={device}, cache {s.cache_bytes_per_token} bytes/token")
        if s.acceptance_rate is not None:
            line += f", MTP acceptance {s.acceptance_rate:.1%}, {s.tokens_per_forward:.2f} tokens/forward"
        print(line + "]", file=sys.stderr)
    return 0
