"""``benchmarks/gpu_check.sh --smoke`` on the CPU: its training benchmark (tiny preset), its decode
benchmark (tiny preset with MTP) and its summary table, and the estimators of
benchmarks/grpo_gradient_noise.py on known vectors and a tiny policy.

Checked: each JSON has a row per implementation with positive tokens/s and a ratio to transformers,
both implementations computed the same thing (same weights: equal first training loss, equal greedy
tokens, speculation changing no greedy token), and the script ends with the table of ratios and
targets. (The compiled rows are left out here: compiling takes minutes on 2 cores; the engine's
tests check compiled against eager decoding.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nanoseek

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import grpo_gradient_noise  # noqa: E402
from test_grpo import init_ckpt  # noqa: E402,F401  (a tiny random policy with its tokenizer)
TIMEOUT = 600


@pytest.fixture(scope="module")
def gpu_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out), "--smoke"], cwd=out,
                          env=env, capture_output=True, text=True, timeout=TIMEOUT)
    return proc, out


def load(gpu_check, name: str) -> dict:
    proc, out = gpu_check
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = json.loads((out / f"{name}.status.json").read_text())
    assert status["exit_code"] == 0, (out / f"{name}.log").read_text()[-4000:]
    return json.loads((out / f"{name}.json").read_text())


def test_train_throughput_smoke(gpu_check):
    data = load(gpu_check, "train")
    rows = {r["impl"]: r for r in data["rows"]}
    assert set(rows) == {"nanoseek", "nanoseek-fp8", "nanoseek-muon", "transformers"}
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["tflops"] > 0 and r["peak_mem_bytes"] > 0
        assert r["ratio_vs_transformers"] > 0 and r["mfu"] > 0
        assert len(r["step_times_s"]) == 2 and r["first_step_s"] > 0
    assert rows["transformers"]["ratio_vs_transformers"] == pytest.approx(1.0)
    # same weights, same batch, same targets: the same loss before the first update
    assert rows["nanoseek"]["loss_first"] == pytest.approx(rows["transformers"]["loss_first"], rel=1e-4)
    assert rows["nanoseek-fp8"]["loss_first"] == pytest.approx(rows["nanoseek"]["loss_first"], rel=1e-2)
    # the optimizer only acts after the first loss
    assert rows["nanoseek-muon"]["loss_first"] == rows["nanoseek"]["loss_first"]
    assert rows["nanoseek-muon"]["optimizer"] == "muon + adamw" and rows["nanoseek"]["optimizer"] != "muon + adamw"
    assert data["precision"] == "fp32" and data["peak_tflops"] > 0
    for key in ("date", "device", "commit", "command"):
        assert data[key]


def test_decode_smoke(gpu_check):
    data = load(gpu_check, "decode")
    assert {r["impl"] for r in data["rows"]} == {"nanoseek", "nanoseek-mtp", "transformers"}
    assert sorted({r["batch"] for r in data["rows"]}) == [1, 2]
    for r in data["rows"]:
        assert r["tokens_per_s"] > 0 and r["ratio_vs_transformers"] > 0
        # float32, identical weights: greedy outputs agree token for token, with speculation too
        assert r["token_match"] > 0.9 and r["match_plain"] == 1.0
    mtp = [r for r in data["rows"] if r["impl"] == "nanoseek-mtp"]
    assert all(r["acceptance_rate"] is not None for r in mtp)


def test_gpu_check_ends_with_the_summary_table(gpu_check):
    proc, out = gpu_check
    assert proc.returncode == 0, proc.stdout[-3000:]
    tail = proc.stdout[proc.stdout.index("measured"):]
    for line in ("train: best nanoseek / transformers", "decode batch 1: best nanoseek / transformers",
                 "decode batch 1: MTP / plain"):
        assert line in tail
    assert (out / "tests.status.json").is_file() and (out / "env.txt").read_text().startswith("torch")


# ----------------------------------------------------------------------------- GRPO gradient noise
def test_noise_statistics_recover_a_known_signal_to_noise_ratio():
    gen = torch.Generator().manual_seed(0)
    dim, k = 20_000, 40
    signal = torch.randn(dim, generator=gen)
    signal /= signal.norm()                                            # |G|² = 1
    noise = torch.randn(k, dim, generator=gen) * (4.0 / dim ** 0.5)    # E|n|² = 16 per estimate
    stats = grpo_gradient_noise.noise_statistics(signal + noise, batch_samples=64)
    assert stats["signal_norm_sq"] == pytest.approx(1.0, abs=0.15)
    assert stats["noise_to_signal"] == pytest.approx(4.0, rel=0.1)
    assert stats["b_simple_samples"] == pytest.approx(64 * 16, rel=0.2)
    assert stats["mean_pairwise_cosine"] == pytest.approx(1 / 17, abs=0.02)
    # summing 20 estimates per half: cos = 20²/(20² + 20·16)
    assert stats["halves_cosine"] == pytest.approx(400 / 720, abs=0.08) and stats["halves_samples"] == 20 * 64
    pure_noise = grpo_gradient_noise.noise_statistics(noise, batch_samples=64)
    assert abs(pure_noise["mean_pairwise_cosine"]) < 0.01 and pure_noise["noise_to_signal"] > 10
    with pytest.raises(ValueError, match="at least 2"):
        grpo_gradient_noise.noise_statistics(noise[:1], batch_samples=64)


def test_gradient_noise_of_a_tiny_policy(init_ckpt):  # noqa: F811
    from nanoseek.tasks import REWARDS, register_reward

    # a reward with variance inside every group, so that the policy gradient is not zero
    register_reward("text_length_parity", lambda prompt, completion, fields: float(len(completion) % 2),
                    overwrite=True)
    try:
        stats = grpo_gradient_noise.measure(str(init_ckpt), "arithmetic:1", steps=3, prompts=2, group_size=4,
                                            max_tokens=8, reward="text_length_parity", seed=0, device="cpu")
    finally:
        REWARDS.pop("text_length_parity")
    assert stats["estimates"] == 3 and stats["batch_samples"] == 8 and stats["halves_samples"] == 8
    assert stats["signal_norm_sq"] + stats["noise_norm_sq"] > 0  # mean |g|² of the three batches
    assert -1.0 <= stats["mean_pairwise_cosine"] <= 1.0
    names = [row["param"] for row in stats["largest_gradients"]]
    assert len(names) == 5 and all(row["mean_norm"] > 0 for row in stats["largest_gradients"])
    assert set(names) <= {n for n, _ in nanoseek.load(init_ckpt).named_parameters()}


def test_r1_tables_student_is_half_the_teacher_and_the_table_aggregates_seeds():
    import r1_tables
    from nanoseek.config import get_preset
    from nanoseek.model.model import DeepSeekV3
    from nanoseek.speedrun import PRESETS

    teacher_fields = PRESETS["cpu"].model
    student_fields = r1_tables.student_model(teacher_fields)
    assert (student_fields["hidden_size"], student_fields["num_hidden_layers"], student_fields["qk_rope_head_dim"]) \
        == (teacher_fields["hidden_size"] // 2, teacher_fields["num_hidden_layers"] // 2, 8)
    assert student_fields["n_routed_experts"] == teacher_fields["n_routed_experts"]
    sizes = [DeepSeekV3(get_preset("small").replace(vocab_size=512, **f)).num_parameters()
             for f in (teacher_fields, student_fields)]
    assert sizes[1] < sizes[0] / 4
    # the student's lr follows the optimizer: AdamW's own, Muon the teacher's (measured, see STUDENT_LR)
    assert r1_tables.student_lr(dict(PRESETS["cpu"].pretrain, optimizer="adamw")) == r1_tables.STUDENT_LR["adamw"]
    assert r1_tables.student_lr(dict(PRESETS["cpu"].pretrain, optimizer="muon", lr=3e-3)) == 3e-3

    rows = [dict(seed=s, stage=stage, accuracy=acc, mean_length=length, seconds=60.0 * (s + 1))
            for s, stage, acc, length in [(0, "base", 0.70, 70), (1, "base", 0.80, 80),
                                          (0, "grpo_from_base", 0.75, 74), (1, "grpo_from_base", 0.85, 76)]]
    lines = r1_tables.table(rows).splitlines()
    assert "seeds 0, 1" in lines[0]
    # mean ± sample sd of (70%, 80%): 75.0% ± 7.1%; mean length 75; each seed's minutes
    assert "| SFT-only | base | 75.0% ± 7.1% | 70.0% / 80.0% | 75 | 1.0 / 2.0 |" in lines
    assert "| R1-Zero | grpo_from_base | 80.0% ± 7.1% | 75.0% / 85.0% | 75 | 1.0 / 2.0 |" in lines
    assert not any("student" in line for line in lines)  # stages without rows are left out
