"""nanoseek.hf: Hugging Face checkpoint import/export, checked against transformers' DeepseekV3ForCausalLM.

Tiny float32 models (vocab 128, hidden 64, 2-3 layers, 8 experts), batch 3 x 12 tokens.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import math
import os
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

import nanoseek  # noqa: E402
from nanoseek import hf  # noqa: E402
from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.errors import CheckpointError, ConfigError  # noqa: E402
from nanoseek.fp8 import quantize_weight_blockwise  # noqa: E402
from nanoseek.model import DeepSeekV3  # noqa: E402

ATOL = 1e-4
VOCAB, BATCH, SEQ = 128, 3, 12

BASE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
    n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
    kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
    max_position_embeddings=256, initializer_range=0.1, num_nextn_predict_layers=0,
    rope_interleave=True, tie_word_embeddings=False, attention_bias=False, routed_scaling_factor=2.5,
    norm_topk_prob=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)


def yarn(mscale: float, mscale_all_dim: float) -> dict:
    return {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
            "beta_fast": 32, "beta_slow": 1, "mscale": mscale, "mscale_all_dim": mscale_all_dim}


CASES = {
    # q-LoRA, YaRN with mscale != mscale_all_dim, interleaved RoPE, 4 groups keep 2, 1 dense layer
    "qlora-yarn-interleave": dict(rope_parameters=yarn(1.0, 0.8)),
    # plain q_proj, no YaRN, half-split RoPE, 2 dense layers
    "noqlora-rope-halfsplit": dict(q_lora_rank=None, rope_interleave=False, first_k_dense_replace=2),
    # YaRN + half-split, attention biases, tied embeddings, 2 groups keep 1, unnormalised top-k
    "qlora-yarn-halfsplit-bias-tied": dict(rope_parameters=yarn(0.707, 0.707), rope_interleave=False,
                                           attention_bias=True, tie_word_embeddings=True, n_group=2,
                                           topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0,
                                           num_hidden_layers=2),
    # plain q_proj + YaRN + interleave, no shared expert group limit (n_group 1), 3 experts per token
    "noqlora-yarn-interleave-top3": dict(q_lora_rank=None, rope_parameters=yarn(1.0, 0.8), n_group=1,
                                         topk_group=1, num_experts_per_tok=3),
}


def fields(case: str, **more) -> dict:
    d = dict(BASE)
    d.update(CASES[case])
    d.update(more)
    return d


def hf_model(d: dict, seed: int = 0) -> DeepseekV3ForCausalLM:
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**d)).eval()
    randomise(model, biases=[m.mlp.gate.e_score_correction_bias for m in model.model.layers
                             if hasattr(m.mlp, "gate")])
    return model


def our_model(d: dict, seed: int = 0) -> DeepSeekV3:
    torch.manual_seed(seed)
    model = DeepSeekV3(ModelConfig.from_dict(d)).eval()
    biases = [b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
    randomise(model, biases=biases)
    return model


@torch.no_grad()
def randomise(model: torch.nn.Module, biases: list[torch.Tensor]) -> None:
    """Norm weights != 1 and non-zero linear biases (so a swapped norm shows), and router biases with
    both signs (the old -inf vs 0 masking bug needs negative biases to show)."""
    for name, p in model.named_parameters():
        if p.dim() == 1:
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    assert biases, "expected MoE layers"
    for b in biases:
        b.copy_(torch.randn_like(b) * 0.5)
        assert (b < 0).any() and (b > 0).any()


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits_of(model, x: torch.Tensor) -> torch.Tensor:
    return model(x).logits.float()


def hf_from_pretrained(path: Path):
    model, info = DeepseekV3ForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                        output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["mismatched_keys"], info
    return model.eval(), info


def file_keys(path: Path) -> dict[str, tuple]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                out[k] = tuple(fh.get_slice(k).get_shape())
    return out


def quiet_save_pretrained(model, path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path, **kw)


# =============================================================================== parity
@pytest.mark.parametrize("case", list(CASES))
def test_hf_to_nanoseek_parity(case, tmp_path):
    ref = hf_model(fields(case))
    quiet_save_pretrained(ref, tmp_path)
    ours = nanoseek.load(tmp_path)
    assert not ours.training
    x = ids()
    a, b = logits_of(ref, x), logits_of(ours, x)
    assert a.shape == b.shape == (BATCH, SEQ, VOCAB)
    assert a.std() > 0.1  # not a trivially small signal
    assert (a - b).abs().max().item() <= ATOL
    for name, buf in ours.named_buffers():
        if name.endswith("e_score_correction_bias"):
            assert buf.dtype == torch.float32
    if fields(case)["tie_word_embeddings"]:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight


@pytest.mark.parametrize("case", list(CASES))
def test_nanoseek_to_hf_parity(case, tmp_path):
    ours = our_model(fields(case), seed=3)
    hf.save(ours, tmp_path)
    keys = file_keys(tmp_path)
    n_e = fields(case)["n_routed_experts"]
    last = fields(case)["num_hidden_layers"] - 1
    for j in range(n_e):
        for proj in ("gate", "up", "down"):
            assert f"model.layers.{last}.mlp.experts.{j}.{proj}_proj.weight" in keys
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in keys)
    assert ("lm_head.weight" in keys) == (not fields(case)["tie_word_embeddings"])
    ref, info = hf_from_pretrained(tmp_path)
    assert not info["unexpected_keys"], info
    x = ids(2)
    a, b = logits_of(ours, x), logits_of(ref, x)
    assert a.std() > 0.1
    assert (a - b).abs().max().item() <= ATOL
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["torch_dtype"] == "float32" and "quantization_config" not in cfg
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen["bos_token_id"] == cfg["bos_token_id"] and gen["eos_token_id"] == cfg["eos_token_id"]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as fh:
        assert fh.metadata() == {"format": "pt"}


def test_fused_expert_layout_from_transformers(tmp_path):
    """``save_pretrained(save_original_format=False)`` writes 3-D ``experts.gate_up_proj`` tensors."""
    ref = hf_model(fields("qlora-yarn-interleave"))
    quiet_save_pretrained(ref, tmp_path, save_original_format=False)
    keys = file_keys(tmp_path)
    assert keys["model.layers.2.mlp.experts.gate_up_proj"] == (8, 48, 64)
    assert keys["model.layers.2.mlp.experts.down_proj"] == (8, 64, 24)
    ours = nanoseek.load(tmp_path)
    x = ids()
    assert (logits_of(ref, x) - logits_of(ours, x)).abs().max().item() <= ATOL


def test_stacked_expert_layout(tmp_path):
    """Rows [0:I] of gate_up_proj are expert j's gate_proj, rows [I:2I] its up_proj."""
    ref = hf_model(fields("noqlora-rope-halfsplit"))
    quiet_save_pretrained(ref, tmp_path)
    ours = nanoseek.load(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as fh:
        gate = fh.get_tensor("model.layers.2.mlp.experts.5.gate_proj.weight")
        up = fh.get_tensor("model.layers.2.mlp.experts.5.up_proj.weight")
        down = fh.get_tensor("model.layers.2.mlp.experts.5.down_proj.weight")
    experts = ours.model.layers[2].mlp.experts
    assert torch.equal(experts.gate_up_proj[5, :24], gate)
    assert torch.equal(experts.gate_up_proj[5, 24:], up)
    assert torch.equal(experts.down_proj[5], down)


# =============================================================================== MTP
def test_mtp_roundtrip_and_transformers(tmp_path):
    d = fields("qlora-yarn-interleave", num_hidden_layers=2, num_nextn_predict_layers=1)
    ours = our_model(d, seed=5)
    hf.save(ours, tmp_path)
    keys = file_keys(tmp_path)
    emb_shape = (VOCAB, 64)
    assert keys["model.layers.2.embed_tokens.weight"] == emb_shape
    assert keys["model.layers.2.shared_head.head.weight"] == emb_shape
    for name in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight", "input_layernorm.weight",
                 "self_attn.kv_b_proj.weight", "mlp.experts.7.up_proj.weight", "mlp.gate.e_score_correction_bias"):
        assert f"model.layers.2.{name}" in keys, name
    assert keys["model.layers.2.eh_proj.weight"] == (64, 128)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as fh:
        assert torch.equal(fh.get_tensor("model.layers.2.embed_tokens.weight"), ours.model.embed_tokens.weight)
        assert torch.equal(fh.get_tensor("model.layers.2.shared_head.head.weight"), ours.lm_head.weight)

    # transformers ignores the MTP layer (reports it as unexpected) and matches our logits
    ref, info = hf_from_pretrained(tmp_path)
    assert info["unexpected_keys"] and all(k.startswith("model.layers.2.") for k in info["unexpected_keys"])
    x = ids()
    assert (logits_of(ours, x) - logits_of(ref, x)).abs().max().item() <= ATOL

    # nanoseek round trip: every tensor identical, MTP included
    back = nanoseek.load(tmp_path)
    assert len(back.mtp) == 1
    sd_a, sd_b = ours.state_dict(), back.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert any(k.startswith("mtp.0.block.mlp.experts.") for k in sd_a)
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    labels = torch.randint(0, VOCAB, (BATCH, SEQ))
    with torch.no_grad():
        la, lb = ours(x, labels=labels), back(x, labels=labels)
    assert torch.equal(la.mtp_loss, lb.mtp_loss)

    # a config without MTP ignores the stored MTP layer
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 0
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    plain = nanoseek.load(tmp_path)
    assert len(plain.mtp) == 0
    assert torch.equal(logits_of(plain, x), logits_of(ours, x))


