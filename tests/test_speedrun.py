"""The main job end to end: a reduced speedrun (preset "tiny") through every stage, as CI runs it."""

import json
import os
import subprocess
import sys

import pytest
import torch

import nanoseek
from nanoseek.device import autocast_dtype
from nanoseek.speedrun import best_stage


@pytest.fixture(scope="module")
def speedrun_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("speedrun") / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "nanoseek", "speedrun", "--preset", "tiny", "--out", str(run),
                          "--device", "cpu", "--seed", "3"], capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return run, res.stdout


def test_every_stage_ran_and_was_scored(speedrun_dir):
    run, out = speedrun_dir
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["stages"]) == ["pretrain", "sft", "grpo"]
    assert json.loads((run / "pretrain" / "train_config.json").read_text())["optimizer"] == "muon"  # the preset's
    assert summary["optimizer"] == "muon"
    chip = autocast_dtype("cpu")  # auto: bf16 autocast on CPUs that compute in it natively, float32 elsewhere
    assert summary["training_precision"] == ("bfloat16" if chip == torch.bfloat16 else "float32")
    for stage, row in summary["stages"].items():
        held_out = json.loads((run / f"eval_{stage}.json").read_text())
        assert row["accuracy"] == held_out["accuracy"] and 0.0 <= row["accuracy"] <= 1.0
        assert 0.0 <= row["format_rate"] <= 1.0
        assert row["device_hours"] > 0 and row["usd"] == pytest.approx(row["device_hours"] * 2.0)
    assert summary["stages"]["sft"]["accuracy_gain"] == pytest.approx(
        summary["stages"]["sft"]["accuracy"] - summary["stages"]["pretrain"]["accuracy"])
    cost = json.loads((run / "cost.json").read_text())
    assert set(cost["stages"]) >= {"pretrain", "sft", "grpo", "eval"}
    assert cost["total"]["usd"] == pytest.approx(sum(s["usd"] for s in cost["stages"].values()))


def test_corpus_and_cold_start_mix_worked_solutions_with_bare_answers(speedrun_dir):
    """The preset's answer_only_fraction reaches both the pretraining corpus and the cold-start set."""
    run, _ = speedrun_dir
    docs = [json.loads(line)["text"] for line in (run / "corpus.jsonl").read_text().splitlines()]
    bare = [d for d in docs if "<think>The answer is " in d]
    assert json.loads((run / "summary.json").read_text())["answer_only_fraction"] == 0.6
    assert len(docs) == 600 and 300 <= len(bare) <= 420
    assert all(d.count("\n") == 1 for d in bare) and all(d.count("\n") > 1 for d in docs if d not in bare)
    turns = [json.loads(line)["messages"][2]["content"]
             for line in (run / "sft" / "cold_start.jsonl").read_text().splitlines()]
    assert len(turns) == 64 and 0 < sum(t.startswith("<think>The answer is ") for t in turns) < 64


def test_report_card_holds_the_measured_numbers(speedrun_dir):
    run, _ = speedrun_dir
    report = (run / "report.md").read_text()
    cost = json.loads((run / "cost.json").read_text())
    assert f"{cost['total']['usd']:.4f}"[:5] in report or f"{cost['total']['usd']:.2f}" in report
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stages = {json.loads(line)["stage"] for line in (run / "metrics.jsonl").read_text().splitlines()}
    assert stages == {"pretrain", "sft", "grpo"}


def test_final_checkpoint_is_servable_and_the_run_says_how(speedrun_dir):
    run, out = speedrun_dir
    final = run / "final"
    model = nanoseek.load(final)
    summary = json.loads((run / "summary.json").read_text())
    chosen = summary["final_stage"]  # the best chat stage on the validation split, not the test split
    validation = summary["validation_accuracy"]
    assert set(validation) == {"sft", "grpo"} and chosen == best_stage(validation)
    assert (final / "model.safetensors").read_bytes() == (run / chosen / "final" / "model.safetensors").read_bytes()
    assert f"final model: the {chosen} stage's" in out
    assert (final / "tokenizer.json").is_file()
    assert model.config.num_nextn_predict_layers == 1
    assert f"nanoseek chat --ckpt {final}" in out and f"nanoseek serve --ckpt {final}" in out


def test_best_stage_takes_the_highest_validation_accuracy_and_the_later_stage_on_a_tie():
    assert best_stage({"sft": 0.80, "grpo": 0.78}) == "sft"
    assert best_stage({"sft": 0.80, "grpo": 0.81}) == "grpo"
    assert best_stage({"sft": 0.80, "grpo": 0.80}) == "grpo"
    assert best_stage({"extend": 0.5, "sft": 0.5, "grpo": 0.4}) == "sft"


def test_answer_only_override_is_checked_before_any_work(tmp_path, capsys):
    from nanoseek.cli import main

    assert main(["speedrun", "--preset", "tiny", "--out", str(tmp_path / "run"), "--answer-only", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "--answer-only" in err and "1.5" in err and not (tmp_path / "run").exists()



def test_extend_adds_the_context_extension_stage(tmp_path):
    """``--extend``: YaRN extension between pretraining and SFT, scored and costed as its own stage,
    and the SFT starts from the extended model. (Two flags ride along: the tiny preset has an MTP
    module, and ``--no-mtp`` removes it from every stage's model; ``--optimizer adamw`` replaces the
    preset's Muon in the pretraining stage only; ``--precision float32`` reaches every training stage.)"""
    run = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "nanoseek", "speedrun", "--preset", "tiny", "--out", str(run),
                          "--device", "cpu", "--extend", "--no-mtp", "--optimizer", "adamw",
                          "--precision", "float32"], capture_output=True,
                         text=True, timeout=900,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "stage 2/4: context extension" in res.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["stages"]) == ["pretrain", "extend", "sft", "grpo"]
    assert summary["stages"]["extend"]["device_hours"] > 0
    cost = json.loads((run / "cost.json").read_text())
    assert cost["stages"]["extend"]["tokens"] == 2 * 256  # 2 steps of one 256-token sequence
    for stage in ("extend", "sft", "grpo"):  # the longer context carries through to the final model
        config = json.loads((run / stage / "final" / "config.json").read_text())
        assert config["rope_scaling"]["factor"] == 2 and config["max_position_embeddings"] == 2 * 128
        assert config["num_nextn_predict_layers"] == 0
    assert len(nanoseek.load(run / "final").mtp) == 0
    assert "| extend |" in (run / "report.md").read_text()
    optimizers = {stage: json.loads((run / stage / "train_config.json").read_text())["optimizer"]
                  for stage in ("pretrain", "extend", "sft")}
    assert optimizers == {"pretrain": "adamw", "extend": "adamw", "sft": "adamw"}
    precisions = {stage: json.loads((run / stage / "train_config.json").read_text())["precision"]
                  for stage in ("pretrain", "extend", "sft")}
    assert precisions == dict.fromkeys(("pretrain", "extend", "sft"), "float32")
    assert summary["training_precision"] == "float32"
