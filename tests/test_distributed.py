"""Multi-process pretraining with FSDP2 on the CPU (gloo): ``torchrun --nproc_per_node 2 -m nanoseek pretrain``.

Two processes with batch 2 each must train like one process with batch 4 (the same global batch):
the gradient reduce-scatter averages over ranks and the expert load is summed before the bias
update, so only the floating-point summation order differs. Measured on the tiny preset (6 steps):
per-step losses agree to ~1e-7 relative, grad norms to ~5e-7, final weights to ~1e-6 absolute,
router biases exactly; the assertions below use 1e-4 relative (losses, grad norms) and
rtol 1e-4 / atol 1e-5 (weights, AdamW moments).

Checkpoints hold full (unsharded) state in the single-process format: a 2-process checkpoint
resumes in one process, a 2-process resume from a mid-run checkpoint reproduces the
uninterrupted run bit for bit, and ``nanoseek.load`` reads the model.

``torchrun`` is started as ``python -m torch.distributed.run`` (the same launcher, from this
interpreter), with ``--standalone`` (rendezvous on a free local port) and OMP_NUM_THREADS=1. Every
rank's stdout and stderr also go to a log file of its own (``--log-dir``, ``--tee 3``): when a run
fails, the assertion message quotes each rank's own output (a gloo abort's ``terminate called
after throwing ...`` line, and the Python stacks that ``PYTHONFAULTHANDLER`` prints on SIGABRT),
not only torchrun's summary ("exitcode: -6").
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import safetensors.torch
import torch

import nanoseek
from grpo_toy import tiny_policy

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
COMMON = ["--preset", "tiny", "--device", "cpu", "--max-steps", str(STEPS), "--seq-len", "32",
          "--grad-accum", "1", "--lr", "3e-3", "--warmup-steps", "2", "--checkpoint-every", "3",
          "--eval-every", "6", "--eval-batches", "2", "--log-every", "1", "--keep-last", "5",
          # float32: one process and two agree to float32 rounding; bf16 autocast (auto's choice on CPUs with
          # AVX512-BF16) rounds a batch of 2 and two batches of 1 differently
          "--precision", "float32"]


def _gloo_available() -> bool:
    try:
        import torch.distributed as d
    except ImportError:
        return False
    return d.is_available() and d.is_gloo_available()


pytestmark = pytest.mark.skipif(not _gloo_available(),
                                reason="this torch build has no torch.distributed with the gloo backend")


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for key in ("NANOSEEK_FAULT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["OMP_NUM_THREADS"] = "1"
    env["NANOSEEK_DIST_TIMEOUT_MIN"] = "2"  # a hung collective fails the test instead of stalling it
    env["PYTHONFAULTHANDLER"] = "1"  # a worker killed by a signal (SIGABRT, SIGSEGV) prints its threads' stacks
    env["TORCH_SHOW_CPP_STACKTRACES"] = "1"
    return env


def torchrun_cmd(nproc: int, log_dir: Path, *target: str) -> list[str]:
    """``torchrun --nproc_per_node nproc TARGET...``; each rank's stdout/stderr also go to files under ``log_dir``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "--log-dir", str(log_dir), "--tee", "3", *target]


def _tail(text: str, n: int) -> str:
    return text if len(text) <= n else "[...]" + text[-n:]


def worker_logs(log_dir: Path, n: int = 4000) -> str:
    """The end of every rank's own stderr and stdout (``<log_dir>/<run id>/attempt_<k>/<rank>/``)."""
    parts = []
    for rank_dir in sorted(p for p in log_dir.glob("*/attempt_*/*") if p.is_dir()):
        for name in ("stderr.log", "stdout.log"):
            path = rank_dir / name
            text = path.read_text(errors="replace") if path.is_file() else ""
            if text.strip():
                parts.append(f"----- rank {rank_dir.name}, {rank_dir.parent.name}: {name} -----\n{_tail(text, n)}")
    return "\n".join(parts) if parts else f"(no worker output under {log_dir})"


def _sources() -> dict[str, tuple[int, int]]:
    """(mtime, size) of every Python file the workers may import from this checkout."""
    seen = {}
    for path in [*(ROOT / "nanoseek").rglob("*.py"), *(ROOT / "tests").glob("*.py")]:
        try:
            st = path.stat()
        except OSError:  # removed since the listing: absent, like any file removed during the run
            continue
        seen[str(path.relative_to(ROOT))] = (st.st_mtime_ns, st.st_size)
    return seen


