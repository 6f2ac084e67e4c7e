"""Early warning of reward hacking and collapse during GRPO (the RL counterpart of the training guard).

R1 avoided neural reward models because "the neural reward model may suffer from reward hacking"
(arXiv 2501.12948 §2.2.2); rule-based rewards can be gamed too (a perfect format with a wrong answer,
padding the output until it hits the budget, repeating one token). After every GRPO step the trainer
hands this guard the step's health signals::

    guard = RLGuard(RLGuardConfig(), run_dir / "incidents.jsonl")
    decision = guard.check(step, signals, completion_token_ids)
    if decision.action == "rollback":   # reload the last checkpoint and move on to the next prompts
        guard.note_rollback(step, to_step)
    else:                               # "ok" or "warn": the step stands
        guard.accept(signals)

``signals`` is a dict with (any may be ``None`` / missing, its detectors are then skipped)
``accuracy``, ``format_rate``, ``response_length`` (mean generated tokens), ``truncation_rate``
(share of completions that hit ``max_tokens``), ``kl`` (k3 KL to the reference) and ``entropy``
(mean token entropy of the policy on its samples).

Detectors (kinds in ``incidents.jsonl``; each compares the step with the last ``window`` ACCEPTED
steps, held in :class:`~nanoseek.train.guard.RobustWindow` s, once ``min_history`` are known unless
noted):

- ``reward_hacking``: over the window plus this step, the least-squares trend of the format rate
  rises by at least ``hacking_format_rise`` while the accuracy trend falls by at least
  ``hacking_accuracy_drop`` (the model learns to please the format check instead of solving),
  each trend standing out of the series' own noise: the slope is at least ``hacking_min_t`` of
  its standard errors (:func:`trend_t`), over at least ``hacking_min_history`` accepted steps
  (at most ``window``).
  Without those a run whose format is being learnt while accuracy stays flat (the start of an
  R1-Zero run) reads sampling noise as a fall. Simulated with 64 binomial samples a step (the
  cpu speedrun's batch), format 0.3 → 0.9 over 20 steps and a flat accuracy of 0.3 "fell by 0.1"
  in 33 of 200 runs of 50 steps without the test, in 2 of 200 with it; a real fall (from step
  10, accuracy 0.5 → 0.2 while format 0.3 → 0.9 over 20 steps) is caught in 200 of 200 runs,
  a median 13 steps after it starts (8 when accuracy falls to 0 over 10 steps);
- ``length_explosion``: the mean length is more than ``length_zscore`` robust sigmas above the
  window median AND at least ``length_min_ratio`` × that median; or at least
  ``truncation_fraction`` of the completions hit ``max_tokens`` while the window median was below
  half of it (a policy that hovers around ``truncation_fraction``, as a barely trained one with
  45% truncated did in a 30-step ``nanoseek grpo`` run, is not reported at every crossing);
- ``kl_blowup``: KL above ``kl_max`` (no history needed), or KL ≥ ``kl_min`` and more than
  ``kl_zscore`` robust sigmas above the window median. It gets the ``on_kl`` response when the KL
  jumped (at least ``kl_jump_ratio`` × the last accepted step's, or no step accepted yet); a KL
  that crept there step by step gets a ``"warn"``: a rollback would replay the same drift (a
  learnable toy task at lr 1e-2, β 0.04 climbs smoothly from 0 to 1.05 in 17 steps while its
  reward rises; with the cap as a rollback it was rolled back 4 times and stopped);
- ``entropy_collapse``: entropy below ``entropy_floor`` at the first step or when the whole window
  before the current stay below it was above it (a policy that starts or hovers near the floor is
  reported once, not every time it dips), or below ``entropy_drop_ratio`` × the window median
  (falling fast);
- ``repetition``: more than ``repeat_fraction`` of the completions (those with at least
  ``repeat_min_tokens`` tokens) are degenerate: one run of a repeated token or of a repeated
  n-gram (n ≤ ``repeat_ngram``) covers more than ``repeat_coverage`` of the completion
  (:func:`repetition_coverage`). No history needed to report it; a ``"rollback"`` response
  needs ``min_history`` accepted steps whose median share of degenerate completions was at most
  ``repeat_fraction`` (the policy did not repeat before): a policy that repeats from the start,
  or whose last checkpoint already did, gets a ``"warn"``, since going back cannot help it.

A ``"warn"`` incident is reported when its condition starts; while the same kind keeps firing on
the following steps nothing new is written (the metrics show it), and it is reported again once it
has cleared and returns. A ``"rollback"`` incident is reported every time.

Responses are per kind, ``"warn"`` (log and carry on) or ``"rollback"`` (the trainer reloads the
last checkpoint: weights, optimizer, guard windows; the prompt stream is NOT rewound, so the run
moves on to new prompts). The defaults (:data:`~nanoseek.rl.config.DEFAULT_POLICIES`) roll back on what is damage and
only warn on what a healthy R1-style run also does:

- ``on_hacking="rollback"``: a format rate that climbs while accuracy falls is the policy learning
  the reward instead of the task; every further step trains that in;
- ``on_kl="rollback"``: a KL that jumps above ``kl_max`` or far above its recent values is a policy
  leaving its reference in one step (a bad batch, a too-high learning rate), not learning; the KL
  term alone pulls back slowly (only jumps: see ``kl_blowup`` above);
- ``on_repetition="rollback"``: most completions stuck in a loop is the classic RL collapse and
  carries no signal to learn from (only once the policy is known not to have repeated before, see
  ``repetition`` above);
- ``on_length="warn"``: longer answers are what R1-Zero's reasoning looks like as it is learnt
  ("thinking grows"; the cpu speedrun's GRPO stage moves from short bare answers to long worked
  ones, partly in jumps), so a rollback would undo the very thing being learnt; padding by looping
  is the repetition detector's, and a completion cut off at ``max_tokens`` has no answer, so the
  reward already pays less for it;
- ``on_entropy="warn"``: entropy falls as a policy commits to one way of answering (and a
  confident SFT policy starts low); a rollback does not change the trend that led there, it
  replays it with other prompts.

Incidents are written and printed by the run's :class:`~nanoseek.train.incidents.IncidentLog`, as
the training guard's are (same JSON lines, same ``[guard] step N: ...`` console line, same rollback
accounting: more than ``max_rollbacks`` rollbacks stop the run). The thresholds and responses are
:class:`~nanoseek.rl.config.RLGuardConfig`'s fields.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..errors import NanoseekError
from ..train.guard import SEVERITY, Decision, RobustWindow
from .config import RLGuardConfig
from ..train.incidents import IncidentLog, ReportsIncidents, short_number

RL_KINDS = ("reward_hacking", "length_explosion", "kl_blowup", "entropy_collapse", "repetition")
SIGNALS = ("accuracy", "format_rate", "response_length", "truncation_rate", "kl", "entropy")


# --------------------------------------------------------------------------- series helpers
def _least_squares_line(values: Sequence[float]) -> tuple[float, float, float, float]:
    """(slope, mean of x, mean of y, Σ(x − mean x)²) of the least-squares line through ``(i, values[i])``."""
    n = len(values)
    mean_x = (n - 1) / 2
    mean_y = sum(values) / n
    sxx = sum((i - mean_x) ** 2 for i in range(n))
    slope = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values)) / sxx
    return slope, mean_x, mean_y, sxx


def fitted_change(values: Sequence[float]) -> float:
    """Change over the series predicted by its least-squares line: slope × (n − 1) (0 for n < 2).

    Less noisy than last − first: every point pulls on the slope."""
    n = len(values)
    if n < 2:
        return 0.0
    return _least_squares_line(values)[0] * (n - 1)


def trend_t(values: Sequence[float]) -> float:
    """The t-statistic of the least-squares slope of ``values``: slope / its standard error, from the
    residuals about the line (``inf`` with the slope's sign for a perfect line, 0 for a flat one or
    ``n < 3``). How far the trend stands out of the series' own step-to-step noise."""
    n = len(values)
    if n < 3:
        return 0.0
    slope, mean_x, mean_y, sxx = _least_squares_line(values)
    rss = sum((v - mean_y - slope * (i - mean_x)) ** 2 for i, v in enumerate(values))
    se = math.sqrt(rss / (n - 2) / sxx)
    scale = max(abs(v) for v in values) or 1.0
    if se <= 1e-12 * scale:  # a perfect line
        return 0.0 if abs(slope) <= 1e-12 * scale else math.copysign(math.inf, slope)
    return slope / se


