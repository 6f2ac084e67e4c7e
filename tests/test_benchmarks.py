"""Smoke runs of benchmarks/train_throughput.py and benchmarks/decode.py on the CPU (tiny preset).

Both scripts run as subprocesses, started together (one thread each) so the two finish in about the
time of the slower one. Checked: the JSON has a row per implementation with positive tokens/s and a
ratio to transformers, and both implementations computed the same thing (same weights: equal first
training loss, equal greedy tokens).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--preset", "tiny", "--steps", "2", "--warmup", "1", "--device", "cpu"]
TIMEOUT = 240


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmds = {
        # --peak-size 1024: the MFU peak matmul at its CPU default (4096^3) alone takes seconds here
        "train": [sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), *COMMON,
                  "--json", str(out / "train.json"), "--peak-size", "1024"],
        "decode": [sys.executable, str(REPO / "benchmarks" / "decode.py"), *COMMON, "--json", str(out / "decode.json")],
    }
    procs = {k: subprocess.Popen(c, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k, c in cmds.items()}
    results = {}
    for name, proc in procs.items():
        try:
            text, _ = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            text, _ = proc.communicate()
        results[name] = (proc.returncode, text, out / f"{name}.json")
    return results


def load(runs, name: str) -> tuple[dict, str]:
    rc, text, path = runs[name]
    assert rc == 0, text[-4000:]
    return json.loads(path.read_text()), text


def test_train_throughput_smoke(runs):
    data, text = load(runs, "train")
    rows = {r["impl"]: r for r in data["rows"]}
    assert set(rows) == {"nanoseek", "transformers"}
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["tflops"] > 0 and r["peak_mem_bytes"] > 0
        assert r["ratio_vs_transformers"] > 0 and r["mfu"] > 0
        assert len(r["step_times_s"]) == 2
    assert rows["transformers"]["ratio_vs_transformers"] == pytest.approx(1.0)
    # same weights, same batch, same targets: the same loss before the first update
    assert rows["nanoseek"]["loss_first"] == pytest.approx(rows["transformers"]["loss_first"], rel=1e-4)
    assert data["precision"] == "fp32" and data["peak_tflops"] > 0
    for key in ("date", "device", "commit", "command"):
        assert data[key]
    assert "x transformers" in text and "MFU %" in text


def test_decode_smoke(runs):
    data, text = load(runs, "decode")
    impls = {r["impl"] for r in data["rows"]}
    assert impls == {"nanoseek", "transformers"}
    assert sorted({r["batch"] for r in data["rows"]}) == [1, 4]
    for r in data["rows"]:
        assert r["tokens_per_s"] > 0 and r["ratio_vs_transformers"] > 0
        # float32, identical weights: greedy outputs agree token for token
        assert r["token_match"] > 0.9
    assert "x transformers" in text