def test_config_promises_mtp_but_checkpoint_has_none(tmp_path):
    """transformers never writes MTP weights, yet its config says num_nextn_predict_layers=1."""
    ref = hf_model(fields("noqlora-rope-halfsplit", num_nextn_predict_layers=1))
    quiet_save_pretrained(ref, tmp_path)
    with pytest.warns(UserWarning, match="no MTP weights"):
        ours = nanoseek.load(tmp_path)
    assert len(ours.mtp) == 0 and ours.config.num_nextn_predict_layers == 0
    x = ids()
    assert (logits_of(ref, x) - logits_of(ours, x)).abs().max().item() <= ATOL


# =============================================================================== sharding, dtype
def test_sharded_roundtrip_bit_exact(tmp_path):
    d = fields("qlora-yarn-interleave", num_nextn_predict_layers=1)
    ours = our_model(d, seed=7)
    hf.save(ours, tmp_path, max_shard_size="40KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    n = len(shards)
    assert n > 3 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    total = 0
    for shard in shards:
        assert (tmp_path / shard).stat().st_size <= 40_000 + 64 * 1024  # one tensor may overshoot a bit
        with safe_open(str(tmp_path / shard), "pt") as fh:
            for k in fh.keys():
                assert index["weight_map"][k] == shard
                t = fh.get_tensor(k)
                total += t.numel() * t.element_size()
    assert index["metadata"]["total_size"] == total
    back = nanoseek.load(tmp_path)
    sd_a, sd_b = ours.state_dict(), back.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    ref, _ = hf_from_pretrained(tmp_path)
    x = ids()
    assert (logits_of(ours, x) - logits_of(ref, x)).abs().max().item() <= ATOL


def test_parse_size():
    assert hf.parse_size(1234) == 1234
    assert hf.parse_size("500MB") == 500 * 10**6
    assert hf.parse_size("2GB") == 2 * 10**9
    assert hf.parse_size("1.5GiB") == int(1.5 * 2**30)
    assert hf.parse_size("40kb") == 40_000
    assert hf.parse_size("100") == 100
    for bad in ("lots", "-1GB", 0, "5 parsecs"):
        with pytest.raises(CheckpointError):
            hf.parse_size(bad)


def test_bf16_save_and_dtype_override(tmp_path):
    ours = our_model(fields("noqlora-rope-halfsplit"), seed=2)
    hf.save(ours, tmp_path, dtype="bfloat16")
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as fh:
        assert fh.get_tensor("model.layers.2.mlp.gate.e_score_correction_bias").dtype == torch.float32
        assert fh.get_tensor("model.layers.2.mlp.gate.weight").dtype == torch.bfloat16
    back = nanoseek.load(tmp_path)  # default: the checkpoint's dtype
    assert back.model.embed_tokens.weight.dtype == torch.bfloat16
    assert back.model.layers[2].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    bias = back.model.layers[2].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and torch.equal(bias, ours.model.layers[2].mlp.gate.e_score_correction_bias)
    as32 = nanoseek.load(tmp_path, dtype=torch.float32)
    assert as32.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(as32.model.embed_tokens.weight, ours.model.embed_tokens.weight.bfloat16().float())


# =============================================================================== FP8
def _manual_dequant(q: torch.Tensor, s: torch.Tensor, block: int = 128) -> torch.Tensor:
    out = torch.empty(q.shape)
    for bi in range(s.shape[0]):
        for bj in range(s.shape[1]):
            rows, cols = slice(bi * block, (bi + 1) * block), slice(bj * block, (bj + 1) * block)
            out[rows, cols] = q[rows, cols].float() * s[bi, bj]
    return out


def test_fp8_checkpoint_dequantised(tmp_path):
    # hidden 144 = 128 + 16: every weight touching the hidden size has a partial edge block.
    # Init std 0.006 as in DeepSeek-V3: with much larger random weights, E4M3 rounding (~2-3% per
    # matrix, compounding over ~8 matrices a layer) alone moves the logits by more than 2%.
    d = fields("qlora-yarn-interleave", hidden_size=144, num_hidden_layers=2, initializer_range=0.006)
    ref = hf_model(d)
    src = tmp_path / "fp8"
    quiet_save_pretrained(ref, src)
    file = src / "model.safetensors"
    with safe_open(str(file), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    fake_quant = dict(tensors)  # the same weights, dequantised independently of nanoseek.fp8
    quantised = []
    for k in list(tensors):
        t = tensors[k]
        skip = ("embed_tokens" in k or k.startswith("lm_head") or k.endswith("mlp.gate.weight") or "norm" in k)
        if t.dim() == 2 and k.endswith(".weight") and not skip:
            q, s = quantize_weight_blockwise(t, (128, 128))
            tensors[k], tensors[k + "_scale_inv"] = q, s
            fake_quant[k] = _manual_dequant(q, s)
            quantised.append(k)
    assert "model.layers.0.self_attn.o_proj.weight" in quantised  # [144, 64]
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in quantised
    save_file(tensors, str(file), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e4m3",
                                  "activation_scheme": "dynamic"}
    (src / "config.json").write_text(json.dumps(cfg))
    dq = tmp_path / "fake_quant"
    quiet_save_pretrained(ref, dq)
    save_file(fake_quant, str(dq / "model.safetensors"), metadata={"format": "pt"})
    ref_fq, _ = hf_from_pretrained(dq)

    ours = nanoseek.load(src)
    assert "quantization_config" not in ours.config.extra
    o_proj = ours.model.layers[0].self_attn.o_proj.weight
    assert o_proj.shape == (144, 64) and o_proj.dtype == torch.float32
    for key, w in (("model.layers.0.self_attn.o_proj.weight", o_proj),  # partial row block
                   ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight",  # [40, 144]: partial column block
                    ours.model.layers[0].self_attn.kv_a_proj_with_mqa.weight)):
        assert torch.equal(w, fake_quant[key]), key
    x = ids()
    a, b, c = logits_of(ref, x), logits_of(ours, x), logits_of(ref_fq, x)
    assert ((b - c).norm() / c.norm()).item() <= 1e-5  # exactly the dequantised model
    rel = ((a - b).norm() / a.norm()).item()
    assert 1e-3 < rel <= 0.02, rel  # FP8 changed something, but not much
    # and a dense re-save carries no quantisation config
    hf.save(ours, tmp_path / "dense")
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())


