"""``nanoseek extend``: YaRN context extension (V3 report §4.3) on a tiny pretrained model.

The extended checkpoint must mean the same to ``transformers``: logits equal at a length past the
original context. The run is a training stage of its own (metrics, cost), from the checkpoint's tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import nanoseek
from nanoseek.config import ModelConfig, get_preset
from nanoseek.errors import ConfigError, NanoseekError
from nanoseek.train.extend import extend, yarn_extended
from nanoseek.train.pretrain import pretrain
from test_pretrain import make_corpus, run_cli

ORIGINAL = 32
FACTOR = 4
LONG = 100  # > ORIGINAL: positions the pretrained model never saw
TRAIN = dict(max_steps=3, batch_size=2, warmup_steps=1, checkpoint_every=3, eval_every=3, eval_batches=1,
             log_every=1, device="cpu")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("extend")
    config = root / "model.json"
    get_preset("tiny").replace(max_position_embeddings=ORIGINAL, vocab_size=320).save(config)
    run = root / "pretrain"
    pretrain(run, dict(config=str(config), data=[str(make_corpus(root / "corpus.txt"))], seq_len=ORIGINAL,
                       **TRAIN), log=lambda *_: None)
    return run / "final"


@pytest.fixture(scope="module")
def extended(pretrained) -> Path:
    run = pretrained.parent.parent / "extend"
    extend(run, dict(init_from=str(pretrained), data=[str(pretrained.parent.parent / "corpus.txt")],
                     factor=FACTOR, seq_len=2 * ORIGINAL, **TRAIN), log=lambda *_: None)
    return run


def test_yarn_config_as_v3_writes_it():
    base = get_preset("tiny").replace(max_position_embeddings=256)
    cfg = yarn_extended(base, 4)
    assert cfg.max_position_embeddings == 1024
    assert cfg.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
                                "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}
    # a second phase keeps the original context and may raise the factor
    again = yarn_extended(cfg, 8)
    assert again.rope_scaling["original_max_position_embeddings"] == 256 and again.max_position_embeddings == 2048
    assert yarn_extended(base, 2, original=128).max_position_embeddings == 256


@pytest.mark.parametrize("factor,original,match", [(1.0, None, "must be > 1"), (2.5, 33, "whole number"),
                                                    (4, 100, "contradicts")])
def test_yarn_config_refuses(factor, original, match):
    cfg = get_preset("tiny").replace(max_position_embeddings=256)
    if match == "contradicts":
        cfg = yarn_extended(cfg, 2)
    with pytest.raises(ConfigError, match=match):
        yarn_extended(cfg, factor, original)


def test_extended_checkpoint_config_and_stage(pretrained, extended):
    final = extended / "final"
    written = json.loads((final / "config.json").read_text())
    assert written["max_position_embeddings"] == ORIGINAL * FACTOR
    scaling = written["rope_scaling"]
    assert scaling["type"] == "yarn" and scaling["factor"] == FACTOR
    assert scaling["original_max_position_embeddings"] == ORIGINAL
    assert scaling["mscale"] == scaling["mscale_all_dim"] == 1.0
    # its own stage in metrics and cost; the checkpoint's tokenizer, not a new one trained on --data
    stages = {json.loads(line)["stage"] for line in (extended / "metrics.jsonl").read_text().splitlines()}
    assert stages == {"extend"}
    assert list(json.loads((extended / "cost.json").read_text())["stages"]) == ["extend"]
    assert (final / "tokenizer.json").read_bytes() == (pretrained / "tokenizer.json").read_bytes()
    # the weights moved (it trained) and every tensor is still there
    before, after = nanoseek.load(pretrained).state_dict(), nanoseek.load(final).state_dict()
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_extended_logits_equal_transformers_past_the_original_context(extended):
    transformers = pytest.importorskip("transformers")
    final = extended / "final"
    ours = nanoseek.load(final, dtype=torch.float32)
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(final, attn_implementation="eager").eval()
    assert theirs.config.max_position_embeddings == ORIGINAL * FACTOR
    x = torch.randint(0, ours.config.vocab_size, (2, LONG), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(x).logits.float(), theirs(x).logits.float()
    assert (a - b).abs().max().item() <= 1e-4
    # YaRN changed the model: the un-extended rotary frequencies give other logits at these lengths
    plain = ModelConfig.from_json(final).replace(rope_scaling=None, max_position_embeddings=ORIGINAL * FACTOR)
    unscaled = nanoseek.model.DeepSeekV3(plain)
    unscaled.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert (unscaled.eval()(x).logits - a).abs().max().item() > 1e-3


def test_extend_cli_errors(pretrained, extended, tmp_path):
    corpus = str(pretrained.parent.parent / "corpus.txt")
    res = run_cli("extend", "--data", corpus, "--factor", "4", "--out", str(tmp_path / "a"))
    assert res.returncode != 0 and "--init-from" in res.stderr
    res = run_cli("extend", "--init-from", str(pretrained), "--data", corpus, "--out", str(tmp_path / "b"))
    assert res.returncode != 0 and "--factor" in res.stderr
    res = run_cli("extend", "--init-from", str(pretrained), "--data", corpus, "--factor", "2", "--seq-len",
                  str(4 * ORIGINAL), "--out", str(tmp_path / "c"), "--device", "cpu")
    assert res.returncode != 0 and "exceeds the extended context" in res.stderr
    # a second phase that contradicts the first one's original context fails before any data work
    with pytest.raises(ConfigError, match="contradicts"):
        extend(tmp_path / "e", dict(init_from=str(pretrained.parent.parent / "extend" / "final"), factor=4,
                                    original_max_position_embeddings=2 * ORIGINAL, data=[corpus]))
    assert not (tmp_path / "e").exists()
    with pytest.raises(NanoseekError, match="--preset does not apply"):
        extend(tmp_path / "d", dict(init_from=str(pretrained), preset="tiny", factor=2, data=[corpus]))
