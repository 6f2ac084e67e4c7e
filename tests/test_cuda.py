"""What only a CUDA device can check: the same model on CUDA as on the CPU, the compiled (CUDA-graph)
decode step against the eager one, bf16 grouped GEMMs against the per-expert loop, and a compiled
training step. Skipped without CUDA; ``benchmarks/gpu_check.sh`` runs them on a GPU machine."""

from __future__ import annotations

import pytest
import torch

import nanoseek
from nanoseek.infer import Engine, SamplingParams
from nanoseek.model import DeepSeekV3
from nanoseek.model.moe import grouped_matmul

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def tiny_model(**changes) -> DeepSeekV3:
    torch.manual_seed(0)
    return DeepSeekV3(nanoseek.get_preset("tiny").replace(**changes)).eval()


def test_forward_on_cuda_equals_the_cpu():
    model = tiny_model()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
        model.to(CUDA)
        got = model(ids.to(CUDA)).logits.cpu()
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("speculative", [None, "mtp"])
def test_cuda_graph_decode_gives_the_eager_tokens(speculative):
    model = tiny_model().to(CUDA)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(10, 512, (n,), generator=g).tolist() for n in (3, 9, 14, 5, 7)]
    params = [SamplingParams(temperature=0, max_tokens=12), SamplingParams(temperature=0.8, max_tokens=12, seed=4)] * 3
    outs = []
    for compile in (False, True):
        eng = Engine(model, max_slots=8, max_seq_len=64, speculative=speculative, compile=compile, eos_token_ids=[])
        outs.append([c.token_ids for c in eng.generate(prompts, params[:5])])
        assert eng.decode_step.compiled == compile
    assert outs[0] == outs[1]


def test_bf16_grouped_mm_matches_the_loop():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 64, generator=g).to(CUDA, torch.bfloat16)
    w = torch.randn(8, 32, 64, generator=g).to(CUDA, torch.bfloat16)
    counts = torch.tensor([5, 0, 12, 3, 0, 10, 6, 4], device=CUDA)
    want = grouped_matmul(x.float(), w.float(), counts, impl="loop")
    got = grouped_matmul(x, w, counts, impl="grouped_mm").float()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_compiled_training_step_matches_eager():
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(5)).to(CUDA)
    losses, grads = [], []
    for compile in (False, True):
        model = tiny_model().to(CUDA).train()
        forward = torch.compile(model) if compile else model
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = forward(ids[:, :-1], labels=ids[:, 1:]).loss
        loss.backward()
        losses.append(loss.item())
        grads.append(model.model.layers[1].mlp.experts.gate_up_proj.grad.float().norm().item())
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
    assert grads[1] == pytest.approx(grads[0], rel=5e-2)
