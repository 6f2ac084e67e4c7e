"""The training guard: each detector, the response policies, the incident log and its state."""

import json
import math
import random

import pytest
import torch

from nanoseek.errors import ConfigError, NanoseekError
from nanoseek.train.guard import Decision, GuardConfig, RobustWindow, TrainingGuard


def make_guard(tmp_path=None, **overrides):
    lines = []
    path = tmp_path / "incidents.jsonl" if tmp_path is not None else None
    return TrainingGuard(GuardConfig(**overrides), path, log=lines.append), lines


def feed(guard, losses, grads=None, start=0):
    """Run the check/accept protocol; returns the decisions."""
    grads = grads if grads is not None else [1.0] * len(losses)
    out = []
    for i, (loss, g) in enumerate(zip(losses, grads)):
        d = guard.check(start + i, loss, g)
        if d.apply_update:
            guard.accept(start + i, loss, g)
        out.append(d)
    return out


def noisy(n, rng, level=3.0, sigma=0.05):
    return [level + rng.gauss(0.0, sigma) for _ in range(n)]


# --------------------------------------------------------------------------- RobustWindow
def test_robust_window_statistics():
    w = RobustWindow(5)
    for x in [1.0, 2.0, 3.0, 4.0, 100.0, float("nan")]:
        w.push(x)
    assert len(w) == 5 and w.median() == 3.0 and w.mad() == 1.0
    assert w.zscore(3.0 + 1.4826 * 2) == pytest.approx(2.0)
    w.push(5.0)  # 1.0 falls out of the window
    assert w.values == [2.0, 3.0, 4.0, 100.0, 5.0]
    flat = RobustWindow(10, rel_floor=1e-3)
    for _ in range(10):
        flat.push(2.0)
    assert flat.mad() == 0.0 and flat.scale() == pytest.approx(2e-3)
    assert flat.zscore(2.01) == pytest.approx(5.0)  # floored, not infinite
    back = RobustWindow(10, rel_floor=1e-3)
    back.load_state_dict(json.loads(json.dumps(flat.state_dict())))
    assert back.values == flat.values
    assert math.isnan(RobustWindow(3).zscore(1.0))


# --------------------------------------------------------------------------- detectors
def test_nan_loss_and_inf_grad_need_no_history(tmp_path):
    guard, lines = make_guard(tmp_path)
    d = guard.check(0, float("nan"), 1.0)
    assert d.action == "rollback" and [i["kind"] for i in d.incidents] == ["nonfinite"]
    assert not d.apply_update
    d = guard.check(1, 2.5, float("inf"))
    assert d.action == "rollback" and d.incidents[0]["kind"] == "nonfinite"
    assert "grad norm" in d.incidents[0]["detail"]
    assert len(lines) == 2 and all(line.startswith("[guard] step") for line in lines)


def test_spike_after_30_noisy_steps():
    rng = random.Random(0)
    guard, _ = make_guard()
    decisions = feed(guard, noisy(30, rng))
    assert all(d.action == "ok" for d in decisions)
    spike = guard.loss_window.median() + 12 * guard.loss_window.scale()
    d = guard.check(30, spike, 1.0)
    assert d.action == "skip"
    (inc,) = d.incidents
    assert inc["kind"] == "loss_spike" and inc["value"] > 6.0 and inc["threshold"] == 6.0
    # a bump below the threshold is not a spike
    assert guard.check(31, guard.loss_window.median() + 3 * guard.loss_window.scale(), 1.0).action == "ok"


def test_no_spike_before_min_history():
    guard, _ = make_guard()
    feed(guard, [3.0, 3.01, 2.99])
    assert guard.check(3, 50.0, 1.0).action == "ok"


def test_no_false_positives_on_500_noisy_decreasing_steps():
    rng = random.Random(1)
    guard, lines = make_guard()
    losses = [2.0 + 8.0 * math.exp(-t / 80) + rng.gauss(0, 0.08) for t in range(500)]
    grads = [0.5 + 2.0 * math.exp(-t / 50) + abs(rng.gauss(0, 0.15)) for t in range(500)]
    decisions = feed(guard, losses, grads)
    assert [d.action for d in decisions] == ["ok"] * 500, lines
    assert lines == []


