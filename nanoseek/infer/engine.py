"""The generation engine: continuous batching over a slot latent cache, with MTP speculation.

One engine serves every caller: GRPO rollouts and evaluation (:meth:`Engine.generate`), the server
and the chat (:meth:`Engine.add_request` + :meth:`Engine.step`, streaming :class:`TokenEvent`).

A step
    1. admits waiting requests into free cache slots and prefills their prompts (padded together,
       in chunks of at most ``prefill_chunk`` tokens per forward; each prompt's first token is
       sampled from its last prompt position);
    2. runs ONE batched decode forward over all running requests, each row at its own position
       (T = 1; T = 2 with speculation), the ones admitted in this step included. Requests join and
       leave between steps; a finished or aborted request frees its slot at once.

The decode forward is :class:`~nanoseek.infer.decode_step.DecodeStep`: fixed shapes over the first
``n`` slots (slots are taken lowest first, so ``n`` is about the number of running requests),
sampling on the device, one read of the sampled ids per step. ``compile=True`` runs it through
``torch.compile`` (CUDA graphs on CUDA); the prefill stays eager (its shapes vary with the prompts).

Seeds
    A seeded request reproduces its tokens whatever shares the batch. Requests that share a seed
    draw the same uniform numbers: give each sample of a GRPO group its own seed (or none).

Outputs
    ``token_ids`` hold every sampled token, including the one that ended the request (an EOS /
    stop token id, or the token that completed a stop string); ``logprobs`` are one per token, as
    defined in :mod:`nanoseek.infer.sampling` (the GRPO trainer recomputes them exactly). ``text``
    is the decoded output without the stop token's text and cut before a stop string. Streaming
    holds back text that could be the start of a stop string and incomplete UTF-8 sequences.
    Generated ids are decoded without the prompt as context (exact for byte-level BPE tokenizers
    such as nanoseek's and DeepSeek's).

Speculative decoding with the MTP module (``speculative="mtp"``, V3 report §5.4.3)
    Each running request carries its newest token ``p`` (not yet in the cache) and a draft ``d``
    for the token after it. The main model runs ``[p, d]`` (T = 2) at positions L, L+1; the first
    output decides the next token, which accepts or rejects the draft; on acceptance the second
    output gives one more token for free. The MTP module (depth 1 only) then runs on the same
    positions with its own cache layer (index ``num_hidden_layers``): input
    ``[h_L, h_L+1]`` (the main model's final normalised hidden states) and the embeddings of the
    tokens that follow them; its output at the last accepted position is the next draft. A
    rejected row is truncated back to L+1 in every layer. Greedy rows accept iff the draft equals
    the argmax, so greedy output is identical to plain greedy decoding; sampled rows use
    speculative rejection sampling (:func:`~nanoseek.infer.sampling.verify_draft`), which keeps the
    output distribution exact but draws different random numbers than plain decoding, so a seed
    gives a different (equally valid) sample with and without speculation.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from ..model.cache import SlotLatentCache
from .decode_step import DecodeStep, mask_unusable
from .sampling import GenerationError, RowParams, SamplingParams, batch_needs, draw_uniforms, sample_tokens

#: the decode step's key length is the longest row's end rounded up to a multiple of this
KEY_LEN_STEP = 64


@dataclass
class Completion:
    """A finished request."""

    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float] | None
    text: str
    finish_reason: str | None  # "stop" | "length"


@dataclass
class TokenEvent:
    """One generated token of one request, as :meth:`Engine.step` reports it.

    ``text`` is the newly releasable text (may be empty while text is held back). The last event
    of a request has ``finished`` True, its ``finish_reason`` and the whole :class:`Completion`.
    """

    request_id: str
    token_id: int
    logprob: float | None
    text: str
    finished: bool
    finish_reason: str | None
    completion: Completion | None = None


@dataclass
class EngineStats:
    """Counters since the engine was made (or :meth:`Engine.reset_stats`)."""

    requests_finished: int = 0
    tokens_generated: int = 0  # tokens handed out in events
    steps: int = 0
    prefill_forwards: int = 0
    prefill_tokens: int = 0  # prompt tokens prefilled (padding not counted)
    decode_forwards: int = 0
    decode_rows: int = 0  # sum over decode forwards of the rows in the batch
    decode_tokens: int = 0  # tokens the decode forwards produced (1 + accepted draft per row)
    draft_tokens: int = 0
    accepted_tokens: int = 0
    cache_bytes_per_token: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        """Fraction of MTP drafts the main model accepted (None without speculation)."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def tokens_per_forward(self) -> float | None:
        """Tokens one request gets per main-model decode forward (1 + acceptance rate with MTP)."""
        return self.decode_tokens / self.decode_rows if self.decode_rows else None

    def as_dict(self) -> dict[str, Any]:
        """The counters and the derived rates as one dict (for JSON reports)."""
        d = asdict(self)
        d["acceptance_rate"] = self.acceptance_rate
        d["tokens_per_forward"] = self.tokens_per_forward
        return d