# =============================================================================== bad input
@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good")
    hf.save(our_model(fields("noqlora-rope-halfsplit", num_hidden_layers=2, first_k_dense_replace=1)), path)
    return path


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_error_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere"):
        nanoseek.load(tmp_path / "nowhere")


def test_error_missing_config(tmp_path, good_ckpt):
    ck = _copy(good_ckpt, tmp_path / "ck")
    (ck / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        nanoseek.load(ck)


def test_error_unknown_model_type(tmp_path, good_ckpt):
    ck = _copy(good_ckpt, tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="llama"):
        nanoseek.load(ck)


def test_error_no_safetensors(tmp_path, good_ckpt):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_bytes((good_ckpt / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match="no safetensors"):
        nanoseek.load(ck)


def test_error_pickle_weights_never_opened(tmp_path, good_ckpt, monkeypatch):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_bytes((good_ckpt / "config.json").read_bytes())
    (ck / "pytorch_model.bin").write_bytes(b"\x80\x04 garbage, not a pickle \x00\xff" * 10)
    opened = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, *a, **k):
        opened.append(str(file))
        return real_open(file, *a, **k)

    def spy_os_open(file, *a, **k):
        opened.append(str(file))
        return real_os_open(file, *a, **k)

    def no_torch_load(*a, **k):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)  # pathlib opens through io.open
    monkeypatch.setattr(os, "open", spy_os_open)
    monkeypatch.setattr(torch, "load", no_torch_load)
    with pytest.raises(CheckpointError, match="pickle-based weights are not loaded for safety; convert them "
                                              "to safetensors") as err:
        nanoseek.load(ck)
    assert "pytorch_model.bin" in str(err.value)
    assert any(p.endswith("config.json") for p in opened)  # the spy does see the files we read
    assert not [p for p in opened if p.endswith(".bin")]