def test_grad_explosion():
    rng = random.Random(2)
    guard, _ = make_guard(on_grad_explosion="lr_down", lr_down_factor=0.5)
    feed(guard, noisy(20, rng), [1.0 + 0.1 * rng.random() for _ in range(20)])
    d = guard.check(20, 3.0, 50.0)
    assert d.action == "lr_down" and d.incidents[0]["kind"] == "grad_explosion"
    assert d.incidents[0]["threshold"] == pytest.approx(10 * guard.grad_window.median())
    assert guard.lr_scale == 0.5
    guard.check(21, 3.0, 50.0)
    assert guard.lr_scale == 0.25
    assert guard.check(22, 3.0, 5.0).action == "ok"


def expert_load(layers=3, experts=16, per_expert=20):
    return torch.full((layers, experts), per_expert, dtype=torch.long)


def test_dead_experts():
    guard, _ = make_guard()
    load = expert_load()
    load[1, :10] = 0  # 10 of 16 experts dead in layer 1
    load[1, 10:] = 50
    d = guard.check(0, 3.0, 1.0, load)
    kinds = {i["kind"]: i for i in d.incidents}
    assert d.action == "warn" and "expert_collapse" in kinds
    assert kinds["expert_collapse"]["value"] == pytest.approx(10 / 16)
    assert "layer 1" in kinds["expert_collapse"]["detail"]
    assert guard.check(1, 3.0, 1.0, expert_load()).action == "ok"


def test_imbalance():
    guard, _ = make_guard(on_collapse="skip")
    load = expert_load(layers=2, experts=16, per_expert=10).float()
    load[0, 3] = 400.0  # mean (15*10 + 400)/16 = 34.4, max/mean = 11.6
    d = guard.check(0, 3.0, 1.0, load)
    assert d.action == "skip"
    (inc,) = d.incidents
    assert inc["kind"] == "imbalance" and inc["value"] == pytest.approx(400 / (550 / 16))
    assert inc["threshold"] == 8.0


def test_expert_checks_need_enough_tokens():
    guard, lines = make_guard()
    sparse = torch.zeros(2, 64)
    sparse[:, :5] = 1  # 5 assignments for 64 experts: idle experts are expected, not a collapse
    assert guard.check(0, 3.0, 1.0, sparse).action == "ok"
    assert len(lines) == 1 and "skipped" in lines[0]
    guard.check(1, 3.0, 1.0, sparse)
    assert len(lines) == 1  # noted once


# --------------------------------------------------------------------------- policies
def test_most_severe_action_wins():
    guard, _ = make_guard(on_nonfinite="skip", on_grad_explosion="lr_down", on_collapse="skip")
    feed(guard, [3.0] * 12)
    load = expert_load()
    load[0, :12] = 0
    d = guard.check(12, 3.0, 100.0, load)  # grad explosion (lr_down) + collapse (skip)
    assert {i["kind"] for i in d.incidents} == {"grad_explosion", "expert_collapse"}
    assert d.action == "lr_down"
    guard2, _ = make_guard(on_nonfinite="skip", on_spike="rollback")
    feed(guard2, [3.0] * 12)
    d = guard2.check(12, 30.0, float("inf"))
    assert d.action == "rollback"
    assert Decision("ok", []).apply_update and Decision("warn", []).apply_update
    assert not Decision("skip", []).apply_update


@pytest.mark.parametrize("field", ["on_nonfinite", "on_spike", "on_grad_explosion", "on_collapse"])
def test_policy_validation(field):
    with pytest.raises(ValueError, match=f"{field}.*'explode'"):
        GuardConfig(**{field: "explode"})
    with pytest.raises(ConfigError):
        GuardConfig(**{field: "ok"})


def test_numeric_validation():
    with pytest.raises(ValueError, match="lr_down_factor"):
        GuardConfig(lr_down_factor=1.5)
    with pytest.raises(ValueError, match="min_history"):
        GuardConfig(window=5, min_history=10)
    with pytest.raises(ConfigError, match="bogus"):
        GuardConfig.from_dict({"bogus": 1})
    assert GuardConfig.from_dict(GuardConfig(window=7, min_history=3).to_dict()).window == 7


