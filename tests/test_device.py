"""Device choice: auto falls back to the CPU, explicit unavailable or unknown devices error."""

import sys

import pytest
import torch

from nanoseek.device import autocast_dtype, device_name, pick_device, synchronize
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
    assert autocast_dtype(cpu) is None  # float32 on the CPU keeps tests deterministic
    assert autocast_dtype("xpu") == torch.bfloat16
    assert isinstance(device_name(cpu), str) and device_name(cpu)
    synchronize(cpu)  # no-op
