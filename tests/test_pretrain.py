"""Pretraining: schedules, parameter groups, checkpoints, the loop, exact resume after SIGKILL, guard drills.

The end-to-end runs use the ``tiny`` preset on the CPU with 32-token sequences; one reference run
trains the tokenizer and the shards, the others reuse its shard directory.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import nanoseek
from nanoseek.cli import main
from nanoseek.errors import CheckpointError
from nanoseek.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    restore_optimizer,
    save_checkpoint,
)
from nanoseek.train.config import TrainConfig
from nanoseek.train.guard import GuardConfig
from nanoseek.train.optim import bias_speed_at, build_optimizer, lr_at, mtp_weight_at, param_groups

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 12
COMMON = ["--preset", "tiny", "--device", "cpu", "--max-steps", str(MAX_STEPS), "--seq-len", "32",
          "--batch-size", "2", "--grad-accum", "2", "--lr", "3e-3", "--warmup-steps", "2",
          "--checkpoint-every", "4", "--eval-every", "6", "--eval-batches", "2", "--keep-last", "5"]


def run_cli(*args, env_extra=None, timeout=240):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("NANOSEEK_FAULT", None)
    env["OMP_NUM_THREADS"] = "1"  # frugal on shared CI cores; bit-identity holds for any fixed thread count
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "nanoseek", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def make_corpus(path: Path, n: int = 300) -> Path:
    rng = random.Random(0)
    names = ["alice", "bob", "carol", "dave", "erin", "frank"]
    things = ["apples", "books", "cards", "dogs", "eggs", "flowers"]
    lines = []
    for _ in range(n):
        who, what, k = rng.choice(names), rng.choice(things), rng.randint(1, 9)
        lines.append(f"{who} has {k} {what}. {who} gives the {what} to a friend. count: "
                     + " ".join(str(j) for j in range(k)))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_tensors(run: Path, step: int = MAX_STEPS) -> dict[str, torch.Tensor]:
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    out = {f"model.{k}": v for k, v in safetensors.torch.load_file(ckpt / "model" / "model.safetensors").items()}
    out.update({f"optim.{k}": v for k, v in safetensors.torch.load_file(ckpt / "optimizer.safetensors").items()})
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pretrain")


@pytest.fixture(scope="module")
def reference(workdir) -> Path:
    """An uninterrupted run that trains its own tokenizer and shards from a text corpus."""
    corpus = make_corpus(workdir / "corpus.txt")
    run = workdir / "ref"
    res = run_cli("pretrain", *COMMON, "--data", str(corpus), "--out", str(run))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return run


# ----------------------------------------------------------------------------- unit tests
def test_lr_schedule_warmup_cosine_floor():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=110)
    assert cfg.min_lr == pytest.approx(1e-4)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(0.5 * (1e-3 + 1e-4))
    assert lr_at(110, cfg) == pytest.approx(1e-4) and lr_at(500, cfg) == pytest.approx(1e-4)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(5, TrainConfig(lr=1e-3, warmup_steps=0, max_steps=10, min_lr=0.0)) < 1e-3


def test_bias_speed_and_mtp_weight_schedules():
    cfg = TrainConfig(max_steps=1000, bias_update_speed=0.001, bias_update_stop_fraction=0.1,
                      mtp_loss_weight=0.3, mtp_loss_weight_late=0.1, mtp_switch_fraction=0.68)
    assert bias_speed_at(0, cfg) == 0.001 and bias_speed_at(899, cfg) == 0.001
    assert bias_speed_at(900, cfg) == 0.0 and bias_speed_at(999, cfg) == 0.0
    assert mtp_weight_at(0, cfg) == 0.3 and mtp_weight_at(679, cfg) == 0.3
    assert mtp_weight_at(680, cfg) == 0.1 and mtp_weight_at(999, cfg) == 0.1


def test_train_config_json_round_trip(tmp_path):
    cfg = TrainConfig(preset="tiny", data=["a.txt"], betas=(0.8, 0.9), seed=3,
                      guard=GuardConfig(on_spike="rollback", max_rollbacks=5))
    cfg.save(tmp_path / "c.json")
    back = TrainConfig.load(tmp_path / "c.json")
    assert back == cfg and back.betas == (0.8, 0.9) and isinstance(back.guard, GuardConfig)
    with pytest.raises(nanoseek.ConfigError, match="bogus"):
        TrainConfig.from_dict({"bogus": 1})


def test_param_groups_no_decay_on_norms_and_biases():
    model = nanoseek.DeepSeekV3(nanoseek.get_preset("tiny"))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all("norm" in n or n.endswith("bias") for n in no_decay["names"]), no_decay["names"]
    assert any(n.endswith("layernorm.weight") for n in no_decay["names"])
    assert "model.embed_tokens.weight" in decay["names"] and "lm_head.weight" in decay["names"]
    assert any(n.endswith("mlp.experts.gate_up_proj") for n in decay["names"])
    assert any(n.endswith("mlp.gate.weight") for n in decay["names"])
    assert not any("e_score_correction_bias" in n for n in decay["names"] + no_decay["names"])
    n_params = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_params
    decay2, no_decay2 = param_groups(model, 0.1, decay_embeddings=False)
    assert "model.embed_tokens.weight" in no_decay2["names"] and "lm_head.weight" in decay2["names"]


# ----------------------------------------------------------------------------- checkpoints
def _tiny_state(tmp_path):
    torch.manual_seed(0)
    model = nanoseek.DeepSeekV3(nanoseek.get_preset("tiny"))
    cfg = TrainConfig(preset="tiny")
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    ids = torch.randint(0, 512, (2, 17))
    model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
    opt.step()
    return model, opt


def test_checkpoint_round_trip_and_pruning(tmp_path):
    model, opt = _tiny_state(tmp_path)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, {"note": "x"}, None, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    (tmp_path / "checkpoints" / "step_00000004.tmp-999").mkdir()  # a crash leftover
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step_00000003"
    assert not (tmp_path / "checkpoints" / "step_00000004.tmp-999").exists()
    loaded = nanoseek.load(latest / "model")
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    opt2 = build_optimizer(loaded, TrainConfig(preset="tiny"), torch.device("cpu"))
    restore_optimizer(opt2, latest)
    want, got = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert list(want) == list(got)
    for i in want:
        assert want[i].keys() == got[i].keys() and all(torch.equal(want[i][k], got[i][k]) for k in want[i])


def test_enospc_during_checkpoint_keeps_last_good(tmp_path, monkeypatch):
    model, opt = _tiny_state(tmp_path)
    save_checkpoint(tmp_path, 1, model, opt, {}, None)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(CheckpointError) as exc:
        save_checkpoint(tmp_path, 2, model, opt, {}, None)
    msg = str(exc.value)
    assert "step_00000002" in msg and os.strerror(errno.ENOSPC) in msg
    assert "step_00000001" in msg and "intact" in msg
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    nanoseek.load(tmp_path / "checkpoints" / "step_00000001" / "model")


# ----------------------------------------------------------------------------- end to end
def test_loss_falls_and_run_outputs(reference):
    metrics = read_metrics(reference)
    steps = [m for m in metrics if m["action"] in ("ok", "warn")]
    assert [m["step"] for m in steps] == list(range(1, MAX_STEPS + 1))
    first = steps[0]["lm_loss"]
    last5 = sum(m["lm_loss"] for m in steps[-5:]) / 5
    assert last5 < first - 0.5, (first, last5)
    for key in ("stage", "step", "loss", "lm_loss", "mtp_loss", "aux_loss", "lr", "grad_norm", "tokens",
                "tokens_per_s", "tflops", "expert_load_max_over_mean", "dead_experts", "peak_mem_bytes",
                "mtp_weight", "bias_speed", "elapsed"):
        assert key in steps[-1], key
    assert "mfu" not in steps[-1]  # no known bf16 peak on a CPU
    assert steps[-1]["tokens"] == MAX_STEPS * 2 * 2 * 32 and steps[0]["stage"] == "pretrain"
    vals = [m for m in metrics if "val_loss" in m]
    assert [m["step"] for m in vals] == [6, 12] and all(math.isfinite(m["val_loss"]) for m in vals)
    cost = json.loads((reference / "cost.json").read_text())
    stage = cost["stages"]["pretrain"]
    assert stage["device_hours"] > 0 and "usd" in stage and stage["tokens"] == MAX_STEPS * 128
    if (ROOT / "nanoseek" / "report.py").exists():
        assert (reference / "report.md").is_file()
    model = nanoseek.load(reference / "checkpoints" / f"step_{MAX_STEPS:08d}" / "model")
    assert model.config.vocab_size % 64 == 0
    assert (reference / "checkpoints" / f"step_{MAX_STEPS:08d}" / "model" / "tokenizer.json").is_file()


def test_precision_setting_chooses_the_autocast(reference, workdir):
    """``--precision bfloat16`` trains under CPU bf16 autocast (master weights stay float32),
    ``float32`` without: the log says which, the first loss differs by rounding only, and the
    choice is stored in train_config.json."""
    first = {}
    for precision, says in (("float32", "autocast off (float32)"), ("bfloat16", "autocast torch.bfloat16")):
        run = workdir / f"precision_{precision}"
        res = run_cli("pretrain", *COMMON, "--max-steps", "3", "--data", str(reference / "data"),
                      "--tokenizer", str(reference / "tokenizer"), "--precision", precision, "--out", str(run))
        assert res.returncode == 0, res.stderr[-3000:]
        assert says in res.stdout + res.stderr
        assert json.loads((run / "train_config.json").read_text())["precision"] == precision
        first[precision] = read_metrics(run)[0]["lm_loss"]
        weights = safetensors.torch.load_file(run / "checkpoints" / "step_00000003" / "model" / "model.safetensors")
        assert {t.dtype for t in weights.values()} == {torch.float32}
    assert first["float32"] != first["bfloat16"]
    assert first["bfloat16"] == pytest.approx(first["float32"], rel=0.02)


def test_a_cpu_run_from_before_the_precision_setting_resumes_in_float32(reference, tmp_path):
    """A train_config.json without ``precision`` was written when CPU training was always float32:
    resuming it keeps float32 even where ``auto`` now picks bf16; a saved or given value wins."""
    from nanoseek.train.pretrain import resolve_config

    run = tmp_path / "old"
    shutil.copytree(reference, run)
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["precision"] == "auto" and saved["device"] == "cpu"
    assert resolve_config(run, {}, resume=True, log=lambda *_: None).precision == "auto"
    del saved["precision"]
    (run / "train_config.json").write_text(json.dumps(saved))
    assert resolve_config(run, {}, resume=True, log=lambda *_: None).precision == "float32"
    given = resolve_config(run, {"precision": "bfloat16"}, resume=True, log=lambda *_: None)
    assert given.precision == "bfloat16"


def test_sigkill_and_resume_is_bit_identical(reference, workdir):
    run = workdir / "killed"
    args = ["pretrain", *COMMON, "--data", str(reference / "data"), "--tokenizer", str(reference / "tokenizer"),
            "--out", str(run)]
    # 1) killed between checkpoints: just before step 6 (step 4's checkpoint is the latest)
    res = run_cli(*args, env_extra={"NANOSEEK_FAULT": "kill_at_step:6"})
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert latest_checkpoint(run, cleanup=False).name == "step_00000004"
    # 2) resumed, then killed half-way through writing step 8's checkpoint
    res = run_cli(*args, "--resume", env_extra={"NANOSEEK_FAULT": "kill_in_checkpoint:8"})
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert list((run / "checkpoints").glob("step_00000008.tmp-*")), "expected a half-written checkpoint"
    assert not (run / "checkpoints" / "step_00000008").exists()
    assert latest_checkpoint(run, cleanup=False).name == "step_00000004"
    nanoseek.load(run / "checkpoints" / "step_00000004" / "model")  # the last good one still loads
    # 3) resumed to the end
    res = run_cli(*args, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert not list((run / "checkpoints").glob("*.tmp-*"))
    want, got = final_tensors(reference), final_tensors(run)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), f"{name} differs after kill + resume"
    ref_losses = [(m["step"], m["loss"]) for m in read_metrics(reference)]
    assert [(m["step"], m["loss"]) for m in read_metrics(run)] == ref_losses
    cost = json.loads((run / "cost.json").read_text())["stages"]["pretrain"]
    assert cost["segments"] >= 2


def test_nan_drill_rolls_back_and_finishes(reference, workdir):
    run = workdir / "poison"
    res = run_cli("pretrain", *COMMON, "--data", str(reference / "data"), "--out", str(run),
                  env_extra={"NANOSEEK_FAULT": "nan_loss:6"})
    assert res.returncode == 0, res.stderr[-3000:]
    incidents = [json.loads(line) for line in (run / "incidents.jsonl").read_text().splitlines()]
    nonfinite = [i for i in incidents if i["kind"] == "nonfinite"]
    assert nonfinite and nonfinite[0]["step"] == 6 and nonfinite[0]["action"] == "rollback"
    rollbacks = [i for i in incidents if i["kind"] == "rollback"]
    assert rollbacks and rollbacks[0]["to_step"] == 4
    metrics = read_metrics(run)
    assert any(m["action"] == "rollback" and m["step"] == 6 for m in metrics)
    assert metrics[-1]["step"] == MAX_STEPS and math.isfinite(metrics[-1]["loss"])
    assert (run / "checkpoints" / f"step_{MAX_STEPS:08d}").is_dir()
    model = nanoseek.load(run / "checkpoints" / f"step_{MAX_STEPS:08d}" / "model")
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())


# ----------------------------------------------------------------------------- bad input
def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if line.startswith("error: ")]
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def test_bad_inputs_exit_2(reference, workdir, tmp_path, capsys):
    base = ["pretrain", "--preset", "tiny", "--device", "cpu", "--max-steps", "2", "--seq-len", "32"]
    assert main([*base, "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "r1")]) == 2
    _one_line_error(capsys, "missing.txt", "does not exist")

    (tmp_path / "empty.txt").write_text("")
    assert main([*base, "--data", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "r2")]) == 2
    _one_line_error(capsys, "empty")

    (tmp_path / "small.txt").write_text("hello world\n")
    assert main([*base, "--data", str(tmp_path / "small.txt"), "--tokenizer", str(reference / "tokenizer"),
                 "--out", str(tmp_path / "r3")]) == 2
    _one_line_error(capsys, "too small", "seq_len=32")

    nanoseek.get_preset("tiny").replace(vocab_size=128).save(tmp_path / "config.json")
    assert main(["pretrain", "--config", str(tmp_path / "config.json"), "--data", str(reference / "data"),
                 "--tokenizer", str(reference / "tokenizer"), "--out", str(tmp_path / "r4"),
                 "--device", "cpu"]) == 2
    _one_line_error(capsys, "vocab", "128")

    assert main([*base, "--data", str(workdir / "corpus.txt"), "--out", str(tmp_path / "r5"), "--resume"]) == 2
    _one_line_error(capsys, "--resume", "no checkpoint")

    assert main(["pretrain", *COMMON, "--lr", "1e-3", "--data", str(workdir / "corpus.txt"),
                 "--out", str(reference)]) == 2
    _one_line_error(capsys, "different config", "lr")

    assert main(["pretrain", *COMMON, "--data", str(workdir / "corpus.txt"), "--out", str(reference),
                 "--resume", "--seq-len", "64"]) == 2
    _one_line_error(capsys, "--resume", "seq_len")


def test_on_nan_warn_is_refused(tmp_path, capsys):
    """--on-nan warn would apply a NaN/inf update to the weights (issue 13 item 5): refused, with the reason."""
    assert main(["pretrain", "--preset", "tiny", "--data", str(tmp_path / "x.txt"), "--out", str(tmp_path / "r"),
                 "--on-nan", "warn"]) == 2
    err = capsys.readouterr().err
    assert "--on-nan" in err and "'warn'" in err and "skip, lr_down or rollback" in err, err
    assert not (tmp_path / "r").exists()


def test_bad_input_subprocess_is_one_line(tmp_path):
    res = run_cli("pretrain", "--preset", "tiny", "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "r"))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nope.txt" in lines[0]


def test_tensorboard_missing_is_a_clear_error(reference, tmp_path, capsys):
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorboard is installed")
    assert main(["pretrain", "--preset", "tiny", "--device", "cpu", "--data", str(reference / "data"),
                 "--out", str(tmp_path / "tb"), "--tensorboard"]) == 2
    _one_line_error(capsys, "tensorboard", "pip install")
