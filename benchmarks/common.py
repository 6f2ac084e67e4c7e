"""Shared helpers of the nanoseek-vs-transformers benchmarks (train_throughput.py, decode.py).

Timing follows /work/.library/device/METHOD.md: warm-up first, device synchronisation around every
timed region, the median of several repetitions, random (never all-zero) inputs.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from nanoseek.device import device_name, synchronize

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """Short commit of the working tree (``+dirty`` when it has uncommitted changes), or ``unknown``."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])


def header(device: torch.device) -> dict:
    """The provenance every result carries: date, device, commit, command, versions."""
    import transformers

    return {
        "date": datetime.date.today().isoformat(),
        "device": f"{device} ({device_name(device)})",
        "cpu_threads": torch.get_num_threads(),
        "commit": git_commit(),
        "command": command_line(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


# ----------------------------------------------------------------------------- timing
class Timer:
    """Host clock around a device-synchronised region."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> Timer:
        synchronize(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self.t0


def median(values: list[float]) -> float:
    return statistics.median(values)


def measure_matmul_peak_tflops(device: torch.device, dtype: torch.dtype, size: int, reps: int) -> float:
    """TFLOP/s of a ``size``³ matmul in ``dtype`` (median of ``reps`` after a warm-up), as the MFU peak.

    Random inputs; three input pairs rotate so repeated runs do not just re-read one cached buffer.
    """
    g = torch.Generator(device="cpu").manual_seed(0)
    pairs = [(torch.randn(size, size, generator=g).to(device, dtype), torch.randn(size, size, generator=g).to(device, dtype))
             for _ in range(3 if device.type != "cpu" else 1)]
    warm = torch.randn(min(size, 1024), min(size, 1024), generator=g).to(device, dtype)
    for _ in range(3):  # library load, handle creation, clock ramp
        warm @ warm
    pairs[0][0] @ pairs[0][1]
    times = []
    for i in range(reps):
        a, b = pairs[i % len(pairs)]
        with Timer(device) as t:
            a @ b
        times.append(t.seconds)
    del pairs
    return 2.0 * size ** 3 / median(times) / 1e12


# ----------------------------------------------------------------------------- memory
def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory of the region: ``torch.cuda.max_memory_allocated`` on CUDA; elsewhere the process's
    resident set size sampled every 5 ms by a thread (the whole process: Python, torch and whatever
    else is alive, so compare rows of one run, not across runs)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "process_rss_sampled"
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._stop = threading.Event()
            self.peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- output
def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """``columns`` = (header, key, format spec); missing values print as ``-``."""
    cells = [[h for h, _, _ in columns]]
    for r in rows:
        line = []
        for _, key, fmt in columns:
            v = r.get(key)
            line.append("-" if v is None else format(v, fmt))
        cells.append(line)
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    out = []
    for n, row in enumerate(cells):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def hf_config(cfg):
    """``transformers.DeepseekV3Config`` for a nanoseek :class:`~nanoseek.config.ModelConfig`."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(**cfg.to_hf_dict())


def build_transformers_model(cfg, device: torch.device, state: dict, dtype: torch.dtype = torch.float32):
    """``DeepseekV3ForCausalLM`` with sdpa attention and grouped_mm experts where this transformers has
    them, holding the SAME weights as the nanoseek model whose ``state`` dict is given (MTP keys are
    dropped: transformers has no MTP modules). Returns (model, {"attn": ..., "experts": ...})."""
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": "sdpa"}
    try:
        model = AutoModelForCausalLM.from_config(hf_config(cfg), experts_implementation="grouped_mm", **kwargs)
    except (TypeError, ValueError):  # an older transformers without the experts switch
        model = AutoModelForCausalLM.from_config(hf_config(cfg), **kwargs)
    hub_state = {k: v for k, v in state.items() if not k.startswith("mtp.")}
    missing, unexpected = model.load_state_dict(hub_state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"transformers model does not match nanoseek's parameters: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    model = model.to(device=device, dtype=dtype)
    impl = {"attn": getattr(model.config, "_attn_implementation", None),
            "experts": getattr(model.config, "_experts_implementation", "eager (no switch)")}
    return model, impl
