"""``benchmarks/ablations.py`` and ``benchmarks/context_extension.py`` with ``--smoke``: every study and
stage runs end to end on the tiny preset, and what they report is what the runs did (the dense variant
has the MoE's active parameters and no experts; dense-time trains for the MoE runs' wall-clock; the
extended model's config is YaRN's). Plus the specialisation score on known loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanoseek.config import ModelConfig
from nanoseek.info import describe

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.ablations import STUDIES, specialisation  # noqa: E402

TIMEOUT = 600


def run_script(name: str, out: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / name), "--out", str(out), "--smoke", *args],
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def ablations(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablations")
    proc = run_script("ablations.py", out, "--seeds", "0")
    return out, json.loads((out / "results.json").read_text()), proc.stdout


def test_every_study_reports_every_variant(ablations):
    out, res, stdout = ablations
    assert set(res["studies"]) == set(STUDIES)
    for study, variants in STUDIES.items():
        assert list(res["studies"][study]) == variants
        for recs in res["studies"][study].values():
            assert len(recs) == 1 and 0 < recs[0]["val_loss"] < 20
    mtp = res["studies"]["mtp"]
    assert 0 <= mtp["v3"][0]["acceptance"] <= 1 and "acceptance" not in mtp["no-mtp"][0]
    for study in STUDIES:
        assert f"| {study} |" in stdout and f"| {study} |" in (out / "tables.md").read_text()
    assert (out / "maxvio.png").stat().st_size > 0 and (out / "specialisation.png").stat().st_size > 0


def test_balancing_records_maxvio_and_load_by_kind(ablations):
    out, res, _ = ablations
    bal = res["studies"]["balancing"]
    for variant, (rec,) in bal.items():
        # the tiny preset: 2 layers, the first dense; the MTP block's router is trained (and balanced) too
        assert len(rec["max_vio_curve"][0][1]) == 2 and rec["max_vio"] >= 0
        kinds = rec["load_by_kind"]  # the main model's routers only
        assert set(kinds) == {"addition", "subtraction", "countdown"}  # difficulty 1: no multiplication
        assert all(len(v) == 1 and len(v[0]) == 8 for v in kinds.values())
        assert 0 <= rec["specialisation"] <= 1 and 0 <= rec["dead_experts"] <= 8
    config = json.loads((out / "runs" / "aux-loss" / "seed0" / "pretrain" / "train_config.json").read_text())
    assert config["bias_update_speed"] == 0 and config["aux_loss_alpha"] == 0.01


def test_dense_matches_active_parameters_and_wall_clock(ablations):
    out, res, _ = ablations
    runs = out / "runs"
    dense_cfg = ModelConfig.from_json(runs / "dense" / "seed0" / "model_config.json")
    assert dense_cfg.n_routed_experts == 0  # (its width is set for the cpu shape: the test below)
    rows = res["studies"]["moe-dense"]
    step_time = rows["dense"][0]["wall_seconds"] / rows["dense"][0]["steps"]
    assert rows["dense-time"][0]["steps"] == max(1, round(rows["v3"][0]["wall_seconds"] / step_time))
    assert "max_vio" not in rows["dense"][0]


def test_dense_intermediate_gives_the_cpu_shape_its_active_parameters():
    from benchmarks.ablations import DENSE_INTERMEDIATE, settings
    from nanoseek.config import get_preset

    cpu = get_preset("small").replace(vocab_size=512, **settings(False, None)["model"])
    dense = cpu.replace(n_routed_experts=0, intermediate_size=DENSE_INTERMEDIATE)
    ratio = describe(dense)["active_params"] / describe(cpu)["active_params"]
    assert abs(ratio - 1) < 0.01


def test_specialisation_score():
    same = {"a": [[1, 1, 2]], "b": [[2, 2, 4]]}
    assert specialisation(same) == pytest.approx(0.0)
    disjoint = {"a": [[4, 0]], "b": [[0, 4]]}  # each kind its own expert: TV to the mixture is 1/2
    assert specialisation(disjoint) == pytest.approx(0.5)


def test_context_extension_smoke(tmp_path):
    proc = run_script("context_extension.py", tmp_path)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["lengths"] == [64, 128, 256]
    assert list(res["rows"]) == ["pretrained", "YaRN config only", "extended ×4 (YaRN)"]
    for row in res["rows"].values():
        assert [r["length"] for r in row["passkey"]] == [32, *res["lengths"]]  # ½× the context first
        assert all(0 <= r["accuracy"] <= 1 for r in row["passkey"])
        # longer budgets hold longer prompts, each within its budget once a level fits
        tokens = [r["mean_prompt_tokens"] for r in row["passkey"]]
        assert tokens == sorted(tokens) and row["passkey"][-1]["max_prompt_tokens"] <= 256
    for name in ("yarn_only", "extend/final"):
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        assert cfg["rope_scaling"]["original_max_position_embeddings"] == 64 and cfg["max_position_embeddings"] == 256
    assert "extend" in res["cost"] and "| extended ×4 (YaRN) |" in proc.stdout
    for row in res["rows"].values():  # one mean loss per position band, all finite
        assert len(row["loss_by_position"]) == 3 and all(0 < v < 20 for v in row["loss_by_position"])
