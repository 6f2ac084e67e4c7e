"""What a training stage cost, in the currency of the DeepSeek-V3 report: device-hours and dollars.

A :class:`CostMeter` measures wall-clock segments (one per process that ran the stage: a resumed
run adds a segment), counts tokens and samples, and merges its stage into ``run_dir/cost.json``::

    {"price_per_device_hour": 2.0,
     "stages": {"pretrain": {"device_type": "cuda", "device": "NVIDIA H100 80GB HBM3", "n_devices": 8,
                             "wall_seconds": ..., "device_hours": ..., "tokens": ..., "samples": ...,
                             "usd": ..., "price_per_device_hour": 2.0, "segments": 2, "updated": ...},
                "sft": {...}},
     "total": {"device_hours": ..., "usd": ..., "tokens": ..., "samples": ..., "wall_seconds": ...}}

device-hours = wall seconds × devices / 3600 (per segment, so a resume on a different number of
devices is charged correctly); $ = device-hours × price. In multi-process runs only one rank saves.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..device import device_name
from ..errors import NanoseekError

COST_FILE = "cost.json"


class CostMeter:
    def __init__(self, run_dir: Path, stage: str, device: torch.device, n_devices: int = 1,
                 price_per_device_hour: float = 2.0):
        if not stage or not isinstance(stage, str):
            raise ValueError(f"stage must be a non-empty string, got {stage!r}")
        if int(n_devices) < 1:
            raise ValueError(f"n_devices must be >= 1, got {n_devices}")
        if not (price_per_device_hour >= 0 and math.isfinite(price_per_device_hour)):
            raise ValueError(f"price_per_device_hour must be a finite number >= 0, got {price_per_device_hour}")
        self.run_dir = Path(run_dir)
        self.stage = stage
        device = torch.device(device)
        self.device_type = device.type
        self.device_name = device_name(device)
        self.n_devices = int(n_devices)
        self.price_per_device_hour = float(price_per_device_hour)
        self.session = uuid.uuid4().hex  # tells a resume (new process) from a rollback (same meter)
        self.segments: list[dict] = []   # finished segments: seconds, n_devices, device_type, device
        self.tokens = 0
        self.samples = 0
        self._started_at: float | None = None
        self._adopted: str | None = None  # session of the state taken over at resume, if any

    # -- measuring
    def start(self) -> None:
        """Open a wall-clock segment (a no-op when one is already running)."""
        if self._started_at is None:
            self._started_at = time.monotonic()

    def stop(self) -> None:
        """Close the running segment (a no-op when none is running)."""
        if self._started_at is not None:
            self.segments.append(self._segment(time.monotonic() - self._started_at))
            self._started_at = None

    @property
    def running(self) -> bool:
        return self._started_at is not None

    def _segment(self, seconds: float) -> dict:
        return {"seconds": float(seconds), "n_devices": self.n_devices, "device_type": self.device_type,
                "device": self.device_name}

    def _all_segments(self) -> list[dict]:
        segs = list(self.segments)
        if self._started_at is not None:
            segs.append(self._segment(time.monotonic() - self._started_at))
        return segs

    def add_tokens(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"token count must be >= 0, got {n}")
        self.tokens += int(n)

    def add_samples(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"sample count must be >= 0, got {n}")
        self.samples += int(n)

    # -- figures
    @property
    def wall_seconds(self) -> float:
        """Sum of the segments, the running one included."""
        return sum(s["seconds"] for s in self._all_segments())

    @property
    def device_hours(self) -> float:
        return sum(s["seconds"] * s["n_devices"] for s in self._all_segments()) / 3600.0

    @property
    def usd(self) -> float:
        return self.device_hours * self.price_per_device_hour

    def summary(self) -> dict:
        """This stage's entry of cost.json."""
        segs = self._all_segments()
        return {"device_type": self.device_type, "device": self.device_name, "n_devices": self.n_devices,
                "wall_seconds": self.wall_seconds, "device_hours": self.device_hours, "tokens": self.tokens,
                "samples": self.samples, "usd": self.usd, "price_per_device_hour": self.price_per_device_hour,
                "segments": len(segs),
                "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    # -- cost.json
    def save(self) -> None:
        """Merge this stage into ``run_dir/cost.json`` atomically (tmp + rename), keeping the others."""
        path = self.run_dir / COST_FILE
        stages: dict = {}
        if path.exists():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                stages = dict(data.get("stages", {}))
                if not all(isinstance(v, dict) for v in stages.values()):
                    raise ValueError("a stage entry is not an object")
            except (OSError, ValueError, AttributeError) as exc:
                backup = path.with_name(path.name + ".corrupt")
                warnings.warn(f"{path} is unreadable ({exc}); moved to {backup.name} and starting afresh")
                os.replace(path, backup)
                stages = {}
        stages[self.stage] = self.summary()
        total = {"device_hours": 0.0, "usd": 0.0, "tokens": 0, "samples": 0, "wall_seconds": 0.0}
        for entry in stages.values():
            for key in total:
                value = entry.get(key, 0)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    total[key] += value
        data = {"price_per_device_hour": self.price_per_device_hour, "stages": stages, "total": total}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    # -- state (goes into checkpoints)
    def state_dict(self) -> dict:
        """JSON-serialisable; a running segment is included as elapsed so far."""
        return {"version": 1, "stage": self.stage, "session": self.session, "segments": self._all_segments(),
                "tokens": self.tokens, "samples": self.samples}

    def load_state_dict(self, d: dict) -> None:
        """Take over the counts of an earlier process (a resume): its segments come before this
        process's, its tokens and samples add to any counted here. Only the first such state is taken;
        a later one, or one this same meter wrote, comes from a rollback to an older checkpoint inside
        the run and is ignored, because compute already spent stays spent. A running segment keeps
        running."""
        try:
            if d["session"] == self.session or self._adopted is not None:
                return
            segments = [{"seconds": float(s["seconds"]), "n_devices": int(s["n_devices"]),
                         "device_type": str(s.get("device_type", "")), "device": str(s.get("device", ""))}
                        for s in d["segments"]]
            tokens, samples = int(d["tokens"]), int(d["samples"])
        except (KeyError, TypeError, ValueError) as exc:
            raise NanoseekError(f"malformed cost-meter state: {exc!r}") from None
        if d.get("stage", self.stage) != self.stage:
            warnings.warn(f"cost-meter state of stage {d.get('stage')!r} loaded into stage {self.stage!r}")
        self._adopted = str(d["session"])
        self.segments = segments + self.segments
        self.tokens += tokens
        self.samples += samples
