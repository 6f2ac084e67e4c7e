"""The incident log every guard of a run writes to: one JSON line per incident in
``incidents.jsonl`` (fsynced: it is the record a person reads after a crash) and one console line.

The training guard (:mod:`nanoseek.train.guard`) and the RL guard (:mod:`nanoseek.rl.guard`) each
hold one :class:`IncidentLog`; it also counts incidents per kind and rollbacks, and stops the run
once more than ``max_rollbacks`` rollbacks were needed (the problem is then not transient).
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from ..errors import NanoseekError


def json_number(x: float) -> float | str:
    """Floats as they are; NaN and infinities as strings so every line stays strict JSON."""
    x = float(x)
    return x if math.isfinite(x) else str(x)


def short_number(x: float) -> str:
    """A number for a console line: 4 significant digits, or ``nan`` / ``inf``."""
    return f"{x:.4g}" if math.isfinite(x) else str(x)


class IncidentLog:
    """Writes, prints and counts the incidents of one run (``path`` ``None``: count and print only,
    as on every rank but rank 0)."""

    def __init__(self, path: Path | None, max_rollbacks: int, log: Callable[[str], Any] = print):
        self.path = Path(path) if path is not None else None
        self.max_rollbacks = max_rollbacks
        self.log = log
        self.rollbacks = 0
        self.counts: dict[str, int] = {}
        self.recent: list[dict] = []  # the last incidents of this process (not part of the state)

    @staticmethod
    def incident(step: int, kind: str, value: float, threshold: float, detail: str, action: str) -> dict:
        """One incident record (not yet written): when, which step, what crossed which threshold,
        and the action taken."""
        return {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "step": int(step),
                "kind": kind, "value": json_number(value), "threshold": json_number(threshold),
                "detail": detail, "action": action}

    def record(self, inc: dict, extra: str = "") -> None:
        """Count ``inc``, append it to the file (fsynced) and print it (``extra`` is appended to the
        console line only)."""
        self.counts[inc["kind"]] = self.counts.get(inc["kind"], 0) + 1
        self.recent.append(inc)
        del self.recent[:-100]
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(inc, allow_nan=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
        self.log(f"[guard] step {inc['step']}: {inc['kind']}: {inc['detail']} -> {inc['action']}{extra}")

    def note_rollback(self, step: int, to_step: int) -> None:
        """Record that the run went back from ``step`` to the checkpoint of ``to_step``; raises
        :class:`NanoseekError` when this is rollback number ``max_rollbacks + 1``."""
        self.rollbacks += 1
        limit = self.max_rollbacks
        over = self.rollbacks > limit
        inc = self.incident(step, "rollback", self.rollbacks, limit,
                            f"rolled back from step {step} to step {to_step} (rollback {self.rollbacks}, "
                            f"at most {limit} allowed)", "abort" if over else "rollback")
        inc["to_step"] = int(to_step)
        self.record(inc)
        if over:
            where = f"; see {self.path}" if self.path is not None else ""
            raise NanoseekError(f"training stopped at step {step}: {self.rollbacks} rollbacks needed, more "
                                f"than max_rollbacks={limit}{where}")

    def state_dict(self) -> dict:
        """The counts a checkpoint keeps."""
        return {"rollbacks": self.rollbacks, "counts": dict(self.counts)}

    def load_state_dict(self, d: dict) -> None:
        """Restore counts; loading an older state in the same run (a rollback) never lowers them.
        Raises ``KeyError``/``TypeError``/``ValueError`` on a malformed state (the guard names it)."""
        rollbacks = int(d["rollbacks"])
        counts = {str(k): int(v) for k, v in d.get("counts", {}).items()}
        self.rollbacks = max(self.rollbacks, rollbacks)
        for kind, n in counts.items():
            self.counts[kind] = max(self.counts.get(kind, 0), n)


class ReportsIncidents:
    """What a guard holding an :class:`IncidentLog` (``self.incidents``) shows of it."""

    incidents: IncidentLog

    @property
    def log(self) -> Callable[[str], Any]:
        """Where console lines go (the trainer points it at its progress bar)."""
        return self.incidents.log

    @log.setter
    def log(self, fn: Callable[[str], Any]) -> None:
        self.incidents.log = fn

    @property
    def counts(self) -> dict[str, int]:
        """Incidents so far, per kind."""
        return self.incidents.counts
