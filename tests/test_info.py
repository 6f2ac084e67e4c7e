"""Parameter, memory, KV-cache and FLOPs accounting of nanoseek.info against published figures."""

import math

import pytest
import torch

from nanoseek import get_preset
from nanoseek.info import _fp8_bytes, _Param, describe, format_info, training_flops_per_token
from nanoseek.model import DeepSeekV3


@pytest.fixture(scope="module")
def v3():
    return describe(get_preset("v3"))


def test_v3_matches_published_figures(v3):
    # DeepSeek-V3 report (arXiv 2412.19437): 671B total, 37B activated per token; the hub model
    # card: 685B = 671B main + 14B MTP, of which ~11.5B are the MTP module's own (embedding and
    # output head, 0.93B each, are shared with the main model).
    assert v3["total_params"] == pytest.approx(671e9, rel=0.005)
    assert v3["active_params"] == pytest.approx(37e9, rel=0.03)
    assert v3["mtp_params"] == pytest.approx(11.5e9, rel=0.03)
    assert v3["total_params"] + v3["mtp_params"] + v3["embedding_params"] + v3["lm_head_params"] \
        == pytest.approx(685e9, rel=0.005)
    assert v3["active_params"] - v3["active_params_no_embedding"] == 129280 * 7168


def test_v3_kv_cache(v3):
    assert v3["kv_latent_values_per_token_per_layer"] == 576  # kv_lora_rank 512 + rope 64
    assert v3["kv_latent_bytes_per_token_per_layer"] == 1152
    assert v3["kv_mha_values_per_token_per_layer"] == 128 * (192 + 128)
    assert v3["kv_latent_values_per_token"] == 576 * 61
    assert v3["kv_mha_bytes_per_token"] == 2 * 128 * 320 * 61
    assert v3["kv_cache_ratio"] == pytest.approx(40960 / 576)


def test_v3_weight_bytes(v3):
    assert v3["bf16_bytes"] == 2 * v3["total_params"]
    # FP8: about one byte per weight; the bf16 embedding/head/norms/router and the scales add ~1%.
    assert v3["total_params"] < v3["fp8_bytes"] < 1.01 * v3["total_params"]
    # The hub's FP8 checkpoint (685B weights) also stores the MTP module with its own copy of
    # embedding and head: just over a byte per weight in all.
    hub = v3["fp8_bytes"] + v3["mtp_fp8_bytes"] + 2 * 2 * v3["embedding_params"]
    assert 685e9 < hub < 1.01 * 685e9


def test_bench_preset_matches_design_notes():
    d = describe(get_preset("bench"))
    assert d["total_params"] == pytest.approx(1.69e9, rel=0.03)
    # The design notes' "0.29B active" leaves the embedding lookup out (LM head in), the same
    # count that their FLOPs formula uses; with the embedding it is 0.32B.
    assert d["active_params_no_embedding"] == pytest.approx(0.29e9, rel=0.03)
    assert d["mtp_params"] == 0


def test_bench_flops_reproduce_the_h100_anchor():
    # Design notes: 60.5K tokens/s at batch 8 x 2048 = 134.5 TFLOP/s on one H100.
    flops = training_flops_per_token(get_preset("bench"), seq_len=2048)
    assert flops * 60.5e3 == pytest.approx(134.5e12, rel=0.01)


def test_tiny_counts_equal_the_real_model():
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    model = DeepSeekV3(cfg)
    params = dict(model.named_parameters())
    main = sum(p.numel() for n, p in params.items() if not n.startswith("mtp."))
    mtp = sum(p.numel() for n, p in params.items() if n.startswith("mtp."))
    d = describe(cfg)
    assert d["total_params"] == main
    assert d["mtp_params"] == mtp
    assert describe(cfg, model=model) == d
    routed = sum(p.numel() for n, p in params.items()
                 if not n.startswith("mtp.") and ".mlp.experts." in n)
    assert d["routed_expert_params"] == routed
    k, e = cfg.num_experts_per_tok, cfg.n_routed_experts
    assert d["active_params"] == main - routed + routed * k // e


def test_tiny_training_flops_by_hand():
    cfg = get_preset("tiny")
    d = describe(cfg)
    norms = sum(p.numel() for n, p in DeepSeekV3(cfg).named_parameters()
                if not n.startswith("mtp.") and p.dim() == 1)
    matmul = d["active_params_no_embedding"] - norms
    seq = 128
    attention = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * seq * (cfg.qk_head_dim + cfg.v_head_dim)
    assert training_flops_per_token(cfg, seq) == pytest.approx(6 * matmul + attention)
    assert training_flops_per_token(cfg, seq, include_mtp=True) > training_flops_per_token(cfg, seq)


def test_fp8_bytes_count_partial_blocks():
    # A 144 x 256 weight has 2 x 2 blocks (the second row of blocks is partial).
    p = _Param("model.layers.0.self_attn.o_proj.weight", (144, 256), 144 * 256, "linear", False, True)
    assert _fp8_bytes(p) == 144 * 256 + 4 * 4
    # Stacked experts count as the hub stores them: separate gate and up grids per expert.
    shape = (3, 2 * 144, 256)
    p = _Param("model.layers.1.mlp.experts.gate_up_proj", shape, math.prod(shape), "routed", False, True)
    assert _fp8_bytes(p) == math.prod(shape) + 4 * 3 * 2 * (2 * 2)


def test_format_info_is_a_table(v3):
    text = format_info(v3, title="v3")
    assert text.splitlines()[0] == "v3"
    assert "671.03B" in text and "576 values" in text
