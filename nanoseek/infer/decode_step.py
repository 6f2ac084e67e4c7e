"""The engine's decode step as one fixed-shape function of tensors, eager or ``torch.compile``d.

A step runs over the first ``n`` cache slots (:meth:`~nanoseek.model.cache.SlotLatentCache.fixed_step`):
token ids [n, T], start positions [n], the rows' sampling parameters (:class:`RowParams`) and their
uniform random numbers, all tensors on the device, so one traced graph serves every step and every
mix of requests; sampling happens inside it and the host reads the sampled ids once per step. Two
host-known flags (:func:`~nanoseek.infer.sampling.batch_needs`: does any row sample, does any
sampled row truncate) drop the draw and the vocabulary sort from steps that need neither; dynamo
traces each combination that occurs (greedy, sampled, truncated) once, times the MoE's two
formulations: at most six graphs per step function, under its default recompile limit of eight.

* :meth:`DecodeStep.plain`: T = 1, one token per row.
* :meth:`DecodeStep.speculative`: T = 2 (the pending token and the MTP draft), verification
  (:func:`~nanoseek.infer.sampling.verify_rows`), then the MTP block at the same positions drafts the
  next token (V3 report §5.4.3; the engine's module docstring gives the bookkeeping).

With ``compile=True`` both go through ``torch.compile``: inductor on the CPU, CUDA graphs
(``mode="reduce-overhead"``) on CUDA, the cache tensors marked as static addresses so the graph
writes into them in place. If compiling fails (no C++ compiler, an unsupported backend) the step
warns once and runs eagerly: same function, same tokens.
"""

from __future__ import annotations

import warnings

import torch

from ..model.cache import SlotLatentCache
from .sampling import RowParams, sample_rows, verify_rows


def mask_unusable(logits: torch.Tensor, n_usable: int | None) -> torch.Tensor:
    """Logits with ids ``>= n_usable`` (model vocabulary padded past the tokenizer's) set to -inf."""
    if n_usable is None or n_usable >= logits.shape[-1]:
        return logits
    ids = torch.arange(logits.shape[-1], device=logits.device)
    return logits.masked_fill(ids >= n_usable, float("-inf"))


def compile_mode(device: torch.device) -> str | None:
    """``reduce-overhead`` (CUDA graphs) on CUDA; inductor's default elsewhere."""
    return "reduce-overhead" if device.type == "cuda" else None


class DecodeStep:
    """The decode forwards of one engine (its model and cache); see the module docstring."""

    def __init__(self, model, cache: SlotLatentCache, n_usable: int | None = None, compile: bool = False):
        self.model, self.cache, self.n_usable = model, cache, n_usable
        self.compiled = compile
        self._plain, self._speculative = self._plain_eager, self._speculative_eager
        if compile:
            mode = compile_mode(cache.device)
            if mode == "reduce-overhead":
                for t in (*cache.c_kv, *cache.k_pe):
                    torch._dynamo.mark_static_address(t)
            # dynamic in the batch from the start: one graph for every number of rows (and one more
            # where the MoE switches formulation), instead of a static graph for the first batch size
            self._plain = torch.compile(self._plain_eager, mode=mode, dynamic=True)
            self._speculative = torch.compile(self._speculative_eager, mode=mode, dynamic=True)

    # ------------------------------------------------------------------ the two steps
    def plain(self, ids: torch.Tensor, start: torch.Tensor, key_len: int, rows: RowParams, u: torch.Tensor,
              needs: tuple[bool, bool] = (True, True)):
        """ids [n, 1] → (tokens [n], logprobs [n]); writes position ``start`` of every row and attends
        over the first ``key_len`` cache positions; ``needs`` = ``batch_needs`` of the rows."""
        return self._run("_plain", ids, start, key_len, rows, u, *needs)

    def speculative(self, ids: torch.Tensor, start: torch.Tensor, key_len: int, draft_probs: torch.Tensor,
                    rows: RowParams, u: torch.Tensor, needs: tuple[bool, bool] = (True, True)):
        """ids [n, 2] = [pending, draft] → (tokens [n, 2], logprobs [n, 2], accepted [n], next drafts [n],
        their distributions [n, V]); ``u`` [n, 3]: accept, token, draft."""
        return self._run("_speculative", ids, start, key_len, draft_probs, rows, u, *needs)

    def _run(self, name: str, *args):
        fn = getattr(self, name)
        if not self.compiled:
            return fn(*args)
        try:
            return fn(*args)
        except Exception as e:  # compiling failed before the graph ran: nothing was written
            warnings.warn(f"torch.compile of the decode step failed ({type(e).__name__}: {str(e)[:200]}); "
                          "decoding eagerly", RuntimeWarning, stacklevel=3)
            self.compiled = False
            self._plain, self._speculative = self._plain_eager, self._speculative_eager
            return getattr(self, name)(*args)

    def _plain_eager(self, ids, start, key_len, rows, u, sampling, truncating):
        out = self.model(ids, cache=self.cache.fixed_step(start, key_len))
        tokens, logprobs, _ = sample_rows(mask_unusable(out.logits[:, -1].float(), self.n_usable), rows, u,
                                          sampling, truncating)
        return tokens, logprobs

    def _speculative_eager(self, ids, start, key_len, draft_probs, rows, u, sampling, truncating):
        step = self.cache.fixed_step(start, key_len)
        out = self.model(ids, cache=step, return_hidden=True)
        logits = mask_unusable(out.logits.float(), self.n_usable)
        tokens, logprobs, accepted = verify_rows(logits, ids[:, 1], draft_probs, rows, u[:, 0], u[:, 1],
                                                 sampling, truncating)
        # The MTP block at positions L, L+1: [h_L ; emb(t_L+1)] and [h_L+1 ; emb(t_L+2)]; a rejected
        # row's second entry is junk (the engine keeps its length at L+1) and its draft comes from L.
        follow = torch.stack([tokens[:, 0], torch.where(accepted, tokens[:, 1], tokens[:, 0])], dim=1)
        draft_logits, _ = self.model.mtp_draft_logits(0, out.hidden_states, follow, cache=step)
        picked = draft_logits[torch.arange(ids.shape[0], device=ids.device), accepted.long()]
        drafts, _, draft_q = sample_rows(mask_unusable(picked.float(), self.n_usable), rows, u[:, 2],
                                         sampling, truncating)
        return tokens, logprobs, accepted, drafts, draft_q
