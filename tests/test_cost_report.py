"""Cost meter (device-hours, dollars, cost.json) and the report card built from a run directory."""

import json

import pytest
import torch

from nanoseek.cli import main
from nanoseek.device import device_name
from nanoseek.errors import NanoseekError
from nanoseek.report import write_report
from nanoseek.train import cost as cost_module
from nanoseek.train.cost import CostMeter

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(cost_module.time, "monotonic", c)
    return c


# --------------------------------------------------------------------------- cost meter
def test_segments_accumulate_and_money_math(tmp_path, clock):
    m = CostMeter(tmp_path, "pretrain", torch.device("cpu"), n_devices=4, price_per_device_hour=2.5)
    m.start()
    clock.now += 1800
    m.stop()
    clock.now += 999  # stopped: not counted
    m.start()
    clock.now += 900
    assert m.wall_seconds == pytest.approx(2700)  # the running segment counts
    m.stop()
    assert m.wall_seconds == pytest.approx(2700)
    assert m.device_hours == pytest.approx(2700 * 4 / 3600)  # 3.0
    assert m.usd == pytest.approx(3.0 * 2.5)
    m.add_tokens(1000)
    m.add_tokens(24)
    m.add_samples(3)
    s = m.summary()
    assert s["device_type"] == "cpu" and s["device"] == device_name("cpu") and s["n_devices"] == 4
    assert s["segments"] == 2 and s["tokens"] == 1024 and s["samples"] == 3
    with pytest.raises(ValueError):
        m.add_tokens(-1)


def test_resume_adds_a_segment(tmp_path, clock):
    first = CostMeter(tmp_path, "pretrain", "cpu")
    first.start()
    clock.now += 3600
    first.add_tokens(500)
    state = json.loads(json.dumps(first.state_dict()))  # checkpoint taken while running
    resumed = CostMeter(tmp_path, "pretrain", "cpu")
    resumed.load_state_dict(state)
    assert resumed.wall_seconds == pytest.approx(3600) and resumed.tokens == 500
    resumed.start()
    clock.now += 1800
    resumed.add_tokens(250)
    assert resumed.device_hours == pytest.approx(1.5) and resumed.tokens == 750
    assert resumed.summary()["segments"] == 2
    # a rollback to an older checkpoint inside the run does not un-spend compute
    resumed.load_state_dict(state)
    resumed.load_state_dict(resumed.state_dict())
    assert resumed.device_hours == pytest.approx(1.5) and resumed.tokens == 750


def test_stages_merge_in_cost_json(tmp_path, clock):
    pre = CostMeter(tmp_path, "pretrain", "cpu", n_devices=2)
    pre.start()
    clock.now += 3600
    pre.add_tokens(10_000)
    pre.save()
    pre.stop()
    sft = CostMeter(tmp_path, "sft", "cpu")
    sft.start()
    clock.now += 900
    sft.add_tokens(500)
    sft.add_samples(20)
    sft.stop()
    sft.save()
    pre.save()  # saving again updates its own stage, keeps sft
    data = json.loads((tmp_path / "cost.json").read_text())
    assert data["price_per_device_hour"] == 2.0
    assert set(data["stages"]) == {"pretrain", "sft"}
    assert data["stages"]["pretrain"]["device_hours"] == pytest.approx(2.0)
    assert data["stages"]["pretrain"]["usd"] == pytest.approx(4.0)
    assert data["stages"]["sft"]["device_hours"] == pytest.approx(0.25)
    assert data["stages"]["sft"]["samples"] == 20
    assert data["total"]["device_hours"] == pytest.approx(2.25)
    assert data["total"]["usd"] == pytest.approx(4.5)
    assert data["total"]["tokens"] == 10_500
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- report
def write_run(run_dir, bad_lines=0):
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for step in range(1, 61):
        row = {"stage": "pretrain", "step": step, "loss": 6.0 - 0.05 * step, "lm_loss": 5.5 - 0.05 * step,
               "mtp_loss": 6.2 - 0.05 * step, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 12000.0 + step,
               "mfu": 0.21, "expert_load_max_over_mean": 1.5, "dead_experts": 0}
        if step % 20 == 0:
            row["val_loss"] = 6.1 - 0.05 * step
        rows.append(json.dumps(row))
    rows[-1] = json.dumps({"stage": "pretrain", "step": 60, "loss": 2.9876, "lm_loss": 2.8})
    for step in range(1, 11):
        rows.append(json.dumps({"stage": "grpo", "step": step, "reward": 0.1 * step, "accuracy": 0.05 * step,
                                "format_rate": 0.9, "kl": 0.01 * step, "entropy": 1.0, "response_length": 100 + step}))
    text = "\n".join(rows) + "\n"
    if bad_lines:
        text += "not json at all\n[1, 2]\n" + '{"stage": "pretrain", "loss": 1.0}\n' + '{"stage": "pre'
    (run_dir / "metrics.jsonl").write_text(text)
    incidents = [{"time": "2026-01-01T00:00:00+00:00", "step": 17, "kind": "loss_spike", "value": 9.5,
                  "threshold": 6.0, "detail": "loss 9 is 9.5 robust sigmas above", "action": "skip"},
                 {"time": "2026-01-01T00:00:01+00:00", "step": 30, "kind": "nonfinite", "value": "nan",
                  "threshold": "inf", "detail": "loss is nan", "action": "rollback"},
                 {"time": "2026-01-01T00:00:02+00:00", "step": 30, "kind": "rollback", "value": 1,
                  "threshold": 3, "detail": "rolled back from step 30 to step 20", "action": "rollback"}]
    (run_dir / "incidents.jsonl").write_text("\n".join(json.dumps(i) for i in incidents) + "\n")
    cost = {"price_per_device_hour": 2.0,
            "stages": {"grpo": {"device_type": "cuda", "device": "NVIDIA H100 80GB HBM3", "n_devices": 1,
                                "wall_seconds": 1111.0, "device_hours": 0.3086, "tokens": 45678, "samples": 640,
                                "usd": 0.6172},
                       "pretrain": {"device_type": "cuda", "device": "NVIDIA H100 80GB HBM3", "n_devices": 8,
                                    "wall_seconds": 900.0, "device_hours": 2.0, "tokens": 1234567,
                                    "samples": 0, "usd": 4.0}},
            "total": {"device_hours": 2.3086, "usd": 4.6172, "tokens": 1280245}}
    (run_dir / "cost.json").write_text(json.dumps(cost))
    (run_dir / "summary.json").write_text(json.dumps({"sft": {"accuracy": 0.4375, "n": 64},
                                                      "grpo": {"accuracy": 0.8125, "n": 64}}))