def launch(cmd: list[str], cwd: Path, timeout: int, log_dir: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` and fail the test unless it exits 0. The failure message holds the command, its
    exit status, the end of its own output and, for torchrun (``log_dir``), each rank's own output;
    it also names the source files that changed while the run went on (the ranks import the code
    separately: an edit between their imports makes them run different code, and gloo aborts a
    rank on the first collective whose sizes then differ). On a timeout torchrun gets SIGTERM
    first, so that it stops its workers (they run in sessions of their own) instead of leaving
    them behind."""
    before = _sources()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
        status = f"exit status {proc.returncode}"
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        status = f"timed out after {timeout} s (then exit status {proc.returncode})"
    res = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if proc.returncode != 0 or status.startswith("timed out"):
        msg = [f"{' '.join(cmd)}\n{status}",
               f"===== stdout =====\n{_tail(out, 3000)}", f"===== stderr =====\n{_tail(err, 3000)}"]
        if log_dir is not None:
            msg.append(f"===== each rank's own output ({log_dir}) =====\n{worker_logs(log_dir)}")
        after = _sources()
        changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
        if changed:
            msg.append(f"===== changed in the checkout during the run =====\n{', '.join(changed)}")
        pytest.fail("\n".join(msg), pytrace=False)
    return res


def run(nproc: int, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    """``nanoseek pretrain`` in one process (nproc 1) or under torchrun with ``nproc`` processes."""
    if nproc == 1:
        return launch([sys.executable, "-m", "nanoseek", "pretrain", *args], ROOT, timeout)
    log_dir = Path(tempfile.mkdtemp(prefix="nanoseek-torchrun-"))
    res = launch(torchrun_cmd(nproc, log_dir, "-m", "nanoseek", "pretrain", *args), ROOT, timeout, log_dir)
    shutil.rmtree(log_dir, ignore_errors=True)  # kept (and named in the message) when the run failed
    return res


def make_corpus(path: Path, n: int = 300) -> Path:
    import random

    rng = random.Random(0)
    names, things = ["alice", "bob", "carol", "dave", "erin", "frank"], ["apples", "books", "cards", "dogs"]
    lines = []
    for _ in range(n):
        who, what, k = rng.choice(names), rng.choice(things), rng.randint(1, 9)
        lines.append(f"{who} has {k} {what}. {who} gives the {what} to a friend. count: "
                     + " ".join(str(j) for j in range(k)))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def tensors(run_dir: Path, step: int) -> tuple[dict, dict]:
    c = ckpt(run_dir, step)
    return (safetensors.torch.load_file(c / "model" / "model.safetensors"),
            safetensors.torch.load_file(c / "optimizer.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A 2-process run (rank 0 trains the tokenizer and writes the shards; FSDP2 with activation
    checkpointing) and a 1-process run on its shards with the same global batch."""
    work = tmp_path_factory.mktemp("distributed")
    corpus = make_corpus(work / "corpus.txt")
    two, one = work / "two", work / "one"
    # activation checkpointing on the 2-process side only: the recomputation is exact, so the runs
    # still agree; the resumed runs below inherit it (a first forward under checkpointing)
    run(2, *COMMON, "--batch-size", "2", "--activation-checkpointing", "--data", str(corpus), "--out", str(two))
    run(1, *COMMON, "--batch-size", "4", "--data", str(two / "data"), "--tokenizer", str(two / "tokenizer"),
        "--out", str(one))
    return {"two": two, "one": one, "work": work}


def test_two_processes_train_like_one_with_the_same_global_batch(runs):
    two, one = metrics(runs["two"]), metrics(runs["one"])
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))  # rank 0 alone writes the metrics
    assert [r["step"] for r in one] == list(range(1, STEPS + 1))
    for a, b in zip(one, two):
        assert a["tokens"] == b["tokens"]  # tokens count all ranks: 2 x 2 x 32 per step
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a["step"], a["loss"], b["loss"])
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)  # the global norm
    assert two[-1]["loss"] < two[0]["loss"]

    m1, o1 = tensors(runs["one"], STEPS)
    m2, o2 = tensors(runs["two"], STEPS)
    assert m1.keys() == m2.keys() and o1.keys() == o2.keys()  # same on-disk layout
    for name in m1:
        assert torch.allclose(m2[name], m1[name], rtol=1e-4, atol=1e-5), name
    for name in o1:
        assert torch.allclose(o2[name], o1[name], rtol=1e-4, atol=1e-5), name
    biases = [name for name in m1 if name.endswith("e_score_correction_bias")]
    assert biases and any(m1[name].abs().sum() > 0 for name in biases)  # the bias update ran
    for name in biases:  # updated from the all-reduced load: exactly the single-process biases
        assert torch.equal(m2[name], m1[name]), name

    cost = json.loads((runs["two"] / "cost.json").read_text())["stages"]["pretrain"]
    assert cost["n_devices"] == 2 and cost["tokens"] == STEPS * 2 * 2 * 32
    assert not list(runs["two"].glob("checkpoints/*.tmp-*"))


def test_two_process_checkpoint_resumes_in_one_process_and_loads(runs):
    run_dir = runs["work"] / "two_then_one"
    shutil.copytree(runs["two"], run_dir)
    res = run(1, "--out", str(run_dir), "--resume", "--max-steps", str(STEPS + 2))
    assert f"resumed from {ckpt(run_dir, STEPS)}" in res.stdout
    recs = metrics(run_dir)
    assert [r["step"] for r in recs] == list(range(1, STEPS + 3))
    assert all(math.isfinite(r["loss"]) for r in recs[STEPS:])
    assert recs[-1]["loss"] < recs[0]["loss"]
    for path in (ckpt(runs["two"], STEPS), ckpt(run_dir, STEPS + 2)):
        model = nanoseek.load(path / "model", device="cpu", dtype=torch.float32)
        ids = torch.randint(0, model.config.vocab_size, (1, 8))
        assert torch.isfinite(model(ids).logits).all()
    m2, _ = tensors(runs["two"], STEPS)
    model = nanoseek.load(ckpt(runs["two"], STEPS) / "model", device="cpu", dtype=torch.float32)
    sd = model.state_dict()
    assert torch.equal(sd["model.embed_tokens.weight"], m2["model.embed_tokens.weight"])


def test_two_process_resume_from_a_mid_run_checkpoint_is_exact(runs):
    """Rank 0 reads the step-3 checkpoint, set_*_state_dict broadcasts and re-shards it: the
    continuation reproduces the uninterrupted 2-process run bit for bit."""
    run_dir = runs["work"] / "two_resumed"
    shutil.copytree(runs["two"], run_dir)
    shutil.rmtree(ckpt(run_dir, STEPS))
    run(2, "--out", str(run_dir), "--resume")
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, STEPS + 1))
    m_ref, o_ref = tensors(runs["two"], STEPS)
    m, o = tensors(run_dir, STEPS)
    assert all(torch.equal(m[k], m_ref[k]) for k in m_ref)
    assert all(torch.equal(o[k], o_ref[k]) for k in o_ref)


def test_a_failing_rank_is_quoted_in_the_failure_message(tmp_path):
    """A worker that aborts (SIGABRT, exit -6, as gloo's loop thread does on a collective mismatch)
    fails the run with that worker's own stderr in the message, its Python stack included."""
    script = tmp_path / "abort.py"
    script.write_text("import os, sys\n"
                      "rank = os.environ['RANK']\n"
                      "print(f'rank {rank} is up', file=sys.stderr, flush=True)\n"
                      "if rank == '1':\n"
                      "    print('rank 1 gives up: its own last words', file=sys.stderr, flush=True)\n"
                      "    os.abort()\n")
    log_dir = tmp_path / "torchrun-logs"
    with pytest.raises(pytest.fail.Exception) as failed:
        launch(torchrun_cmd(2, log_dir, str(script)), tmp_path, 120, log_dir)
    msg = str(failed.value)
    assert "each rank's own output" in msg and "----- rank 1, attempt_0: stderr.log -----" in msg
    assert "rank 1 gives up: its own last words" in msg
    assert "Fatal Python error: Aborted" in msg  # PYTHONFAULTHANDLER reached the worker
    assert "exitcode" in msg and "-6" in msg  # torchrun's own summary is kept too


def test_fsdp_helpers_against_an_unsharded_reference(tmp_path):
    """Broadcast of rank 0's init, global grad norm and clipping, summed expert load, identical
    router biases, and the check that catches a divergent buffer (see tests/dist_helpers.py)."""
    log_dir = tmp_path / "torchrun-logs"
    res = launch(torchrun_cmd(2, log_dir, str(ROOT / "tests" / "dist_helpers.py")), tmp_path, 300, log_dir)
    assert "rank 0 ok" in res.stdout and "rank 1 ok" in res.stdout, worker_logs(log_dir)


# ------------------------------------------------------------------------------ GRPO
def test_grpo_on_two_processes_updates_like_one(tmp_path):
    """GRPO under torchrun: the global prompts split over the ranks, each samples its share with the
    full weights, one update over the global batch. Every rank screens all the step's candidates
    (``screen_factor`` 2) and keeps the problems one process keeps; step 1 samples exactly what one
    process samples (same seeds per global prompt), so its screen and sample rewards are equal; the
    weight updates of 3 steps (final - initial: AdamW moves every weight by about lr per step, so
    compare the updates, not the weights) agree within 5% relative norm. A 2-process checkpoint
    resumes in one process and, exactly, in two."""
    init = tiny_policy(tmp_path / "init")
    worker = str(Path(__file__).with_name("grpo_dist_worker.py"))
    one, two = tmp_path / "one", tmp_path / "two"
    res = launch([sys.executable, worker, str(init), str(one)], ROOT, 240)
    assert res.returncode == 0, res.stderr[-3000:]
    log_dir = tmp_path / "torchrun-logs"
    res = launch(torchrun_cmd(2, log_dir, worker, str(init), str(two)), ROOT, 240, log_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    m1, m2 = metrics(one), metrics(two)
    assert [m["step"] for m in m2] == [1, 2, 3] and m2[0]["samples"] == m1[0]["samples"] == 16
    assert m2[0]["reward"] == m1[0]["reward"] and 0 < m1[0]["reward"] < 1
    assert m2[0]["screen_reward"] == m1[0]["screen_reward"] and 0 < m1[0]["screen_reward"]
    assert m2[0]["accuracy"] == m1[0]["accuracy"]
    start = safetensors.torch.load_file(str(init / "model.safetensors"))
    end1 = safetensors.torch.load_file(str(one / "final" / "model.safetensors"))
    end2 = safetensors.torch.load_file(str(two / "final" / "model.safetensors"))
    d1 = torch.cat([(end1[k] - start[k]).flatten() for k in sorted(start)])
    d2 = torch.cat([(end2[k] - start[k]).flatten() for k in sorted(start)])
    assert d1.norm() > 0
    assert (d2 - d1).norm() / d1.norm() < 0.05, float((d2 - d1).norm() / d1.norm())
    assert (two / "checkpoints" / "step_00000003").is_dir() and not (two / "incidents.jsonl").exists()

    # checkpoints are portable across world sizes and resume is exact: drop step 3 and resume from
    # step 2, in one process (the same update within 5%) and in two (bit-identical step-3 state)
    for nproc, name in ((1, "two_then_one"), (2, "two_resumed")):
        run_dir = tmp_path / name
        shutil.copytree(two, run_dir)
        shutil.rmtree(ckpt(run_dir, 3))
        cmd = [worker, "-", str(run_dir), "--resume"]
        if nproc == 1:
            res = launch([sys.executable, *cmd], ROOT, 240)
        else:
            res = launch(torchrun_cmd(2, tmp_path / f"logs-{name}", *cmd), ROOT, 240, tmp_path / f"logs-{name}")
        assert f"resumed from {ckpt(run_dir, 2)}" in res.stdout, res.stdout[-2000:]
        recs = metrics(run_dir)
        assert [r["step"] for r in recs] == [1, 2, 3] and recs[2]["reward"] == m2[2]["reward"]
    end = safetensors.torch.load_file(str(tmp_path / "two_then_one" / "final" / "model.safetensors"))
    d3 = torch.cat([(end[k] - start[k]).flatten() for k in sorted(start)])
    assert (d3 - d2).norm() / d2.norm() < 0.05, float((d3 - d2).norm() / d2.norm())
    m_ref, o_ref = tensors(two, 3)
    m, o = tensors(tmp_path / "two_resumed", 3)
    assert all(torch.equal(m[k], m_ref[k]) for k in m_ref) and all(torch.equal(o[k], o_ref[k]) for k in o_ref)
