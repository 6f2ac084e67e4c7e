"""Checkpoint integrity (issue 13 items 5 and 6): no non-finite weights on disk, content hashes
verified on load, one clear error naming a damaged file, and resume falls back to the newest
checkpoint that verifies.

The unit tests save the ``tiny`` preset directly; the end-to-end tests share one short CPU run
(4 steps, a checkpoint every 2) and work on copies of it.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

import nanoseek
from nanoseek.errors import CheckpointError, NanoseekError
from nanoseek.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_model,
    publish_final,
    read_trainer_state,
    restore_model,
    restore_optimizer,
    restore_rng,
    save_checkpoint,
)
from nanoseek.train.config import TrainConfig
from nanoseek.train.optim import build_optimizer


def _tiny(seed: int = 0):
    torch.manual_seed(seed)
    model = nanoseek.DeepSeekV3(nanoseek.get_preset("tiny"))
    opt = build_optimizer(model, TrainConfig(preset="tiny"), torch.device("cpu"))
    ids = torch.randint(0, 512, (2, 17))
    model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def _step(root: Path, step: int) -> Path:
    return root / "checkpoints" / f"step_{step:08d}"


def _overwrite(file: Path, offset: int, data: bytes) -> None:
    with open(file, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def _truncate(file: Path, keep: float = 0.5) -> None:
    size = file.stat().st_size
    with open(file, "r+b") as fh:
        fh.truncate(int(size * keep))


def _all_finite(ckpt: Path) -> bool:
    weights = safetensors.torch.load_file(ckpt / "model" / "model.safetensors")
    moments = safetensors.torch.load_file(ckpt / "optimizer.safetensors")
    return all(torch.isfinite(t).all() for t in list(weights.values()) + list(moments.values())
               if t.is_floating_point())


@pytest.fixture()
def two_checkpoints(tmp_path):
    model, opt = _tiny()
    for step in (1, 2):
        save_checkpoint(tmp_path, step, model, opt, {"note": "x"}, None, keep_last=5)
    return tmp_path, model, opt


# ----------------------------------------------------------------------------- item 6: damaged files
def test_weight_file_overwritten_with_0xff_is_refused_naming_the_file(two_checkpoints):
    root, model, _ = two_checkpoints
    weights = _step(root, 2) / "model" / "model.safetensors"
    _overwrite(weights, weights.stat().st_size // 2, b"\xff" * 4096)  # 1024 float32 NaNs, same size
    with pytest.raises(CheckpointError, match=r"model[/\\]model\.safetensors"):
        load_model(_step(root, 2))
    with pytest.raises(CheckpointError, match=r"model[/\\]model\.safetensors"):
        restore_model(model, _step(root, 2))
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())  # nothing copied in
    logs = []
    assert latest_checkpoint(root, log=logs.append) == _step(root, 1)  # falls back to the intact one
    assert any("step_00000002" in line and "model.safetensors" in line for line in logs), logs


@pytest.mark.parametrize("name", ["optimizer.safetensors", "optimizer.json"])
def test_truncated_optimizer_file_is_one_clear_error(two_checkpoints, name):
    root, model, opt = two_checkpoints
    _truncate(_step(root, 2) / name)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        restore_optimizer(opt, _step(root, 2))
    assert latest_checkpoint(root, log=lambda s: None) == _step(root, 1)
    restore_optimizer(opt, _step(root, 1))  # the older one still loads


@pytest.mark.parametrize("name", ["rng.safetensors", "rng.json"])
def test_truncated_rng_file_is_one_clear_error(two_checkpoints, name):
    root, _, _ = two_checkpoints
    _truncate(_step(root, 2) / name)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        restore_rng(_step(root, 2))
    restore_rng(_step(root, 1))


def test_damaged_trainer_state_is_named(two_checkpoints):
    root, _, _ = two_checkpoints
    state = _step(root, 2) / "trainer_state.json"
    state.write_bytes(state.read_bytes().replace(b'"step": 2', b'"step": 9'))  # valid JSON, wrong content
    with pytest.raises(CheckpointError, match=r"trainer_state\.json"):
        read_trainer_state(_step(root, 2))
    (_step(root, 1) / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match=r"trainer_state\.json"):
        read_trainer_state(_step(root, 1))
    assert [p.name for p in list_checkpoints(root)] == ["step_00000001", "step_00000002"]  # still listed
    with pytest.raises(CheckpointError, match=r"trainer_state\.json"):  # nothing intact: an error, not None
        latest_checkpoint(root, log=lambda s: None)


def test_manifest_is_checked_itself(two_checkpoints):
    root, _, _ = two_checkpoints
    manifest = _step(root, 2) / "manifest.json"
    data = json.loads(manifest.read_text())
    data["files"]["../../../etc/hostname"] = {"bytes": 1, "sha256": "0" * 64}
    manifest.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"manifest\.json is malformed.*outside"):
        restore_rng(_step(root, 2))
    assert latest_checkpoint(root, log=lambda s: None) == _step(root, 1)
    manifest.unlink()  # trainer_state.json says there was one: not taken for an old, unverifiable checkpoint
    with pytest.raises(CheckpointError, match=r"manifest\.json is missing"):
        restore_rng(_step(root, 2))
    assert latest_checkpoint(root, log=lambda s: None) == _step(root, 1)


def test_publish_final_refuses_a_damaged_checkpoint(two_checkpoints):
    root, _, _ = two_checkpoints
    publish_final(root, _step(root, 1))
    before = (root / "final" / "model.safetensors").read_bytes()
    weights = _step(root, 2) / "model" / "model.safetensors"
    _overwrite(weights, weights.stat().st_size // 2, b"\xff" * 4096)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        publish_final(root, _step(root, 2))
    assert (root / "final" / "model.safetensors").read_bytes() == before  # the published one stays
    assert not list(root.glob("final.*"))


# ----------------------------------------------------------------------------- item 5: non-finite weights
def test_nonfinite_weights_are_never_saved_and_keep_last_keeps_the_good_one(tmp_path):
    model, opt = _tiny()
    save_checkpoint(tmp_path, 1, model, opt, {}, None, keep_last=1)
    with torch.no_grad():
        model.model.embed_tokens.weight[:3, :8] = float("nan")
    with pytest.raises(CheckpointError) as exc:
        save_checkpoint(tmp_path, 2, model, opt, {}, None, keep_last=1)
    msg = str(exc.value)
    assert "model.embed_tokens.weight" in msg and "24 of" in msg, msg
    assert "step_00000001" in msg  # where the last good one is
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]
    assert latest_checkpoint(tmp_path) == _step(tmp_path, 1) and _all_finite(_step(tmp_path, 1))


def test_nonfinite_optimizer_state_is_never_saved(tmp_path):
    model, opt = _tiny()
    next(iter(opt.state.values()))["exp_avg_sq"].view(-1)[0] = float("inf")
    with pytest.raises(CheckpointError, match="1 of"):
        save_checkpoint(tmp_path, 1, model, opt, {}, None)
    assert not (tmp_path / "checkpoints" / "step_00000001").exists()


def test_publish_final_refuses_nonfinite_weights(tmp_path):
    """A checkpoint from before the content hashes (no manifest) whose weights are NaN is not published."""
    model, _ = _tiny()
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    ckpt = _step(tmp_path, 3)
    nanoseek.save(model, ckpt / "model")
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 3}))
    with pytest.raises(CheckpointError, match=r"lm_head\.weight") as exc:
        publish_final(tmp_path, ckpt)
    n = model.lm_head.weight.numel()
    assert f"{n:,} of" in str(exc.value) or f"{n} of" in str(exc.value)
    assert not (tmp_path / "final").exists() and not list(tmp_path.glob("final.*"))


# ----------------------------------------------------------------------------- end to end
def _corpus(path: Path) -> Path:
    rng = random.Random(0)
    lines = [f"{rng.choice(['alice', 'bob', 'carol'])} has {rng.randint(1, 9)} {rng.choice(['apples', 'eggs'])}. "
             "count: " + " ".join(str(j) for j in range(rng.randint(1, 9))) for _ in range(300)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


TRAIN = dict(preset="tiny", device="cpu", max_steps=4, seq_len=32, batch_size=2, grad_accum=1, lr=3e-3,
             warmup_steps=2, checkpoint_every=2, eval_every=6, eval_batches=1, keep_last=5, vocab_size=512)


def _no_report(mp: pytest.MonkeyPatch) -> None:
    import nanoseek.report

    mp.setattr(nanoseek.report, "write_report", lambda run_dir: None)  # plots are not under test here


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints 0, 2, 4 (and final/)."""
    from nanoseek.train.pretrain import pretrain

    root = tmp_path_factory.mktemp("integrity")
    run = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        _no_report(mp)
        pretrain(run, dict(TRAIN, data=[str(_corpus(root / "corpus.txt"))]), log=lambda s: None)
    assert [p.name for p in list_checkpoints(run)][-1] == "step_00000004"
    return run