def test_report_card(tmp_path):
    run = tmp_path / "run"
    write_run(run)
    path = write_report(run)
    assert path == run / "report.md"
    text = path.read_text()
    # the cost table, with the measured figures and a total
    assert "| Stage | Device | Device-hours | Tokens | Cost ($) |" in text
    assert "| pretrain | 8× NVIDIA H100 80GB HBM3 (cuda) | 2.0000 | 1,234,567 | 4.0000 |" in text
    assert "| grpo | 1× NVIDIA H100 80GB HBM3 (cuda) | 0.3086 | 45,678 | 0.6172 |" in text
    assert "| **Total** |  | **2.3086** | **1,280,245** | **4.6172** |" in text
    assert text.index("| pretrain | 8×") < text.index("| grpo | 1×")  # recipe order
    # the V3 reference for scale
    for figure in ("2,664K", "$5.328M", "119K", "$0.238M", "5K", "$0.01M", "2,788K", "$5.576M"):
        assert figure in text
    # losses: final and best
    assert "| pretrain | loss | 2.9876 | 60 | 2.9876 | 60 |" in text
    assert "| pretrain | val_loss | 4.1000 | 40 | 4.1000 | 40 |" in text
    assert "| grpo | reward | 1.0000 | 10 | 1.0000 | 10 |" in text
    # held-out table, incidents
    assert "| Stage | accuracy | n |" in text and "| grpo | 0.8125 | 64 |" in text
    assert "| loss_spike | 1 | skip ×1 |" in text and "| rollback | 1 | rollback ×1 |" in text
    assert "rolled back from step 30 to step 20" in text
    # plots
    for name in ("loss.png", "throughput.png", "expert_load.png", "rl.png", "optim.png"):
        assert f"]({name})" in text
        assert (run / name).read_bytes()[:8] == PNG_SIGNATURE, name
    assert "malformed" not in text


def test_report_skips_malformed_lines(tmp_path):
    run = tmp_path / "run"
    write_run(run, bad_lines=True)
    (run / "incidents.jsonl").write_text((run / "incidents.jsonl").read_text() + "{broken\n")
    text = write_report(run).read_text()
    assert "4 malformed line(s) in metrics.jsonl skipped" in text
    assert "1 malformed line(s) in incidents.jsonl" in text
    assert "| pretrain | loss | 2.9876 | 60 |" in text


def test_report_minimal_run_without_extras(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"stage": "pretrain", "step": s, "loss": 5.0 - s})
                                               + "\n" for s in range(3)))
    text = write_report(run).read_text()
    assert "No cost.json" in text and "| pretrain | loss | 3.0000 | 2 | 3.0000 | 2 |" in text
    assert (run / "loss.png").read_bytes()[:8] == PNG_SIGNATURE
    for name in ("throughput.png", "expert_load.png", "rl.png"):
        assert not (run / name).exists() and name not in text


def test_report_without_metrics_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(NanoseekError, match="metrics.jsonl"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nowhere" in err and "Traceback" not in err


def test_cli_report_prints_the_path(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run)
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.md")
