"""Load test for ``nanoseek serve`` (or any OpenAI-compatible server): the metrics of vLLM's
``benchmark_serving``.

N concurrent streaming clients send M requests in all (a fixed prompt set, cycled) with a fixed
``max_tokens``, then report:

* request throughput (completed requests / s) and output token throughput (tokens / s),
* TTFT, time to first token: request sent → first chunk carrying text,
* TPOT, time per output token after the first: (latency − TTFT) / (tokens − 1), per request,
* ITL, inter-token latency: the gaps between successive text chunks, over all requests,
* end-to-end latency,

each as mean / median / p99 (milliseconds), plus the error count. Output tokens are the server's
``usage.completion_tokens`` (``stream_options.include_usage``), or the number of text chunks when
the server sends no usage. ``--ignore-eos`` (a vLLM/nanoseek extension) makes every request
generate exactly ``--max-tokens`` tokens.

Bounded: at most ``--num-requests`` requests and ``--max-duration`` seconds (unfinished requests
are cancelled and counted as errors), a timeout on every request. Only loopback servers
(127.0.0.0/8, ::1, localhost) are accepted unless ``--allow-remote`` is given::

    nanoseek serve --ckpt out/sft --port 8000 &
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --concurrency 16 --num-requests 128 \\
        --max-tokens 128 --ignore-eos --json results.json
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

PROMPTS = (
    "Explain why the sky is blue in two sentences.",
    "Write a short poem about a lighthouse.",
    "What is 17 times 23? Think step by step.",
    "List three uses of a paper clip.",
    "Summarise the plot of a heist movie in one paragraph.",
    "Translate 'good morning, how are you?' into French.",
    "Give me a recipe for a simple tomato soup.",
    "Why do cats purr?",
    "Describe the water cycle to a ten-year-old.",
    "What are the trade-offs between speed and accuracy in a search engine?",
    "Write a haiku about compilers.",
    "If a train leaves at 3pm going 60 km/h, how far has it gone by 5:30pm?",
    "Name four planets and one fact about each.",
    "How does a hash table handle collisions?",
    "Tell me a joke about mathematicians.",
    "What is the capital of Australia, and why is it not Sydney?",
)


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    latency: float = 0.0
    ttft: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    itl: list[float] = field(default_factory=list)


def is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost: not resolved, so not trusted to be local


def _chunk_text(obj: dict) -> str:
    out = []
    for choice in obj.get("choices") or []:
        delta = choice.get("delta")
        if delta is not None:
            out.append(delta.get("content") or "")
            out.append(delta.get("reasoning_content") or "")
        else:
            out.append(choice.get("text") or "")
    return "".join(out)


async def one_request(client, url: str, payload: dict, headers: dict, timeout: float) -> Result:
    res = Result()
    start = time.perf_counter()
    last = None
    chunks = 0
    usage = None
    try:
        async with client.stream("POST", url, json=payload, headers=headers, timeout=timeout) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", "replace")
                res.error = f"HTTP {response.status_code}: {body[:200]}"
                return res
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = f"stream error: {obj['error'].get('message')}"
                    return res
                if obj.get("usage"):
                    usage = obj["usage"]
                if _chunk_text(obj):
                    now = time.perf_counter()
                    if res.ttft is None:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                    chunks += 1
    except Exception as exc:  # timeouts, refused connections, bad JSON: all count as errors
        res.error = f"{type(exc).__name__}: {exc}"
        return res
    res.latency = time.perf_counter() - start
    res.output_tokens = int(usage["completion_tokens"]) if usage else chunks
    res.prompt_tokens = int(usage["prompt_tokens"]) if usage else 0
    res.ok = res.ttft is not None or res.output_tokens == 0
    if not res.ok:
        res.error = "the stream carried no text"
    return res


async def run(args) -> tuple[list[Result], float]:
    import httpx

    base = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.model
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=args.request_timeout) as client:
        if model is None:
            r = await client.get(f"{base}/v1/models", headers=headers, timeout=10)
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        endpoint = f"{base}/v1/chat/completions" if args.endpoint == "chat" else f"{base}/v1/completions"

        def payload(i: int) -> dict:
            prompt = PROMPTS[i % len(PROMPTS)]
            body = {"model": model, "max_tokens": args.max_tokens, "temperature": args.temperature, "stream": True,
                    "stream_options": {"include_usage": True}}
            if args.ignore_eos:
                body["ignore_eos"] = True
            if args.endpoint == "chat":
                body["messages"] = [{"role": "user", "content": prompt}]
            else:
                body["prompt"] = prompt
            return body

        results: list[Result] = []
        counter = iter(range(args.num_requests))

        async def worker() -> None:
            for i in counter:
                results.append(await one_request(client, endpoint, payload(i), headers, args.request_timeout))

        start = time.perf_counter()
        tasks = [asyncio.ensure_future(worker()) for _ in range(args.concurrency)]
        done, pending = await asyncio.wait(tasks, timeout=args.max_duration)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        duration = time.perf_counter() - start
        unfinished = args.num_requests - len(results)
        results += [Result(error="not finished within --max-duration")] * unfinished
        for task in done:
            if task.exception() is not None:
                raise task.exception()
    return results, duration


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None, "p99": None}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, max(0, int(round(0.99 * (len(ordered) - 1)))))]
    return {"mean": statistics.fmean(values) * 1000, "median": statistics.median(values) * 1000, "p99": p99 * 1000}


def summarise(results: list[Result], duration: float, args) -> dict:
    good = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in good)
    in_tokens = sum(r.prompt_tokens for r in good)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in good if r.output_tokens > 1 and r.ttft is not None]
    errors = [r.error for r in results if not r.ok]
    return {
        "url": args.url, "endpoint": args.endpoint, "concurrency": args.concurrency,
        "max_tokens": args.max_tokens, "ignore_eos": args.ignore_eos,
        "num_requests": len(results), "completed": len(good), "errors": len(errors),
        "error_examples": sorted(set(errors))[:5],
        "duration_s": duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(good) / duration if duration > 0 else 0.0,
        "output_token_throughput": out_tokens / duration if duration > 0 else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration > 0 else 0.0,
        "ttft_ms": _stats([r.ttft for r in good if r.ttft is not None]),
        "tpot_ms": _stats(tpot),
        "itl_ms": _stats([gap for r in good for gap in r.itl]),
        "e2el_ms": _stats([r.latency for r in good]),
    }


def format_table(s: dict) -> str:
    def num(x, fmt="{:.2f}"):
        return "n/a" if x is None else fmt.format(x)

    rows = [
        ("Successful requests", str(s["completed"])),
        ("Errors", str(s["errors"])),
        ("Benchmark duration (s)", num(s["duration_s"])),
        ("Concurrency", str(s["concurrency"])),
        ("Total input tokens", str(s["total_input_tokens"])),
        ("Total generated tokens", str(s["total_output_tokens"])),
        ("Request throughput (req/s)", num(s["request_throughput"])),
        ("Output token throughput (tok/s)", num(s["output_token_throughput"])),
        ("Total token throughput (tok/s)", num(s["total_token_throughput"])),
    ]
    lines = ["{:=^56}".format(" Serving Benchmark Result ")]
    lines += [f"{k:<40}{v:>16}" for k, v in rows]
    for key, title in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st token)"),
                       ("itl_ms", "Inter-token Latency"), ("e2el_ms", "End-to-end Latency")):
        lines.append("{:-^56}".format(f" {title} "))
        short = key.split("_")[0].upper()
        for stat in ("mean", "median", "p99"):
            label = f"{stat.capitalize() if stat != 'p99' else 'P99'} {short} (ms)"
            lines.append(f"{label:<40}{num(s[key][stat]):>16}")
    lines.append("=" * 56)
    for example in s["error_examples"]:
        lines.append(f"error: {example}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default http://127.0.0.1:8000)")
    p.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    p.add_argument("--model", default=None, help="model id (default: the first of /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("NANOSEEK_API_KEY"), help="default: $NANOSEEK_API_KEY")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--num-requests", type=int, default=64, help="requests in all (default 64)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="default 0 (greedy)")
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-tokens tokens (extension)")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request (default 120)")
    p.add_argument("--max-duration", type=float, default=600.0, help="seconds for the whole run (default 600)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="write the results as JSON to PATH ('-' or no value: stdout, instead of the table)")
    p.add_argument("--allow-remote", action="store_true", help="allow a server that is not on this machine")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("concurrency", "num_requests", "max_tokens"):
        if getattr(args, name) <= 0:
            print(f"error: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    if args.request_timeout <= 0 or args.max_duration <= 0:
        print("error: --request-timeout and --max-duration must be positive", file=sys.stderr)
        return 2
    if not args.allow_remote and not is_loopback_url(args.url):
        print(f"error: {args.url} is not a loopback address (127.0.0.0/8, ::1, localhost); pass --allow-remote "
              "to load a server on another machine", file=sys.stderr)
        return 2
    args.concurrency = min(args.concurrency, args.num_requests)
    results, duration = asyncio.run(run(args))
    summary = summarise(results, duration, args)
    if args.json is not None and args.json != "-":
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        print(format_table(summary))
    elif args.json == "-":
        print(json.dumps(summary, indent=2))
    else:
        print(format_table(summary))
    return 0 if summary["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