class _Request:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams):
        self.id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.generator = params.make_generator()
        self.stops = StopScanner(params.stop)
        self.slot: int | None = None
        self.output_ids: list[int] = []
        self.logprobs: list[float] = []
        self.pending: int | None = None  # newest token, not yet in the cache
        self.draft: int | None = None  # MTP draft for the token after ``pending``
        self.text_ids: list[int] = []  # output ids that count as text (stop tokens excluded)
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self.emitted = 0  # characters of ``text`` already handed out
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Engine:
    """Continuous-batching generation over a :class:`SlotLatentCache`.

    ``model`` is a :class:`~nanoseek.model.DeepSeekV3`; ``device`` / ``dtype`` default to the
    model's (given ones move / cast the model in place, router biases stay float32).
    ``max_seq_len`` (prompt + generated tokens; default ``config.max_position_embeddings``) sizes the
    cache: ``max_slots × (max_seq_len rounded up to 64, + 64) × bytes_per_token``. ``eos_token_ids``
    default to the tokenizer's EOS and the config's ``eos_token_id``. ``speculative="mtp"`` drafts with
    MTP module 0. ``compile`` runs the decode step through ``torch.compile`` (see the module docstring).
    """

    def __init__(self, model, tokenizer=None, max_slots: int = 16, max_seq_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 speculative: str | None = None, eos_token_ids: Sequence[int] | None = None,
                 prefill_chunk: int = 512, compile: bool = False):
        cfg = model.config
        param = next(model.parameters())
        self.device = torch.device(device) if device is not None else param.device
        self.dtype = dtype if dtype is not None else param.dtype
        if param.device != self.device:
            model.to(self.device)
        if param.dtype != self.dtype:
            model.to(self.dtype)
            for module in model.modules():  # keep the routers' bias in float32, as the loader does
                bias = getattr(module, "e_score_correction_bias", None)
                if isinstance(bias, torch.Tensor):
                    bias.data = bias.data.float()
        if speculative not in (None, "mtp"):
            raise GenerationError(f"speculative={speculative!r}: the only method is 'mtp'")
        if speculative == "mtp" and len(getattr(model, "mtp", ())) == 0:
            raise GenerationError("speculative='mtp' needs a model with MTP modules "
                                  "(num_nextn_predict_layers > 0 and MTP weights in the checkpoint)")
        if max_slots <= 0:
            raise GenerationError(f"max_slots must be positive, got {max_slots}")
        if prefill_chunk <= 0:
            raise GenerationError(f"prefill_chunk must be positive, got {prefill_chunk}")
        self.model = model
        self.config = cfg
        self.tokenizer = tokenizer
        self.speculative = speculative
        self.max_seq_len = int(max_seq_len or cfg.max_position_embeddings)
        self.prefill_chunk = prefill_chunk
        n_layers = cfg.num_hidden_layers + (1 if speculative else 0)
        # room for the longest key length the decode step asks for, and one step more: a compiled graph
        # then never sees a key length equal to the cache's (a separate specialisation)
        cache_len = -(-self.max_seq_len // KEY_LEN_STEP) * KEY_LEN_STEP + KEY_LEN_STEP
        self.cache = SlotLatentCache(cfg, max_slots, cache_len, self.device, self.dtype, n_layers)
        if eos_token_ids is None:
            eos: set[int] = set()
            if tokenizer is not None and getattr(tokenizer, "eos_id", None) is not None:
                eos.add(int(tokenizer.eos_id))
            cfg_eos = cfg.eos_token_id
            if cfg_eos is not None:
                eos.update([cfg_eos] if isinstance(cfg_eos, int) else cfg_eos)
            eos_token_ids = sorted(eos)
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        # A model vocabulary padded past the tokenizer's (to a multiple of 64, say) has ids no text
        # maps to; they are never sampled.
        tok_vocab = getattr(tokenizer, "vocab_size", None)
        self._n_usable = tok_vocab if tok_vocab is not None and tok_vocab < cfg.vocab_size else None
        self.decode_step = DecodeStep(model, self.cache, self._n_usable, compile=compile)
        # each slot's sampling parameters and (speculation) its draft's distribution, on the device
        self._rows = RowParams.of([SamplingParams(temperature=0)] * max_slots, self.device)
        self._draft_probs = torch.zeros(max_slots, cfg.vocab_size, device=self.device) if speculative else None
        self.stats = EngineStats(cache_bytes_per_token=self.cache.bytes_per_token())
        self._waiting: deque[_Request] = deque()
        self._running: dict[str, _Request] = {}
        self._ids = itertools.count()

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt: Sequence[int] | str, params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request (token ids, or text when the engine has a tokenizer); returns its id."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        params.validate()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise GenerationError("a text prompt needs an engine with a tokenizer (or pass token ids)")
            prompt = self.tokenizer.encode(prompt)
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.reshape(-1).tolist()
        prompt_ids = [int(t) for t in prompt]
        if not prompt_ids:
            raise GenerationError("empty prompt: give at least one token")
        vocab = self.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise GenerationError(f"prompt token id {bad[0]} is outside the model vocabulary [0, {vocab})")
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_seq_len:
            raise GenerationError(f"prompt of {len(prompt_ids)} tokens + max_tokens {params.max_tokens} = "
                                  f"{total} tokens exceeds max_seq_len {self.max_seq_len}")
        if params.stop and self.tokenizer is None:
            raise GenerationError("stop strings need an engine with a tokenizer (use stop_token_ids)")
        rid = str(request_id) if request_id is not None else f"req-{next(self._ids)}"
        if rid in self._running or any(r.id == rid for r in self._waiting):
            raise GenerationError(f"request id {rid!r} is already in use")
        self._waiting.append(_Request(rid, prompt_ids, params))
        return rid

    def abort(self, request_id: str) -> bool:
        """Drop a request now (waiting or running); its slot is free for the next step."""
        for r in self._waiting:
            if r.id == request_id:
                self._waiting.remove(r)
                r.finish_reason = "abort"
                return True
        r = self._running.pop(request_id, None)
        if r is None:
            return False
        r.finish_reason = "abort"
        self.cache.free(r.slot)
        return True

    def has_unfinished(self) -> bool:
        """Whether any request is waiting for a slot or running."""
        return bool(self._waiting or self._running)

    @property
    def num_waiting(self) -> int:
        """Requests waiting for a cache slot."""
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        """Requests holding a cache slot."""
        return len(self._running)

    def reset_stats(self) -> None:
        """Start the counters of :attr:`stats` from zero."""
        self.stats = EngineStats(cache_bytes_per_token=self.cache.bytes_per_token())

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        """Admit waiting requests, then one batched decode forward; returns this step's tokens."""
        events: list[TokenEvent] = []
        admitted = []
        while self._waiting and self.cache.n_free > 0:
            r = self._waiting.popleft()
            r.slot = self.cache.allocate()
            self._running[r.id] = r
            admitted.append(r)
        if admitted:
            events += self._prefill(admitted)
        active = sorted(self._running.values(), key=lambda r: r.slot)
        if active:
            events += self._decode_speculative(active) if self.speculative else self._decode(active)
        if admitted or active:
            self.stats.steps += 1
        return events

    def generate(self, prompts: Sequence[Sequence[int] | str],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """Run ``prompts`` to completion (the engine must be idle); completions in prompt order."""
        if self.has_unfinished():
            raise RuntimeError("generate() needs an idle engine: other requests are in flight "
                               "(drive them with step() or abort them first)")
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise GenerationError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self.add_request(prompt, p))
        except Exception:
            for rid in ids:
                self.abort(rid)
            raise
        done: dict[str, Completion] = {}
        while len(done) < len(ids):
            for event in self.step():
                if event.finished:
                    done[event.request_id] = event.completion
        return [done[rid] for rid in ids]

    # ------------------------------------------------------------------ forwards
    def _prefill(self, reqs: list[_Request]) -> list[TokenEvent]:
        """Prefill new prompts together (right-padded, chunked); sample each first token (and draft)."""
        spec = self.speculative is not None
        first: dict[str, tuple[int, float]] = {}
        start = 0
        while True:
            live = [r for r in reqs if len(r.prompt_ids) > start]
            if not live:
                break
            per_row = max(1, self.prefill_chunk // len(live))
            end = min(start + per_row, max(len(r.prompt_ids) for r in live))
            width = end - start
            ids = torch.zeros(len(live), width, dtype=torch.long)
            for j, r in enumerate(live):
                seg = r.prompt_ids[start:end]
                ids[j, : len(seg)] = torch.tensor(seg)
            view = self.cache.view([r.slot for r in live])
            out = self.model(ids.to(self.device), cache=view, return_hidden=spec)
            self.stats.prefill_forwards += 1
            self.stats.prefill_tokens += sum(min(end, len(r.prompt_ids)) - start for r in live)
            done = [j for j, r in enumerate(live) if len(r.prompt_ids) <= end]
            last = [len(live[j].prompt_ids) - 1 - start for j in done]
            if done:
                toks, lps = sample_tokens(mask_unusable(out.logits[done, last], self._n_usable),
                                          [live[j].params for j in done], [live[j].generator for j in done])
                for j, t, lp in zip(done, toks.tolist(), lps.tolist()):
                    first[live[j].id] = (t, lp)
            if spec:
                # MTP position i combines h_i with the embedding of token i+1 (the first sampled
                # token at the last prompt position; padding beyond).
                nxt = torch.zeros(len(live), width, dtype=torch.long)
                for j, r in enumerate(live):
                    seg = r.prompt_ids[start + 1:end + 1]
                    nxt[j, : len(seg)] = torch.tensor(seg, dtype=torch.long)
                    if r.id in first and start < len(r.prompt_ids) <= end:
                        nxt[j, len(r.prompt_ids) - 1 - start] = first[r.id][0]
                draft_logits, _ = self.model.mtp_draft_logits(0, out.hidden_states, nxt.to(self.device), cache=view)
                if done:
                    drafts, _, probs = sample_tokens(mask_unusable(draft_logits[done, last], self._n_usable),
                                                     [live[j].params for j in done],
                                                     [live[j].generator for j in done], return_probs=True)
                    for j, d, q in zip(done, drafts.tolist(), probs):
                        live[j].draft = d
                        if q is not None:
                            self._draft_probs[live[j].slot] = q
            start = end
        events = []
        for r in reqs:
            self.cache.truncate(r.slot, len(r.prompt_ids))  # drop the padding's entries
            token, logprob = first[r.id]
            r.pending = token
            self._rows.set_row(r.slot, r.params)
            events.append(self._emit(r, token, logprob))
        return events

    def _step_inputs(self, active: list[_Request], width: int, uniforms: int):
        """ids [n, width] (the pending token first), start positions [n], the key length and uniforms
        [n, uniforms] for the first n slots, n = the highest running slot + 1 and at least 2 (a
        compiled graph specialises on a batch of 1; one more row costs little); rows of idle slots are
        padding. The key length is the longest row's end rounded up to a multiple of
        ``KEY_LEN_STEP`` (few distinct lengths for a compiled graph), at most the cache's. Last, the
        running requests' :func:`batch_needs` (what sampling work the step must do)."""
        n = min(max(active[-1].slot + 1, 2), self.cache.n_slots)
        ids = [[0] * width for _ in range(n)]
        start = [0] * n
        u = torch.zeros(n, uniforms, dtype=torch.float64)
        for r in active:
            ids[r.slot] = [r.pending, r.draft][:width]
            start[r.slot] = self.cache.lengths[r.slot]
            if start[r.slot] + width > self.cache.max_len:
                raise GenerationError(f"latent cache full: request {r.id} at {start[r.slot]} tokens + {width} "
                                      f"> {self.cache.max_len}")
        sampled = [r for r in active if not r.params.greedy]
        if sampled:
            u[[r.slot for r in sampled]] = torch.stack([draw_uniforms([r.params] * uniforms, [r.generator] * uniforms)
                                                        for r in sampled])
        device = self.device
        key_len = min(-(-(max(start) + width) // KEY_LEN_STEP) * KEY_LEN_STEP, self.cache.max_len)
        return (torch.tensor(ids, dtype=torch.long, device=device), torch.tensor(start, device=device), key_len,
                self._rows.rows(n), u.to(device), batch_needs([r.params for r in active]))

    def _decode(self, active: list[_Request]) -> list[TokenEvent]:
        ids, start, key_len, rows, u, needs = self._step_inputs(active, 1, 1)
        toks, lps = self.decode_step.plain(ids, start, key_len, rows, u[:, 0], needs)
        toks, lps = toks.tolist(), lps.tolist()
        self._count_decode(len(active), len(active))
        events = []
        for r in active:
            self.cache.lengths[r.slot] += 1
            r.pending = toks[r.slot]
            events.append(self._emit(r, r.pending, lps[r.slot]))
        return events

    def _decode_speculative(self, active: list[_Request]) -> list[TokenEvent]:
        ids, start, key_len, rows, u, needs = self._step_inputs(active, 2, 3)
        n = ids.shape[0]
        tokens, lps, accepted, drafts, draft_probs = self.decode_step.speculative(
            ids, start, key_len, self._draft_probs[:n], rows, u, needs)
        self._draft_probs[:n] = draft_probs
        tokens, lps, accepted, drafts = tokens.tolist(), lps.tolist(), accepted.tolist(), drafts.tolist()
        n_acc = sum(accepted[r.slot] for r in active)
        self._count_decode(len(active), len(active) + n_acc)
        self.stats.draft_tokens += len(active)
        self.stats.accepted_tokens += n_acc
        events = []
        for r in active:
            i = r.slot
            self.cache.lengths[i] += 2 if accepted[i] else 1  # a rejected draft's entry is never read
            r.draft = drafts[i]
            r.pending = tokens[i][0]
            events.append(self._emit(r, tokens[i][0], lps[i][0]))
            if accepted[i] and not r.finished:
                r.pending = tokens[i][1]
                events.append(self._emit(r, tokens[i][1], lps[i][1]))
        return events

    def _count_decode(self, rows: int, tokens: int) -> None:
        self.stats.decode_forwards += 1
        self.stats.decode_rows += rows
        self.stats.decode_tokens += tokens

    # ------------------------------------------------------------------ outputs
    def _emit(self, r: _Request, token: int, logprob: float) -> TokenEvent:
        """Record one token: stop / length checks, text delta, and completion when finished."""
        p = r.params
        r.output_ids.append(token)
        r.logprobs.append(logprob)
        self.stats.tokens_generated += 1
        reason, text = None, ""
        stop_token = (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids
        if stop_token:
            reason = "stop"
        elif self.tokenizer is not None:
            r.text_ids.append(token)
            text, hit = self._advance_text(r, final=False)
            if hit:
                reason = "stop"
        if reason is None and len(r.output_ids) >= p.max_tokens:
            reason = "length"
        completion = None
        if reason is not None:
            if self.tokenizer is not None:  # release held-back text and incomplete bytes
                more, _ = self._advance_text(r, final=True)
                text += more
            completion = self._finish(r, reason)
        return TokenEvent(r.id, token, logprob if p.logprobs else None, text, reason is not None, reason,
                          completion)

    def _finish(self, r: _Request, reason: str) -> Completion:
        r.finish_reason = reason
        self._running.pop(r.id, None)
        self.cache.free(r.slot)
        self.stats.requests_finished += 1
        return Completion(r.id, r.prompt_ids, list(r.output_ids), list(r.logprobs) if r.params.logprobs else None,
                          r.text, reason)

    def _detokenize(self, r: _Request, final: bool) -> str:
        """New complete text of ``r.text_ids`` (incremental; waits on incomplete UTF-8 unless final)."""
        ids = r.text_ids
        if r.read_offset >= len(ids):
            return ""
        decode = self.tokenizer.decode
        before = decode(ids[r.prefix_offset:r.read_offset]) if r.read_offset > r.prefix_offset else ""
        now = decode(ids[r.prefix_offset:])
        if now.endswith("\ufffd") and not final:
            return ""
        r.prefix_offset, r.read_offset = r.read_offset, len(ids)
        return now[len(before):]

    def _advance_text(self, r: _Request, final: bool) -> tuple[str, bool]:
        """Append decoded text, look for stop strings; returns (releasable text, stop string found)."""
        new = self._detokenize(r, final)
        old_len = len(r.text)
        r.text += new
        hit, hold = r.stops.feed(new, old_len)
        if hit is not None:
            r.text = r.text[:hit]
            out = r.text[r.emitted:]
            r.emitted = len(r.text)
            return out, True
        if final:
            hold = 0
        safe = max(r.emitted, len(r.text) - hold)
        out = r.text[r.emitted:safe]
        r.emitted = safe
        return out, False


class StopScanner:
    """Finds stop strings in streamed text in time linear in its length, whatever the stops' lengths.

    One Knuth–Morris–Pratt automaton per stop string (Knuth, Morris & Pratt 1977): its state is the
    length of the longest suffix of the text so far that is a prefix of the stop, updated in amortised
    O(1) per character, so each new token costs O(characters × stops) instead of rescanning the tail
    and every prefix of every stop.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.fallback = [_kmp_failure(stop) for stop in self.stops]
        self.matched = [0] * len(self.stops)

    def feed(self, text: str, offset: int) -> tuple[int | None, int]:
        """Scan ``text``, which starts at character ``offset`` of the whole output.

        Returns (where the earliest-starting stop string found in it starts, or None; the length of
        the longest partial stop at the end of the output, to hold back from the client).
        """
        first = None
        for j, (stop, fallback) in enumerate(zip(self.stops, self.fallback)):
            q = self.matched[j]
            for i, ch in enumerate(text):
                while q and stop[q] != ch:
                    q = fallback[q - 1]
                if stop[q] == ch:
                    q += 1
                if q == len(stop):  # a later match of this stop would start later
                    start = offset + i + 1 - len(stop)
                    first = start if first is None else min(first, start)
                    q = fallback[q - 1]
                    break
            self.matched[j] = q
        return first, max(self.matched, default=0)


def _kmp_failure(pattern: str) -> list[int]:
    """``f[i]``: length of the longest proper prefix of ``pattern[:i + 1]`` that is also its suffix."""
    f = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = f[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        f[i] = k
    return f