def repetition_coverage(tokens: Sequence[int], max_ngram: int = 4) -> float:
    """Share of ``tokens`` covered by its longest run of one repeated n-gram (n = 1..``max_ngram``).

    A run of period n is a stretch where every token equals the one n places earlier; it covers
    its length plus the n tokens of the first copy. ``[7, 7, 7, 7]`` → 1.0, ``[1, 2, 1, 2, 1, 2, 5, 6]``
    → 6/8, a sequence with no repeats → 0. Linear in ``len(tokens) × max_ngram``.
    """
    n_tok = len(tokens)
    if n_tok < 2:
        return 0.0
    best = 0
    for n in range(1, min(max_ngram, n_tok - 1) + 1):
        run = 0
        for i in range(n, n_tok):
            if tokens[i] == tokens[i - n]:
                run += 1
                if run + n > best:
                    best = run + n
            else:
                run = 0
    return best / n_tok


def degenerate_fraction(completions: Sequence[Sequence[int]], coverage: float = 0.5, max_ngram: int = 4,
                        min_tokens: int = 8) -> tuple[float, int]:
    """``(share of degenerate completions, completions judged)``: completions with at least
    ``min_tokens`` tokens whose :func:`repetition_coverage` exceeds ``coverage``."""
    judged = [c for c in completions if len(c) >= min_tokens]
    if not judged:
        return 0.0, 0
    bad = sum(repetition_coverage(c, max_ngram) > coverage for c in judged)
    return bad / len(judged), len(judged)


