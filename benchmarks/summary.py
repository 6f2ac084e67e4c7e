"""Print one table of a benchmark directory's results against the issue-15 targets.

Reads ``train.json`` (train_throughput.py), ``decode.json`` (decode.py) and the ``*.status.json``
files that ``gpu_check.sh`` writes, whichever exist; prints what each part measured as ratios next
to its target (on GPUs the anchors of benchmarks/RESULTS.md, "Targets"; on a CPU those of issue 15).

    python benchmarks/summary.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import format_table  # noqa: E402

#: (what, target on a GPU, target on the CPU); None: no target there
TARGETS = {
    "train: best nanoseek / transformers": (2.6, 1.6),
    "train: FP8 / bf16 nanoseek": (1.3, None),
    "decode batch 1: best nanoseek / transformers": (25.0, 3.0),
    "decode batch 32: best nanoseek / transformers": (10.0, None),
    "decode batch 1: MTP / plain": (1.5, 1.7),
}


def best(rows: list[dict], prefix: str, **match) -> dict | None:
    """The fastest row whose implementation starts with ``prefix`` among rows matching ``match``."""
    pool = [r for r in rows if r["impl"].startswith(prefix) and all(r.get(k) == v for k, v in match.items())]
    return max(pool, key=lambda r: r["tokens_per_s"], default=None)


def ratio(a: dict | None, b: dict | None) -> float | None:
    return a["tokens_per_s"] / b["tokens_per_s"] if a and b else None


def measured(out: Path) -> list[dict]:
    lines: list[dict] = []
    on_gpu = False
    train_path, decode_path = out / "train.json", out / "decode.json"
    if train_path.is_file():
        train = json.loads(train_path.read_text())
        on_gpu = on_gpu or train["device"].startswith("cuda")
        rows = train["rows"]
        hf = best(rows, "transformers")
        nano = max((r for r in rows if r["impl"] in ("nanoseek", "nanoseek-compiled")),
                   key=lambda r: r["tokens_per_s"], default=None)
        fp8 = best(rows, "nanoseek-fp8")
        plain = best(rows, "nanoseek", impl="nanoseek")
        lines.append({"what": "train: best nanoseek / transformers", "value": ratio(nano, hf),
                      "detail": f"{nano['impl']}, MFU {100 * (nano.get('mfu') or 0):.1f}%, "
                                f"memory x{nano['peak_mem_bytes'] / max(hf['peak_mem_bytes'], 1):.2f}"
                      if nano and hf else ""})
        loss = (f"loss last {fp8['loss_last']:.4f} vs {plain['loss_last']:.4f}" if fp8 and plain else "")
        lines.append({"what": "train: FP8 / bf16 nanoseek", "value": ratio(fp8, plain), "detail": loss})
    if decode_path.is_file():
        decode = json.loads(decode_path.read_text())
        on_gpu = on_gpu or decode["device"].startswith("cuda")
        rows = decode["rows"]
        for b in decode["batch_sizes"]:
            nano = max((r for r in rows if r["batch"] == b and r["impl"].startswith("nanoseek")),
                       key=lambda r: r["tokens_per_s"], default=None)
            hf = best(rows, "transformers", batch=b)
            lines.append({"what": f"decode batch {b}: best nanoseek / transformers", "value": ratio(nano, hf),
                          "detail": f"{nano['impl']}, token match {nano.get('token_match')}" if nano else ""})
        mtp = max((r for r in rows if r["batch"] == 1 and "mtp" in r["impl"]), key=lambda r: r["tokens_per_s"],
                  default=None)
        plain = max((r for r in rows if r["batch"] == 1 and r["impl"] in ("nanoseek", "nanoseek-compiled")),
                    key=lambda r: r["tokens_per_s"], default=None)
        lines.append({"what": "decode batch 1: MTP / plain", "value": ratio(mtp, plain),
                      "detail": f"acceptance {mtp['acceptance_rate']:.2f}" if mtp and mtp.get("acceptance_rate")
                      is not None else ""})
    for line in lines:
        gpu, cpu = TARGETS.get(line["what"], (None, None))
        line["target"] = gpu if on_gpu else cpu
        line["met"] = None if line["target"] is None or line["value"] is None else (
            "yes" if line["value"] >= line["target"] else "NO")
    return lines


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__)
        return 2
    out = Path(args[0])
    for status in sorted(out.glob("*.status.json")):
        s = json.loads(status.read_text())
        print(f"{s['part']:<8} exit {s['exit_code']} in {s['seconds']} s")
    lines = measured(out)
    if not lines:
        print(f"no train.json or decode.json in {out}")
        return 1
    print()
    print(format_table(lines, [("measured", "what", ""), ("ratio", "value", ".2f"), ("target", "target", ".1f"),
                               ("met", "met", ""), ("detail", "detail", "")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