@pytest.fixture()
def no_report(monkeypatch):
    _no_report(monkeypatch)


def _copy(base: Path, dst: Path) -> Path:
    shutil.copytree(base, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def _resume(run: Path, **over):
    from nanoseek.train.pretrain import pretrain

    lines: list[str] = []
    out = pretrain(run, over, resume=True, log=lines.append)
    return out, lines


def test_truncated_newest_falls_back_to_the_older_verified_checkpoint(base_run, tmp_path, no_report):
    run = _copy(base_run, tmp_path / "run")
    _truncate(_step(run, 4) / "model" / "model.safetensors")
    out, lines = _resume(run)
    text = "\n".join(lines)
    skipped = [line for line in lines if "step_00000004" in line and "model.safetensors" in line]
    assert skipped and "truncated" in skipped[0], text
    assert "resumed from" in text and "step_00000002" in text, text
    assert out["step"] == 4 and _all_finite(_step(run, 4))
    load_model(_step(run, 4))  # rewritten whole
    assert nanoseek.load(run / "final") is not None


def test_lost_trainer_state_of_newest_falls_back_with_a_message(base_run, tmp_path, no_report):
    run = _copy(base_run, tmp_path / "run")
    (_step(run, 4) / "trainer_state.json").unlink()
    out, lines = _resume(run)
    assert any("step_00000004" in line and "trainer_state.json" in line for line in lines), lines
    assert any("resumed from" in line and "step_00000002" in line for line in lines), lines
    assert out["step"] == 4


def test_lost_trainer_state_never_restarts_from_step_0(base_run, tmp_path, no_report):
    from nanoseek.train.pretrain import pretrain

    run = _copy(base_run, tmp_path / "run")
    for ckpt in list_checkpoints(run):
        (ckpt / "trainer_state.json").unlink()
    metrics = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(NanoseekError, match="--resume"):  # not "starting over there"
        pretrain(run, dict(TRAIN, data=[str(base_run.parent / "corpus.txt")]), log=lambda s: None)
    with pytest.raises(CheckpointError, match=r"trainer_state\.json"):
        _resume(run)
    assert (run / "metrics.jsonl").read_bytes() == metrics and len(list_checkpoints(run)) == 3


def test_injected_nan_weights_are_never_checkpointed_or_published(base_run, tmp_path, monkeypatch, no_report):
    """Weights that turn NaN on a checkpoint step (past the guard, which sees only the loss and the
    gradient norm) are refused at the save: the run rolls back to the last good checkpoint, which
    keep_last=1 did not prune, and finishes with finite checkpoints and final/."""
    from nanoseek.train import pretrain as pt

    real_apply = pt.Trainer._apply
    fired = []

    def apply(self, step_index, load):
        out = real_apply(self, step_index, load)
        if step_index == 3 and not fired:  # the update of step 4, the last one (a checkpoint step)
            fired.append(step_index)
            with torch.no_grad():
                self.model.model.embed_tokens.weight[:2] = float("nan")
        return out

    monkeypatch.setattr(pt.Trainer, "_apply", apply)
    run = tmp_path / "run"
    lines: list[str] = []
    out = pt.pretrain(run, dict(TRAIN, keep_last=1, data=[str(base_run / "data")],
                                tokenizer=str(base_run / "tokenizer")), log=lines.append)
    assert fired and out["step"] == 4
    ckpts = list_checkpoints(run)
    assert [p.name for p in ckpts] == ["step_00000004"] and all(_all_finite(p) for p in ckpts)
    final = nanoseek.load(run / "final").state_dict()
    assert all(torch.isfinite(t).all() for t in final.values() if t.is_floating_point())
    incidents = [json.loads(line) for line in (run / "incidents.jsonl").read_text().splitlines()]
    weights = [i for i in incidents if i["kind"] == "nonfinite" and "embed_tokens" in i["detail"]]
    assert weights and weights[0]["step"] == 4 and weights[0]["action"] == "rollback", incidents
    rollbacks = [i for i in incidents if i["kind"] == "rollback"]
    assert rollbacks and rollbacks[0]["to_step"] == 2  # the good checkpoint keep_last=1 kept
    assert math.isfinite(json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["loss"])
