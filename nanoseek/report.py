"""The report card of a run: what it cost, how it trained, what went wrong, in ``report.md`` + plots.

``write_report(run_dir)`` reads what the training stages leave in a run directory:

- ``metrics.jsonl``: one JSON object per line with ``stage``, ``step`` and any of the metric keys in
  :data:`METRIC_KEYS` (required);
- ``incidents.jsonl``: the training guard's incidents (optional);
- ``cost.json``: the cost meters' device-hours, tokens and dollars per stage (optional);
- ``summary.json``: held-out results per stage (optional, rendered as a table).

Malformed lines are skipped and counted, never fatal: a report of a run still being written has a
half-written last line. Plots use matplotlib's Agg canvas directly, so no global backend is touched.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .errors import NanoseekError

METRIC_KEYS = ("loss", "lm_loss", "mtp_loss", "aux_loss", "val_loss", "lr", "grad_norm", "tokens_per_s",
               "mfu", "expert_load_max_over_mean", "dead_experts", "reward", "accuracy", "format_rate",
               "kl", "entropy", "response_length")
LOSS_KEYS = ("loss", "lm_loss", "mtp_loss", "val_loss")      # best = lowest
SCORE_KEYS = ("reward", "accuracy", "format_rate")           # best = highest
RL_KEYS = ("reward", "accuracy", "format_rate", "kl", "entropy", "response_length")
STAGE_ORDER = ("pretrain", "extend", "sft", "cold_start", "grpo", "rl", "distill", "eval")

# DeepSeek-V3 technical report (arXiv 2412.19437), Table 1: H800 GPU-hours at $2 per GPU-hour.
V3_COSTS = (("Pre-training", 2664e3, 5.328e6), ("Context extension", 119e3, 0.238e6),
            ("Post-training", 5e3, 0.01e6))
V3_TOTAL = (2788e3, 5.576e6)
V3_HOURS_PER_TRILLION_TOKENS = 180e3
MAX_POINTS = 5000  # per plotted series; longer ones are thinned evenly (the last point is kept)


# --------------------------------------------------------------------------- reading
def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The JSON objects of a file, one per line, and the number of malformed lines skipped."""
    records, bad = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if not isinstance(obj, dict):
                bad += 1
                continue
            records.append(obj)
    return records, bad


def _read_json(path: Path) -> tuple[Any, str | None]:
    if not path.exists():
        return None, None
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except (OSError, ValueError) as exc:
        return None, f"{path.name} is unreadable ({exc.__class__.__name__}: {exc})"


