"""Device choice: auto falls back to the CPU, explicit unavailable or unknown devices error."""

import sys

import pytest
import torch

from nanoseek.device import autocast_dtype, cpu_computes_bf16_natively, device_name, pick_device, synchronize
from nanoseek.errors import NanoseekError


@pytest.fixture
def cpu_only(monkeypatch):
    """Pretend this machine has no accelerator of any kind."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if hasattr(torch, "xpu"):
        monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # `import torch_npu` raises ImportError


@pytest.mark.parametrize("pref", [None, "auto", "AUTO", ""])
def test_cpu_when_nothing_else(cpu_only, pref):
    assert pick_device(pref) == torch.device("cpu")


def test_auto_prefers_cuda(cpu_only, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device() == torch.device("cuda")


def test_explicit_cpu():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("cpu:0") == torch.device("cpu", 0)


@pytest.mark.parametrize("pref", ["cuda", "cuda:1", "xpu", "npu", "mps"])
def test_unavailable_device_is_named(cpu_only, pref):
    with pytest.raises(NanoseekError, match=pref.split(":")[0]):
        pick_device(pref)


@pytest.mark.parametrize("pref", ["tpu", "gpu", "cpu:x", "cpu:3"])
def test_unknown_device_errors(pref):
    with pytest.raises(NanoseekError):
        pick_device(pref)


def test_cpu_helpers():
    cpu = torch.device("cpu")
    assert autocast_dtype("xpu") == torch.bfloat16
    assert isinstance(device_name(cpu), str) and device_name(cpu)
    synchronize(cpu)  # no-op


@pytest.mark.parametrize("avx512_bf16, amx, capability, want", [
    (False, False, "AVX512", None),  # an AVX-512 CPU without bf16 dot products (Skylake-X): emulated, slow
    (True, False, "AVX512", torch.bfloat16),  # Zen 4, Cooper Lake
    (False, True, "AVX512", torch.bfloat16),  # Sapphire Rapids (AMX)
    (True, True, "AVX2", None),  # ATEN_CPU_CAPABILITY=avx2 caps torch's kernels below the bf16 ones
    (True, False, "DEFAULT", None),
])
def test_cpu_autocasts_to_bf16_only_where_it_computes_in_it_natively(monkeypatch, avx512_bf16, amx, capability, want):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert cpu_computes_bf16_natively() is (want is not None)
    assert autocast_dtype("cpu") == want
    assert autocast_dtype("cpu", "auto") == want
    assert autocast_dtype("cpu", "float32") is None  # an explicit choice wins over the chip
    assert autocast_dtype("cpu", "bfloat16") == torch.bfloat16


def test_explicit_precision_and_a_bad_one():
    assert autocast_dtype("xpu", "float32") is None
    assert autocast_dtype("mps", "bfloat16") == torch.bfloat16
    assert autocast_dtype("mps") is None  # float16 would need loss scaling
    with pytest.raises(NanoseekError, match="'fp16'.*auto, float32, bfloat16"):
        autocast_dtype("cpu", "fp16")