def _num(x: Any) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


# --------------------------------------------------------------------------- the guard
class RLGuard(ReportsIncidents):
    """Judges each GRPO step after its update (see the module docstring for the protocol)."""

    def __init__(self, config: RLGuardConfig, incidents_path: Path | None, log: Callable[[str], Any] = print):
        if not isinstance(config, RLGuardConfig):
            raise TypeError(f"config must be an RLGuardConfig, got {type(config).__name__}")
        self.config = config
        self.incidents = IncidentLog(incidents_path, config.max_rollbacks, log)
        self.windows = {name: RobustWindow(config.window) for name in SIGNALS + ("repetition",)}
        self.last_repetition: float | None = None
        self._active: set[str] = set()  # warn kinds that fired on the last judged step

    # -- detectors
    def _ready(self, name: str) -> bool:
        return len(self.windows[name]) >= self.config.min_history

    def _hacking(self, step: int, acc: float | None, fmt: float | None) -> list[dict]:
        cfg = self.config
        need = min(cfg.hacking_min_history, cfg.window)
        if acc is None or fmt is None or min(len(self.windows["accuracy"]), len(self.windows["format_rate"])) < need:
            return []
        fmts = self.windows["format_rate"].values + [fmt]
        accs = self.windows["accuracy"].values + [acc]
        d_fmt, d_acc = fitted_change(fmts), fitted_change(accs)
        if d_fmt >= cfg.hacking_format_rise and d_acc <= -cfg.hacking_accuracy_drop:
            t_fmt, t_acc = trend_t(fmts), trend_t(accs)
            if t_fmt >= cfg.hacking_min_t and t_acc <= -cfg.hacking_min_t:
                return [self.incidents.incident(
                    step, "reward_hacking", d_fmt, cfg.hacking_format_rise,
                    f"over the last {len(fmts)} steps the format rate trend rose by {d_fmt:+.3f} (now {fmt:.3f}, "
                    f"t {t_fmt:.1f}) while accuracy fell by {d_acc:+.3f} (now {acc:.3f}, t {t_acc:.1f}): the "
                    f"format reward may be gamed", cfg.on_hacking)]
        return []

    def _length(self, step: int, length: float | None, trunc: float | None) -> list[dict]:
        cfg = self.config
        out = []
        w = self.windows["response_length"]
        if length is not None and self._ready("response_length"):
            z, med = w.zscore(length), w.median()
            if z > cfg.length_zscore and length >= cfg.length_min_ratio * med:
                out.append(self.incidents.incident(
                    step, "length_explosion", z, cfg.length_zscore,
                    f"mean response length {length:.1f} is {z:.1f} robust sigmas above (and "
                    f"{length / max(med, 1e-9):.2f}x) the median {med:.1f} of the last {len(w)} steps",
                    cfg.on_length))
        t = self.windows["truncation_rate"]
        if not out and trunc is not None and self._ready("truncation_rate"):
            med = t.median()
            if trunc >= cfg.truncation_fraction and med < cfg.truncation_fraction / 2:
                out.append(self.incidents.incident(
                    step, "length_explosion", trunc, cfg.truncation_fraction,
                    f"{trunc:.0%} of the completions hit max_tokens (median of the last {len(t)} steps: "
                    f"{med:.0%})", cfg.on_length))
        return out

    def _kl(self, step: int, kl: float | None) -> list[dict]:
        cfg = self.config
        if kl is None:
            return []
        w = self.windows["kl"]
        last = w.values[-1] if len(w) else None
        # A jump (at least kl_jump_ratio x the last accepted step's KL) gets the configured response;
        # a KL that crept up step by step gets a warning: going back would replay the same drift.
        action, note = cfg.on_kl, ""
        if last is not None and kl < cfg.kl_jump_ratio * last:
            action = "warn"
            note = (f"; it rose gradually ({short_number(last)} the step before): warning, not rolling back "
                    f"(a larger beta or a lower lr holds the policy closer)") if cfg.on_kl != "warn" else ""
        if kl > cfg.kl_max:
            return [self.incidents.incident(step, "kl_blowup", kl, cfg.kl_max,
                                         f"KL to the reference {short_number(kl)} exceeds {cfg.kl_max:g}{note}", action)]
        if kl >= cfg.kl_min and self._ready("kl"):
            z = w.zscore(kl)
            if z > cfg.kl_zscore:
                return [self.incidents.incident(
                    step, "kl_blowup", z, cfg.kl_zscore,
                    f"KL to the reference {short_number(kl)} is {z:.1f} robust sigmas above the median "
                    f"{short_number(w.median())} of the last {len(w)} steps{note}", action)]
        return []

    def _entropy(self, step: int, ent: float | None) -> list[dict]:
        cfg = self.config
        if ent is None:
            return []
        w = self.windows["entropy"]
        # Below the floor counts when every earlier value in the window was above it, the current stay
        # below excepted (that stay is reported once, when it starts): a policy hovering at the floor
        # dips under it again and again, and that is one condition, not one per dip.
        before_stay = list(w.values)
        while before_stay and before_stay[-1] < cfg.entropy_floor:
            before_stay.pop()
        if ent < cfg.entropy_floor and all(v >= cfg.entropy_floor for v in before_stay):
            what = ("fell below" if w.values else "starts below") + f" the floor {cfg.entropy_floor:g}"
            if not w.values:
                what += " (little left to explore; after this, only a fast fall is reported)"
            return [self.incidents.incident(step, "entropy_collapse", ent, cfg.entropy_floor,
                                         f"policy entropy {short_number(ent)} nats/token {what}", cfg.on_entropy)]
        if self._ready("entropy"):
            med = w.median()
            if med > 0 and ent < cfg.entropy_drop_ratio * med:
                return [self.incidents.incident(
                    step, "entropy_collapse", ent, cfg.entropy_drop_ratio * med,
                    f"policy entropy {short_number(ent)} nats/token is {ent / med:.2f}x the median {short_number(med)} of the "
                    f"last {len(w)} steps (falling fast)", cfg.on_entropy)]
        return []

    def _repetition(self, step: int, completions: Sequence[Sequence[int]] | None) -> tuple[list[dict], float | None]:
        cfg = self.config
        if completions is None:
            return [], None
        frac, judged = degenerate_fraction(completions, cfg.repeat_coverage, cfg.repeat_ngram,
                                           cfg.repeat_min_tokens)
        if judged and frac > cfg.repeat_fraction:
            action, note = cfg.on_repetition, ""
            w = self.windows["repetition"]
            if action == "rollback" and not (self._ready("repetition") and w.median() <= cfg.repeat_fraction):
                # Going back only helps a policy that did not repeat before.
                action = "warn"
                note = ("; the policy repeated before" if len(w) else "; no earlier steps to go back to") + \
                       ": warning instead of rolling back"
            return [self.incidents.incident(
                step, "repetition", frac, cfg.repeat_fraction,
                f"{frac:.0%} of {judged} completions are degenerate (one repeated token or n-gram, n <= "
                f"{cfg.repeat_ngram}, covers more than {cfg.repeat_coverage:.0%} of the text){note}",
                action)], frac
        return [], frac if judged else None

    def check(self, step: int, signals: Mapping[str, Any],
              completions: Sequence[Sequence[int]] | None = None) -> Decision:
        """Judge step ``step`` from its ``signals`` (and the completions' token ids, for repetition).

        Records and prints every incident; returns the most severe action ("ok" when none). The
        share of degenerate completions is available afterwards as :attr:`last_repetition`."""
        s = {name: _num(signals.get(name)) for name in SIGNALS}
        incidents = self._hacking(step, s["accuracy"], s["format_rate"])
        incidents += self._length(step, s["response_length"], s["truncation_rate"])
        incidents += self._kl(step, s["kl"])
        incidents += self._entropy(step, s["entropy"])
        rep, self.last_repetition = self._repetition(step, completions)
        incidents += rep
        firing = {i["kind"] for i in incidents if i["action"] == "warn"}
        incidents = [i for i in incidents if i["action"] != "warn" or i["kind"] not in self._active]
        self._active = firing  # warnings already reported that keep firing stay quiet
        action = max((i["action"] for i in incidents), key=SEVERITY.__getitem__, default="ok")
        for inc in incidents:
            self.incidents.record(inc)
        return Decision(action=action, incidents=incidents)

    def accept(self, signals: Mapping[str, Any]) -> None:
        """Enter an applied (not rolled back) step's signals into the windows; the share of
        degenerate completions is ``signals["repetition"]`` when given, else that of the last
        :meth:`check`."""
        for name in SIGNALS + ("repetition",):
            x = _num(signals.get(name, self.last_repetition if name == "repetition" else None))
            if x is not None:
                self.windows[name].push(x)

    def note_reward_errors(self, step: int, errors: Sequence[Mapping[str, Any]], n_completions: int,
                           reward_on_error: float = 0.0) -> dict:
        """Report the completions of step ``step`` on which the reward raised (one ``reward_error``
        incident per step, action ``"warn"``: the step goes on with those completions at
        ``reward_on_error``). ``errors`` holds dicts with ``check``, ``error`` (exception type),
        ``message`` and ``completion`` (already truncated), as :meth:`GRPOTrainer.rollout` makes them."""
        first = errors[0]
        types = sorted({str(e["error"]) for e in errors})
        inc = self.incidents.incident(
            step, "reward_error", len(errors), 0,
            f"the {first['check']} function raised on {len(errors)} of {n_completions} completions "
            f"({', '.join(types)}; first: {first['error']}: {first['message']!r} on completion "
            f"{first['completion']!r}); they got reward {reward_on_error:g} and the step goes on", "warn")
        inc.update(error=str(first["error"]), completion=str(first["completion"]))
        self.incidents.record(inc)
        return inc

    def note_rollback(self, step: int, to_step: int) -> None:
        """Record a rollback (raises :class:`NanoseekError` past ``max_rollbacks``)."""
        self.incidents.note_rollback(step, to_step)

    # -- state
    def state_dict(self) -> dict:
        return {"version": 1, "windows": {k: w.state_dict() for k, w in self.windows.items()},
                "active": sorted(self._active), **self.incidents.state_dict()}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        """Restore a state; like the training guard, a rollback never lowers the rollback count."""
        try:
            for name, w in self.windows.items():
                w.load_state_dict(d["windows"].get(name, {"values": []}))
            self._active = {str(k) for k in d.get("active", [])}
            self.incidents.load_state_dict(d)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise NanoseekError(f"malformed RL-guard state: {exc!r}") from None