def test_max_rollbacks_raises(tmp_path):
    guard, _ = make_guard(tmp_path, max_rollbacks=2)
    guard.note_rollback(100, 50)
    guard.note_rollback(120, 50)
    with pytest.raises(NanoseekError, match="max_rollbacks=2"):
        guard.note_rollback(130, 50)
    rows = [json.loads(line) for line in (tmp_path / "incidents.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["rollback"] * 3
    assert [r["action"] for r in rows] == ["rollback", "rollback", "abort"]
    assert rows[0]["to_step"] == 50 and rows[0]["step"] == 100


def test_endless_skipping_escalates_to_rollback():
    guard, _ = make_guard(max_consecutive_skips=3)
    feed(guard, [3.0 + 0.01 * (i % 3) for i in range(20)])
    actions = [guard.check(20 + i, 9.0, 1.0).action for i in range(4)]
    assert actions == ["skip", "skip", "skip", "rollback"]
    guard.note_rollback(23, 10)
    assert guard.check(24, 9.0, 1.0).action == "skip"  # the count starts afresh


# --------------------------------------------------------------------------- log and state
def test_incidents_jsonl(tmp_path):
    guard, lines = make_guard(tmp_path)
    feed(guard, [3.0, 3.1, 2.9] * 5)
    guard.check(15, 3.0, float("nan"))
    guard.check(16, 40.0, 1.0)
    rows = [json.loads(line) for line in (tmp_path / "incidents.jsonl").read_text().splitlines()]
    assert len(rows) == 2 == len(lines)
    for row in rows:
        assert set(row) >= {"time", "step", "kind", "value", "threshold", "detail", "action"}
    assert rows[0]["kind"] == "nonfinite" and rows[0]["value"] == "nan" and rows[0]["step"] == 15
    assert rows[1]["kind"] == "loss_spike" and rows[1]["action"] == "skip"
    assert rows[1]["threshold"] == 6.0 and rows[1]["value"] > 6.0
    assert "loss_spike" in lines[1] and "skip" in lines[1]
    assert guard.counts == {"nonfinite": 1, "loss_spike": 1}


def test_state_dict_round_trip_gives_identical_decisions():
    rng = random.Random(3)
    guard, _ = make_guard(on_spike="lr_down")
    feed(guard, noisy(40, rng), [1.0 + 0.2 * rng.random() for _ in range(40)])
    guard.check(40, 100.0, 1.0)  # an lr_down, so lr_scale is part of the state
    state = json.loads(json.dumps(guard.state_dict()))
    clone, _ = make_guard(on_spike="lr_down")
    clone.load_state_dict(state)
    assert clone.state_dict() == guard.state_dict()
    later = noisy(30, rng) + [50.0, float("nan"), 3.0]
    grads = [1.0 + 0.2 * rng.random() for _ in range(30)] + [1.0, 1.0, 80.0]
    a = feed(guard, later, grads, start=41)
    b = feed(clone, later, grads, start=41)
    assert [(d.action, [(i["kind"], i["value"]) for i in d.incidents]) for d in a] == \
           [(d.action, [(i["kind"], i["value"]) for i in d.incidents]) for d in b]
    assert {d.action for d in a} >= {"ok", "lr_down", "rollback", "skip"}
    assert clone.lr_scale == guard.lr_scale == 0.25


def test_loading_an_older_state_does_not_undo_rollbacks():
    guard, _ = make_guard(max_rollbacks=1)
    old = guard.state_dict()
    guard.note_rollback(10, 0)
    guard.load_state_dict(old)  # the trainer restores the checkpoint's guard state
    with pytest.raises(NanoseekError):
        guard.note_rollback(20, 0)


def test_nonfinite_is_never_only_warned():
    """A NaN/inf loss or gradient applied to the weights makes them NaN (issue 13 item 5): 'warn' is refused."""
    with pytest.raises(ConfigError, match=r"on_nonfinite.*'warn'.*skip, lr_down or rollback"):
        GuardConfig(on_nonfinite="warn")
    with pytest.raises(ConfigError, match="on_nonfinite"):
        GuardConfig.from_dict({"on_nonfinite": "warn"})
    for policy in ("skip", "lr_down", "rollback"):
        guard, _ = make_guard(on_nonfinite=policy)
        d = guard.check(1, float("nan"), 1.0)
        assert d.action == policy and not d.apply_update