class Series:
    """The values of one metric in one stage, by step."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.values: list[float] = []

    def add(self, step: float, value: float) -> None:
        self.steps.append(step)
        self.values.append(float(value))

    def finite(self) -> list[tuple[float, float]]:
        return [(s, v) for s, v in zip(self.steps, self.values) if math.isfinite(v)]

    def final(self) -> tuple[float, float] | None:
        pts = self.finite()
        return pts[-1] if pts else None

    def best(self, highest: bool = False) -> tuple[float, float] | None:
        pts = self.finite()
        if not pts:
            return None
        return (max if highest else min)(pts, key=lambda p: p[1])

    def thinned(self) -> tuple[list[float], list[float]]:
        n = len(self.steps)
        if n <= MAX_POINTS:
            return self.steps, self.values
        idx = sorted({round(i * (n - 1) / (MAX_POINTS - 1)) for i in range(MAX_POINTS)})
        return [self.steps[i] for i in idx], [self.values[i] for i in idx]


def _load_metrics(path: Path) -> tuple[dict[str, dict[str, Series]], int, int]:
    """{stage: {key: Series}}, stages in order of first appearance; records kept; malformed lines."""
    records, bad = _read_jsonl(path)
    data: dict[str, dict[str, Series]] = {}
    kept = 0
    for rec in records:
        step = rec.get("step")
        if not _is_number(step) or not math.isfinite(step):
            bad += 1
            continue
        stage = str(rec.get("stage") or "train")
        series = data.setdefault(stage, {})
        kept += 1
        for key in METRIC_KEYS:
            value = rec.get(key)
            if _is_number(value):
                series.setdefault(key, Series()).add(step, value)
    return data, kept, bad


# --------------------------------------------------------------------------- formatting
def _hours(x: float) -> str:
    return f"{x:,.1f}" if x >= 100 else f"{x:.4f}"


def _usd(x: float) -> str:
    return f"{x:,.2f}" if x >= 100 else f"{x:.4f}"


def _num(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, int):
        return f"{x:,}" if abs(x) >= 10000 else str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return f"{x:.4f}" if 1e-3 <= abs(x) < 1e4 else f"{x:.4g}"
    if isinstance(x, str):
        return x
    return json.dumps(x, separators=(",", ":"))[:80]


def _step(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _stage_sort(stages: list[str]) -> list[str]:
    rank = {s: i for i, s in enumerate(STAGE_ORDER)}
    return sorted(stages, key=lambda s: (rank.get(s, len(STAGE_ORDER)), stages.index(s)))


# --------------------------------------------------------------------------- plots
def _figure(n_panels: int, ncols: int | None = None):
    ncols = ncols or min(n_panels, 2)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(6.0 * ncols, 3.8 * nrows), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n_panels)]
    return fig, axes


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


def _plot_by_stage(data, keys: tuple[str, ...], titles: dict[str, str], path: Path,
                   log_keys: tuple[str, ...] = ()) -> bool:
    """One panel per key present, one line per stage; False (no file) when no key is present."""
    present = [k for k in keys if any(k in s for s in data.values())]
    if not present:
        return False
    fig, axes = _figure(len(present), ncols=min(len(present), 3))
    for ax, key in zip(axes, present):
        for stage, series in data.items():
            if key in series:
                steps, values = series[key].thinned()
                ax.plot(steps, values, label=stage, marker="o" if len(steps) < 30 else None, ms=3)
        if key in log_keys and any(v > 0 for s in data.values() if key in s for v in s[key].values):
            ax.set_yscale("log")
        ax.set_title(titles.get(key, key))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(data) > 1:
            ax.legend(fontsize=8)
    _save(fig, path)
    return True


def _moving_average(values: list[float], width: int) -> list[float]:
    out, acc, window = [], 0.0, []
    for v in values:
        v = v if math.isfinite(v) else (window[-1] if window else 0.0)
        window.append(v)
        acc += v
        if len(window) > width:
            acc -= window.pop(0)
        out.append(acc / len(window))
    return out


def _plot_losses(data, path: Path) -> bool:
    keys = ("loss", "lm_loss", "mtp_loss", "val_loss", "aux_loss")
    stages = [st for st, s in data.items() if any(k in s for k in keys)]
    if not stages:
        return False
    fig, axes = _figure(len(stages), ncols=min(len(stages), 2))
    styles = {"loss": dict(color="C0", label="train loss"), "lm_loss": dict(color="C1", label="LM loss"),
              "mtp_loss": dict(color="C2", ls="--", label="MTP loss"),
              "val_loss": dict(color="C3", marker="o", ms=4, label="val loss")}
    for ax, stage in zip(axes, stages):
        series = data[stage]
        for key, style in styles.items():
            if key not in series:
                continue
            steps, values = series[key].thinned()
            if key in ("loss", "lm_loss") and len(values) > 200:
                ax.plot(steps, values, color=style["color"], alpha=0.25, lw=0.8)
                ax.plot(steps, _moving_average(values, max(5, len(values) // 100)), **style)
            else:
                ax.plot(steps, values, **style)
        if "aux_loss" in series:
            twin = ax.twinx()
            steps, values = series["aux_loss"].thinned()
            twin.plot(steps, values, color="C7", lw=0.8, alpha=0.7, label="aux loss (right)")
            twin.set_ylabel("aux loss", color="C7")
            handles, labels = ax.get_legend_handles_labels()
            h2, l2 = twin.get_legend_handles_labels()
            ax.legend(handles + h2, labels + l2, fontsize=8)
        else:
            ax.legend(fontsize=8)
        ax.set_title(f"{stage}: loss")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    _save(fig, path)
    return True


# --------------------------------------------------------------------------- sections
def _cost_section(cost: Any, cost_error: str | None) -> tuple[list[str], dict]:
    lines = ["## Cost", ""]
    facts: dict = {}
    if cost_error:
        return lines + [f"_{cost_error}._", ""], facts
    if not isinstance(cost, dict) or not isinstance(cost.get("stages"), dict) or not cost["stages"]:
        return lines + ["_No cost.json: this run recorded no cost._", ""], facts
    stages = cost["stages"]
    rows, tot_h, tot_usd, tot_tok = [], 0.0, 0.0, 0
    for name in _stage_sort(list(stages)):
        st = stages[name] if isinstance(stages[name], dict) else {}
        h, usd, tok = st.get("device_hours", 0.0), st.get("usd", 0.0), st.get("tokens", 0)
        h, usd, tok = (v if _is_number(v) else 0 for v in (h, usd, tok))
        n, dev, kind = st.get("n_devices", 1), st.get("device", "?"), st.get("device_type", "")
        device = f"{n}× {dev}" + (f" ({kind})" if kind and kind.lower() not in str(dev).lower() else "")
        rows.append([name, device, _hours(h), f"{int(tok):,}", _usd(usd)])
        tot_h, tot_usd, tot_tok = tot_h + h, tot_usd + usd, tot_tok + int(tok)
    total = cost.get("total") if isinstance(cost.get("total"), dict) else {}
    tot_h = total.get("device_hours", tot_h) if _is_number(total.get("device_hours")) else tot_h
    tot_usd = total.get("usd", tot_usd) if _is_number(total.get("usd")) else tot_usd
    tot_tok = int(total.get("tokens", tot_tok)) if _is_number(total.get("tokens")) else tot_tok
    rows.append(["**Total**", "", f"**{_hours(tot_h)}**", f"**{tot_tok:,}**", f"**{_usd(tot_usd)}**"])
    price = cost.get("price_per_device_hour")
    lines += _table(["Stage", "Device", "Device-hours", "Tokens", "Cost ($)"], rows)
    lines += ["", f"At ${price:g} per device-hour; device-hours = wall-clock hours × devices."
              if _is_number(price) else "Device-hours = wall-clock hours × devices.", ""]
    facts.update(device_hours=tot_h, usd=tot_usd, tokens=tot_tok)

    lines += ["For scale, DeepSeek-V3 (technical report, Table 1; H800 GPUs at $2 per GPU-hour):", ""]
    v3_rows = [[name, f"{h / 1e3:,.0f}K", f"${usd / 1e6:.3f}M".replace(".010M", ".01M")]
               for name, h, usd in V3_COSTS]
    v3_rows.append(["**Total**", f"**{V3_TOTAL[0] / 1e3:,.0f}K**", f"**${V3_TOTAL[1] / 1e6:.3f}M**"])
    lines += _table(["Stage (DeepSeek-V3)", "GPU-hours", "Cost ($)"], v3_rows)
    lines.append("")
    notes = []
    if tot_h > 0:
        notes.append(f"V3's total is {V3_TOTAL[0] / tot_h:,.0f}× this run's device-hours")
    if tot_tok > 0 and tot_h > 0:
        per_t = tot_h / tot_tok * 1e12
        notes.append(f"this run spent {per_t:,.0f} device-hours per trillion tokens "
                     f"(V3: {V3_HOURS_PER_TRILLION_TOKENS / 1e3:,.0f}K H800-hours per trillion tokens, "
                     "for a model of 37B active parameters)")
    if notes:
        text = "; ".join(notes)
        lines += [text[0].upper() + text[1:] + ".", ""]
    return lines, facts


def _incident_section(incidents: list[dict], bad: int, present: bool) -> list[str]:
    lines = ["## Incidents", ""]
    if not present:
        return lines + ["_No incidents.jsonl: the training guard recorded nothing._", ""]
    if bad:
        lines += [f"_{bad} malformed line(s) in incidents.jsonl were skipped._", ""]
    if not incidents:
        return lines + ["None: no loss spikes, no gradient explosions, no rollbacks.", ""]
    by_kind: dict[str, Counter] = {}
    for inc in incidents:
        by_kind.setdefault(str(inc.get("kind", "?")), Counter())[str(inc.get("action", "?"))] += 1
    rows = [[kind, sum(c.values()), ", ".join(f"{a} ×{n}" for a, n in c.most_common())]
            for kind, c in sorted(by_kind.items(), key=lambda kv: -sum(kv[1].values()))]
    lines += _table(["Kind", "Count", "Actions"], rows)
    last = incidents[-5:]
    lines += ["", f"Last {len(last)} of {len(incidents)}:", ""]
    lines += _table(["Step", "Kind", "Value", "Threshold", "Action", "Detail"],
                    [[inc.get("step", "?"), inc.get("kind", "?"), _num(inc.get("value")),
                      _num(inc.get("threshold")), inc.get("action", "?"), inc.get("detail", "")]
                     for inc in last])
    return lines + [""]


def _results_section(data) -> list[str]:
    rows = []
    for stage, series in data.items():
        for key in LOSS_KEYS + SCORE_KEYS:
            if key not in series:
                continue
            final, best = series[key].final(), series[key].best(highest=key in SCORE_KEYS)
            if final is None:
                rows.append([stage, key, "no finite value", "", "", ""])
                continue
            rows.append([stage, key, f"{final[1]:.4f}", _step(final[0]), f"{best[1]:.4f}", _step(best[0])])
    if not rows:
        return []
    return ["## Final and best", ""] + _table(["Stage", "Metric", "Final", "Step", "Best", "Step"], rows) + [""]


def _stage_table(stages: dict[str, dict]) -> list[str]:
    columns: list[str] = []
    for v in stages.values():
        columns += [k for k in v if k not in columns]
    rows = [[stage] + [_num(v[c]) if c in v else "" for c in columns] for stage, v in stages.items()]
    return _table(["Stage"] + columns, rows) + [""]


def _summary_section(summary: Any, error: str | None) -> list[str]:
    """summary.json as tables: per-stage rows (top level, or under "stages") and scalar facts."""
    if error:
        return ["## Held-out results", "", f"_{error}._", ""]
    if summary is None:
        return []
    lines = ["## Held-out results (summary.json)", ""]
    if isinstance(summary, dict) and summary and all(isinstance(v, dict) for v in summary.values()):
        return lines + _stage_table(summary)
    if isinstance(summary, dict) and summary:
        stages = summary.get("stages")
        if isinstance(stages, dict) and stages and all(isinstance(v, dict) for v in stages.values()):
            lines += _stage_table(stages)
        scalars = [[k, _num(v)] for k, v in summary.items() if not isinstance(v, (dict, list))]
        return lines + (_table(["Key", "Value"], scalars) + [""] if scalars else [])
    return lines + ["```json", json.dumps(summary, indent=2)[:4000], "```", ""]


def _median(values: list[float]) -> float:
    vals = sorted(v for v in values if math.isfinite(v))
    if not vals:
        return math.nan
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


# --------------------------------------------------------------------------- entry point
def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.md`` and its PNG plots; returns the path of report.md."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        where = "does not exist" if not run_dir.exists() else "has no metrics.jsonl"
        raise NanoseekError(f"cannot write a report: {run_dir} {where} (give the directory of a training "
                            "run, the one holding metrics.jsonl)")
    data, kept, bad_metrics = _load_metrics(metrics_path)
    incidents_path = run_dir / "incidents.jsonl"
    incidents, bad_incidents = _read_jsonl(incidents_path) if incidents_path.is_file() else ([], 0)
    cost, cost_error = _read_json(run_dir / "cost.json")
    summary, summary_error = _read_json(run_dir / "summary.json")

    plots = []
    for name, make in (
            ("loss.png", lambda p: _plot_losses(data, p)),
            ("throughput.png", lambda p: _plot_by_stage(
                data, ("tokens_per_s", "mfu"), {"tokens_per_s": "tokens / s", "mfu": "MFU"}, p)),
            ("expert_load.png", lambda p: _plot_by_stage(
                data, ("expert_load_max_over_mean", "dead_experts"),
                {"expert_load_max_over_mean": "expert load: max / mean", "dead_experts": "dead experts"}, p)),
            ("rl.png", lambda p: any(k in s for s in data.values() for k in ("reward", "accuracy"))
             and _plot_by_stage(data, RL_KEYS, {"format_rate": "format rate", "kl": "KL to reference",
                                                "response_length": "response length"}, p)),
            ("optim.png", lambda p: _plot_by_stage(data, ("lr", "grad_norm"),
                                                   {"lr": "learning rate", "grad_norm": "gradient norm"},
                                                   p, log_keys=("grad_norm",)))):
        if make(run_dir / name):
            plots.append(name)

    cost_lines, facts = _cost_section(cost, cost_error)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# nanoseek report card: {run_dir.resolve().name}", "", f"Generated {now} from `{run_dir}`.", "",
             "## Run summary", ""]
    stage_rows = []
    for stage, series in data.items():
        steps = [s for ser in series.values() for s in ser.steps]
        tps = _median(series["tokens_per_s"].values) if "tokens_per_s" in series else math.nan
        mfu = _median(series["mfu"].values) if "mfu" in series else math.nan
        mfu = mfu / 100 if mfu > 1.5 else mfu  # logged as a fraction of peak; tolerate percent
        stage_rows.append([stage, f"{_step(min(steps))}–{_step(max(steps))}" if steps else "–",
                           f"{tps:,.0f}" if math.isfinite(tps) else "–",
                           f"{100 * mfu:.1f}%" if math.isfinite(mfu) else "–"])
    lines += _table(["Stage", "Steps", "Tokens/s (median)", "MFU (median)"], stage_rows)
    lines.append("")
    bullets = [f"{kept:,} metric records"]
    if bad_metrics:
        bullets.append(f"{bad_metrics} malformed line(s) in metrics.jsonl skipped")
    if facts:
        bullets.append(f"{_hours(facts['device_hours'])} device-hours, ${_usd(facts['usd'])}, "
                       f"{facts['tokens']:,} tokens")
    kinds = Counter(str(i.get("kind")) for i in incidents)
    bullets.append(f"{len(incidents)} incident(s), {kinds.get('rollback', 0)} rollback(s)"
                   if incidents else "no incidents: no loss spikes, no rollbacks")
    lines += [f"- {b}" for b in bullets] + [""]

    lines += cost_lines
    lines += _results_section(data)
    lines += _summary_section(summary, summary_error)
    lines += _incident_section(incidents, bad_incidents, incidents_path.is_file())
    if plots:
        lines += ["## Plots", ""]
        for name in plots:
            lines += [f"![{name[:-4]}]({name})", ""]

    out = run_dir / "report.md"
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out
