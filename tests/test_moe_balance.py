"""Auxiliary-loss-free balancing reaches every router, the MTP block's included (V3 report §2.1.2)."""

from __future__ import annotations

import random

import safetensors.torch
import torch

from nanoseek.config import get_preset
from nanoseek.model import DeepSeekV3
from nanoseek.model.moe import update_routing_bias
from nanoseek.train.pretrain import pretrain


def max_violation(load: torch.Tensor) -> float:
    """MaxVio (arXiv 2408.15664): (max load − mean load) / mean load of one router's token counts."""
    load = load.float()
    return ((load.max() - load.mean()) / load.mean()).item()


def test_expert_load_has_a_row_per_router_when_the_mtp_modules_run():
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    model = DeepSeekV3(cfg)
    routers = model.moe_routers()
    assert len(routers) == cfg.n_moe_layers + cfg.num_nextn_predict_layers  # tiny: the MTP block is MoE
    assert routers[-1] is model.mtp[0].block.mlp.gate
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        train_load = model(ids, labels=ids).expert_load
        infer_load = model(ids).expert_load
    assert train_load.shape == (len(routers), cfg.n_routed_experts)
    tokens = 2 * 9 * cfg.num_experts_per_tok
    # main layers see every position; the depth-1 MTP block sees all but the last of each row
    assert train_load.sum(-1).tolist() == [tokens] * cfg.n_moe_layers + [2 * 8 * cfg.num_experts_per_tok]
    assert infer_load.shape == (cfg.n_moe_layers, cfg.n_routed_experts)  # no labels: the MTP block did not run
    torch.testing.assert_close(infer_load, train_load[: cfg.n_moe_layers])


def test_a_skewed_mtp_router_is_balanced_by_the_bias_update():
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    model = DeepSeekV3(cfg).eval()
    mtp_router = model.mtp[0].block.mlp.gate
    with torch.no_grad():
        mtp_router.e_score_correction_bias[0] = 0.3  # expert 0 takes every token at first
    ids = torch.randint(0, cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))

    def step() -> torch.Tensor:
        with torch.no_grad():
            load = model(ids, labels=ids).expert_load
        routers = model.moe_routers()
        for router, row in zip(routers, load):  # as the trainers pair them
            update_routing_bias(router, row, 0.01)
        return load[[r is mtp_router for r in routers].index(True)]

    first = max_violation(step())
    assert first > 2.0, first  # expert 0 on every token: its load is 4× the mean of 8 experts, top-2
    for _ in range(60):
        last = step()
    bias = mtp_router.e_score_correction_bias
    assert (bias[0] - bias[1:].mean()).item() < 0.3 - 0.2  # expert 0's lead shrank; the others rose
    assert max_violation(last) < first / 2, (first, max_violation(last))


def test_pretraining_moves_the_mtp_routers_bias(tmp_path):
    rng = random.Random(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"carol has {rng.randint(1, 9)} books. count: "
                                + " ".join(str(j) for j in range(rng.randint(1, 9))) for _ in range(200)))
    out = tmp_path / "run"
    pretrain(out, {"preset": "tiny", "device": "cpu", "data": [str(corpus)], "max_steps": 4, "seq_len": 32,
                   "batch_size": 2, "checkpoint_every": 4, "eval_every": 4}, log=lambda *a, **k: None)
    weights = safetensors.torch.load_file(out / "final" / "model.safetensors")
    n_layers = get_preset("tiny").num_hidden_layers
    mtp_bias = weights[f"model.layers.{n_layers}.mlp.gate.e_score_correction_bias"]  # hub layout of mtp.0
    main_bias = weights[f"model.layers.{n_layers - 1}.mlp.gate.e_score_correction_bias"]
    assert main_bias.abs().max() > 0
    assert mtp_bias.abs().max() > 0, "the MTP block's router bias never moved"
