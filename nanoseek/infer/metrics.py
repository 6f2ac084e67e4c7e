"""``/metrics``: the server's counters, gauges and histograms in the Prometheus text format.

Written by hand (no extra dependency). The engine thread and the event loop both record into one
:class:`Metrics`, under its lock.
"""

from __future__ import annotations

import collections
import threading


class _Histogram:
    """A Prometheus histogram: cumulative counts per upper bound, and the sum and count of the values."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Count ``value`` in every bucket it fits."""
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        """The sample lines of the histogram called ``name`` (buckets, +Inf, sum, count)."""
        out = [f'{name}_bucket{{le="{_num(b)}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {_num(self.sum)}")
        out.append(f"{name}_count {self.count}")
        return out


def _num(x: float) -> str:
    """A number as Prometheus writes it: ``0.5``, ``1.0``."""
    return repr(float(x)) if not float(x).is_integer() else f"{float(x):.1f}"


class Metrics:
    """Counters, gauges and histograms, rendered in the Prometheus text format (version 0.0.4)."""

    TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0)
    TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                    1.0, 2.5)
    E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: collections.Counter[tuple[str, str]] = collections.Counter()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.aborted = 0
        self.engine_errors = 0
        self.ttft = _Histogram(self.TTFT_BUCKETS)
        self.tpot = _Histogram(self.TPOT_BUCKETS)
        self.e2e = _Histogram(self.E2E_BUCKETS)

    def count_request(self, endpoint: str, status: int) -> None:
        """Count one HTTP response by endpoint label and status code."""
        with self._lock:
            self.requests[(endpoint, str(status))] += 1

    def add(self, **deltas: int) -> None:
        """Add to the named counters (``prompt_tokens``, ``generation_tokens``, ``aborted``, ``engine_errors``)."""
        with self._lock:
            for key, value in deltas.items():
                setattr(self, key, getattr(self, key) + value)

    def observe_job(self, ttft: float | None, tpot: float | None, e2e: float | None) -> None:
        """Record one finished generation's latencies (None: not measured)."""
        with self._lock:
            if ttft is not None:
                self.ttft.observe(ttft)
            if tpot is not None:
                self.tpot.observe(tpot)
            if e2e is not None:
                self.e2e.observe(e2e)

    def render(self, waiting: int, running: int, in_flight: int) -> str:
        """The metrics page, with the engine's queue gauges given by the caller."""
        p = "nanoseek_"
        lines: list[str] = []

        def head(name: str, kind: str, text: str) -> None:
            lines.append(f"# HELP {p}{name} {text}")
            lines.append(f"# TYPE {p}{name} {kind}")

        with self._lock:
            head("requests_total", "counter", "HTTP requests by endpoint and status code.")
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'{p}requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            scalars = (
                ("prompt_tokens_total", "counter", "Prompt tokens of accepted generation requests.",
                 self.prompt_tokens),
                ("generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens),
                ("requests_aborted_total", "counter", "Generation requests aborted (client went away).",
                 self.aborted),
                ("engine_errors_total", "counter", "Engine steps that raised (their requests got a 500).",
                 self.engine_errors),
                ("queue_depth", "gauge", "Generation requests waiting for a cache slot.", waiting),
                ("running_requests", "gauge", "Generation requests holding a cache slot.", running),
                ("requests_in_flight", "gauge", "Generation requests accepted and not finished.", in_flight),
            )
            for name, kind, text, value in scalars:
                head(name, kind, text)
                lines.append(f"{p}{name} {value}")
            histograms = (
                ("time_to_first_token_seconds", "Time from request arrival to its first token.", self.ttft),
                ("time_per_output_token_seconds", "Mean time between output tokens after the first, per request.",
                 self.tpot),
                ("e2e_request_latency_seconds", "Time from request arrival to its last token.", self.e2e),
            )
            for name, text, hist in histograms:
                head(name, "histogram", text)
                lines += [p + x for x in hist.lines(name)]
        return "\n".join(lines) + "\n"
