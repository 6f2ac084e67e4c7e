"""Risk warning and emergency response for training runs.

DeepSeek-V3 reports a pre-training run with "no irrecoverable loss spikes" and "no rollbacks". Small
runs on unfamiliar chips are less lucky, so every step the training loop asks a :class:`TrainingGuard`
whether the step looks healthy before it applies the update::

    guard = TrainingGuard(GuardConfig(), run_dir / "incidents.jsonl")
    decision = guard.check(step, loss, grad_norm, expert_load)   # before optimizer.step()
    if decision.apply_update:                    # ok or warn
        optimizer.step(); guard.accept(step, loss, grad_norm)
    elif decision.action in ("skip", "lr_down"): # drop this update; lr_down also scales the LR
        optimizer.zero_grad()                    # from now on by guard.lr_scale
    elif decision.action == "rollback":          # restore the last good checkpoint, then
        guard.note_rollback(step, to_step)       # skip config.skip_batches_after_rollback batches

Detectors (each incident is one JSON line in ``incidents.jsonl`` and one console line):

- ``nonfinite``: the loss or the gradient norm is NaN or infinite (no history needed);
- ``loss_spike``: robust z-score of the loss against the last ``window`` accepted losses
  (median and MAD, see :class:`RobustWindow`) above ``spike_zscore``, once ``min_history`` are known;
- ``grad_explosion``: gradient norm above ``grad_norm_factor`` × the median accepted norm;
- ``expert_collapse``: in some MoE layer at least ``dead_expert_fraction`` of the routed experts got
  no token in the step; ``imbalance``: the busiest expert got more than ``imbalance_ratio`` × the
  mean load. Both from ``expert_load`` [layers, n_routed_experts] of token COUNTS, and only for
  layers with at least ``min_load_per_expert`` × n_experts assignments (too few tokens leave experts
  idle by chance).

The response to each kind is a policy (``"warn"``, ``"skip"``, ``"lr_down"``, ``"rollback"``); when
several fire in one step the most severe wins: rollback > lr_down > skip > warn > ok. A non-finite
loss or gradient is never only warned about (applying it makes the weights NaN): ``on_nonfinite``
must be ``skip``, ``lr_down`` or ``rollback``, and ``"warn"`` is refused with a :class:`ConfigError`.
Weights or optimizer moments found non-finite when a checkpoint is due (they are never written,
see :mod:`nanoseek.train.checkpoint`) are reported by :meth:`TrainingGuard.nonfinite_state` and
always answered with a rollback. A run that
keeps skipping (``max_consecutive_skips`` dropped updates in a row) escalates to a rollback rather
than stalling silently; ``note_rollback`` stops the run with a :class:`NanoseekError` once more than
``max_rollbacks`` rollbacks were needed.

In data-parallel runs every rank must reach the same decision: pass the all-reduced loss and the
global gradient norm, and give ``incidents_path`` to one rank only.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import NanoseekError
from .config import GuardConfig
from .incidents import IncidentLog, ReportsIncidents, short_number

SEVERITY = {"ok": 0, "warn": 1, "skip": 2, "lr_down": 3, "rollback": 4}
KINDS = ("nonfinite", "loss_spike", "grad_explosion", "expert_collapse", "imbalance", "rollback")
MAD_TO_SIGMA = 1.4826  # MAD × this estimates the standard deviation of normal data


# --------------------------------------------------------------------------- window statistics
class RobustWindow:
    """The last ``size`` values of a series, with outlier-resistant statistics.

    ``zscore(x) = (x − median) / scale`` where ``scale = 1.4826 · MAD``, floored at
    ``rel_floor · |median|`` and ``abs_floor`` so that a flat series (MAD = 0) does not turn every
    tiny change into an infinite z-score. Reused by the RL guard for reward, KL, length and entropy.
    Non-finite values are never stored.
    """

    def __init__(self, size: int, rel_floor: float = 1e-3, abs_floor: float = 1e-8):
        if size < 1:
            raise ValueError(f"RobustWindow size must be >= 1, got {size}")
        self.size = int(size)
        self.rel_floor = float(rel_floor)
        self.abs_floor = float(abs_floor)
        self._values: list[float] = []

    def push(self, x: float) -> bool:
        """Add ``x``; returns False (and stores nothing) when it is NaN or infinite."""
        x = float(x)
        if not math.isfinite(x):
            return False
        self._values.append(x)
        if len(self._values) > self.size:
            del self._values[: len(self._values) - self.size]
        return True

    def __len__(self) -> int:
        return len(self._values)

    @property
    def values(self) -> list[float]:
        return list(self._values)

    def median(self) -> float:
        return statistics.median(self._values) if self._values else math.nan

    def mad(self) -> float:
        """Median absolute deviation from the median (unscaled)."""
        if not self._values:
            return math.nan
        med = statistics.median(self._values)
        return statistics.median(abs(v - med) for v in self._values)

    def scale(self) -> float:
        """Robust standard deviation estimate, floored (see the class docstring)."""
        if not self._values:
            return math.nan
        med = self.median()
        return max(MAD_TO_SIGMA * self.mad(), self.rel_floor * abs(med), self.abs_floor)

    def zscore(self, x: float) -> float:
        """Signed robust z-score of ``x`` against the window (NaN when the window is empty)."""
        if not self._values:
            return math.nan
        return (float(x) - self.median()) / self.scale()

    def state_dict(self) -> dict:
        return {"size": self.size, "values": list(self._values)}

    def load_state_dict(self, d: dict) -> None:
        values = [float(v) for v in d["values"]]
        self._values = [v for v in values if math.isfinite(v)][-self.size:]


# --------------------------------------------------------------------------- decisions
@dataclass
class Decision:
    """What to do with this step: the most severe action among the incidents ("ok" when none)."""

    action: str
    incidents: list[dict] = field(default_factory=list)

    @property
    def apply_update(self) -> bool:
        """True when the optimizer step should be applied (``ok`` or ``warn``)."""
        return self.action in ("ok", "warn")


# --------------------------------------------------------------------------- the guard
class TrainingGuard(ReportsIncidents):
    """Checks each step before its update (see the module docstring for the protocol)."""

    def __init__(self, config: GuardConfig, incidents_path: Path | None, log: Callable[[str], Any] = print):
        if not isinstance(config, GuardConfig):
            raise TypeError(f"config must be a GuardConfig, got {type(config).__name__}")
        self.config = config
        self.incidents = IncidentLog(incidents_path, config.max_rollbacks, log)
        self.loss_window = RobustWindow(config.window, rel_floor=config.mad_floor)
        self.grad_window = RobustWindow(config.window, rel_floor=config.mad_floor)
        self.lr_scale: float = 1.0
        self.consecutive_skips: int = 0
        self._warned_low_load = False

    # -- detectors

    def _check_expert_load(self, step: int, expert_load: torch.Tensor) -> list[dict]:
        cfg = self.config
        load = torch.as_tensor(expert_load).detach().to("cpu", torch.float64)
        if load.dim() == 1:
            load = load.unsqueeze(0)
        if load.dim() != 2 or load.shape[1] == 0:
            raise ValueError(f"expert_load must be [layers, n_experts], got shape {tuple(load.shape)}")
        n_experts = load.shape[1]
        totals = load.sum(dim=1)
        enough = totals >= cfg.min_load_per_expert * n_experts
        enough &= totals > 0
        if not bool(enough.any()):
            if not self._warned_low_load:
                self._warned_low_load = True
                self.log(f"[guard] note: expert-load checks skipped at step {step}: "
                         f"{totals.max().item():.4g} assignments per layer for {n_experts} experts (need "
                         f">= {cfg.min_load_per_expert:g} per expert; expert_load must hold token counts)")
            return []
        incidents = []
        dead = (load == 0).double().mean(dim=1)
        dead = torch.where(enough, dead, torch.zeros_like(dead))
        bad = [i for i in range(load.shape[0]) if dead[i] >= cfg.dead_expert_fraction]
        if bad:
            worst = max(bad, key=lambda i: dead[i].item())
            n_dead = int((load[worst] == 0).sum())
            incidents.append(self.incidents.incident(
                step, "expert_collapse", dead[worst].item(), cfg.dead_expert_fraction,
                f"layer {worst}: {n_dead}/{n_experts} routed experts got no token "
                f"(layers affected: {bad})", cfg.on_collapse))
        mean = totals / n_experts
        ratio = torch.where(enough, load.max(dim=1).values / mean.clamp_min(1e-12), torch.zeros_like(mean))
        bad = [i for i in range(load.shape[0]) if ratio[i] > cfg.imbalance_ratio]
        if bad:
            worst = max(bad, key=lambda i: ratio[i].item())
            incidents.append(self.incidents.incident(
                step, "imbalance", ratio[worst].item(), cfg.imbalance_ratio,
                f"layer {worst}: busiest expert {int(load[worst].argmax())} got "
                f"{ratio[worst].item():.1f}x the mean load (layers affected: {bad})", cfg.on_collapse))
        return incidents

    def check(self, step: int, loss: float, grad_norm: float,
              expert_load: torch.Tensor | None = None) -> Decision:
        """Judge a step before its update is applied; records and prints every incident."""
        cfg = self.config
        loss, grad_norm = float(loss), float(grad_norm)
        incidents: list[dict] = []
        bad = [(name, x) for name, x in (("loss", loss), ("grad norm", grad_norm)) if not math.isfinite(x)]
        for name, x in bad:
            incidents.append(self.incidents.incident(step, "nonfinite", x, math.inf, f"{name} is {x}",
                                            cfg.on_nonfinite))
        if math.isfinite(loss) and len(self.loss_window) >= cfg.min_history:
            z = self.loss_window.zscore(loss)
            if z > cfg.spike_zscore:
                incidents.append(self.incidents.incident(
                    step, "loss_spike", z, cfg.spike_zscore,
                    f"loss {short_number(loss)} is {z:.1f} robust sigmas above the median "
                    f"{short_number(self.loss_window.median())} of the last {len(self.loss_window)} steps",
                    cfg.on_spike))
        if math.isfinite(grad_norm) and len(self.grad_window) >= cfg.min_history:
            med = self.grad_window.median()
            if med > 0 and grad_norm > cfg.grad_norm_factor * med:
                incidents.append(self.incidents.incident(
                    step, "grad_explosion", grad_norm, cfg.grad_norm_factor * med,
                    f"grad norm {short_number(grad_norm)} is {grad_norm / med:.1f}x the median "
                    f"{short_number(med)} of the last {len(self.grad_window)} steps", cfg.on_grad_explosion))
        if expert_load is not None:
            incidents.extend(self._check_expert_load(step, expert_load))

        action = max((i["action"] for i in incidents), key=SEVERITY.__getitem__, default="ok")
        if action in ("skip", "lr_down"):
            self.consecutive_skips += 1
            if 0 < cfg.max_consecutive_skips < self.consecutive_skips:
                action = "rollback"
                for inc in incidents:
                    inc["action"] = "rollback"
                    inc["detail"] += (f" (escalated: {self.consecutive_skips} updates dropped in a row, "
                                      f"max_consecutive_skips={cfg.max_consecutive_skips})")
        if action not in ("skip", "lr_down"):
            self.consecutive_skips = 0
        if action == "lr_down":
            self.lr_scale *= cfg.lr_down_factor
        for inc in incidents:
            self.incidents.record(inc, extra=f"; lr scale now {self.lr_scale:g}" if action == "lr_down" else "")
        return Decision(action=action, incidents=incidents)

    def nonfinite_state(self, step: int, count: int, detail: str) -> Decision:
        """Report ``count`` NaN/inf values found in the weights or optimizer state at ``step`` (when a
        checkpoint is due; ``detail`` names the tensors). Skipping cannot help once they are in the
        state, so the answer is always a rollback to the last good checkpoint."""
        self.consecutive_skips = 0
        inc = self.incidents.incident(step, "nonfinite", count, 0, f"weights / optimizer state: {detail}", "rollback")
        self.incidents.record(inc)
        return Decision(action="rollback", incidents=[inc])

    def accept(self, step: int, loss: float, grad_norm: float) -> None:
        """Enter an APPLIED step into the moving windows (non-finite values are ignored)."""
        self.loss_window.push(loss)
        self.grad_window.push(grad_norm)

    def note_rollback(self, step: int, to_step: int) -> None:
        """Record that the run went back from ``step`` to the checkpoint of ``to_step``; raises
        :class:`NanoseekError` past ``max_rollbacks`` (see :meth:`IncidentLog.note_rollback`)."""
        self.consecutive_skips = 0
        self.incidents.note_rollback(step, to_step)

    # -- state
    def state_dict(self) -> dict:
        """JSON-serialisable state; restoring it reproduces later decisions exactly."""
        return {"version": 1, "loss_window": self.loss_window.state_dict(),
                "grad_window": self.grad_window.state_dict(), "lr_scale": self.lr_scale,
                "consecutive_skips": self.consecutive_skips, **self.incidents.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        """Restore a state. Responses are never undone: loading an older state in the same run
        (a rollback) keeps the larger rollback count and the smaller lr_scale; a fresh guard takes
        the saved values exactly."""
        try:
            self.loss_window.load_state_dict(d["loss_window"])
            self.grad_window.load_state_dict(d["grad_window"])
            self.lr_scale = min(self.lr_scale, float(d["lr_scale"]))
            self.consecutive_skips = int(d["consecutive_skips"])
            self.incidents.load_state_dict(d)
        except (KeyError, TypeError, ValueError) as exc:
            raise NanoseekError(f"malformed training-guard state: {exc!r}") from None