def test_error_index_names_missing_shard(tmp_path):
    ck = tmp_path / "ck"
    hf.save(our_model(fields("noqlora-rope-halfsplit", num_hidden_layers=2, first_k_dense_replace=1)), ck,
            max_shard_size="30KB")
    shards = sorted(ck.glob("model-*.safetensors"))
    assert len(shards) >= 2
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=shards[1].name):
        nanoseek.load(ck)


def test_error_shape_mismatch_names_key_and_shapes(tmp_path, good_ckpt):
    ck = _copy(good_ckpt, tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        nanoseek.load(ck)
    msg = str(err.value)
    assert "'model.layers.0.mlp.down_proj.weight'" in msg and "[64, 96]" in msg and "[64, 80]" in msg, msg
    ck2 = _copy(good_ckpt, tmp_path / "ck2")
    cfg["intermediate_size"] = 96
    cfg["moe_intermediate_size"] = 20
    (ck2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        nanoseek.load(ck2)
    msg = str(err.value)
    assert "'model.layers.1.mlp.experts.0.down_proj.weight'" in msg and "[64, 24]" in msg and "[64, 20]" in msg, msg


def _rewrite(file: Path, drop=(), add=None) -> None:
    with safe_open(str(file), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys() if k not in drop}
    tensors.update(add or {})
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_error_missing_keys_strict_and_not(tmp_path, good_ckpt):
    ck = _copy(good_ckpt, tmp_path / "ck")
    gone = ["model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.experts.6.up_proj.weight"]
    _rewrite(ck / "model.safetensors", drop=gone)
    with pytest.raises(CheckpointError, match="missing") as err:
        nanoseek.load(ck)
    for k in gone:
        assert k in str(err.value)
    with pytest.warns(UserWarning, match="missing"):
        model = nanoseek.load(ck, strict=False)
    assert torch.isfinite(logits_of(model, ids())).all()
    good = nanoseek.load(good_ckpt)
    stacked, ref = model.model.layers[1].mlp.experts.gate_up_proj, good.model.layers[1].mlp.experts.gate_up_proj
    assert torch.equal(stacked[6, :24], ref[6, :24])  # expert 6's gate_proj is still the stored one
    assert torch.equal(stacked[:6], ref[:6]) and torch.equal(stacked[7:], ref[7:])
    assert 0 < stacked[6, 24:].std() < 1  # its up_proj got a fresh init, not garbage


def test_error_unexpected_keys_strict_and_not(tmp_path, good_ckpt):
    ck = _copy(good_ckpt, tmp_path / "ck")
    _rewrite(ck / "model.safetensors", add={"model.layers.0.mystery.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.layers\.0\.mystery\.weight"):
        nanoseek.load(ck)
    with pytest.warns(UserWarning, match="mystery"):
        model = nanoseek.load(ck, strict=False)
    ref = nanoseek.load(good_ckpt)
    assert torch.equal(logits_of(model, ids()), logits_of(ref, ids()))


# =============================================================================== atomic save
def _digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_crash_mid_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    d = fields("noqlora-rope-halfsplit", num_hidden_layers=2, first_k_dense_replace=1)
    first, second = our_model(d, seed=11), our_model(d, seed=12)
    target = tmp_path / "ckpt"
    hf.save(first, target)
    (target / "tokenizer.json").write_text("{}")
    before = _digest(target)

    real = safetensors.torch.save_file
    calls = []

    def crashing(*a, **k):
        calls.append(1)
        if len(calls) > 1:
            raise OSError("simulated crash: disk full")
        return real(*a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", crashing)
    with pytest.raises(OSError, match="simulated crash"):
        hf.save(second, target, max_shard_size="30KB")
    assert len(calls) == 2
    assert _digest(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dirs left behind
    back = nanoseek.load(target)
    for k, v in first.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k

    # a successful overwrite replaces the weights, keeps side files, drops the old weight files
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    hf.save(second, target, max_shard_size="30KB")
    names = sorted(p.name for p in target.iterdir())
    assert "model.safetensors" not in names and "tokenizer.json" in names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    back = nanoseek.load(target)
    for k, v in second.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_save_refuses_to_replace_unrelated_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="refusing"):
        hf.save(our_model(fields("noqlora-rope-halfsplit")), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_saved_tensors_do_not_share_storage(tmp_path, monkeypatch):
    seen = []
    real = safetensors.torch.save_file

    def spy(tensors, *a, **k):
        ptrs = [t.untyped_storage().data_ptr() for t in tensors.values()]
        assert len(set(ptrs)) == len(ptrs)
        assert all(t.is_contiguous() for t in tensors.values())
        seen.append(len(tensors))
        return real(tensors, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", spy)
    hf.save(our_model(fields("qlora-yarn-halfsplit-bias-tied", num_nextn_predict_layers=1)), tmp_path / "x")
    assert seen and math.prod(seen) > 0
