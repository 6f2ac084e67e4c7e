"""The generation engine against full-sequence forwards of the same model (tiny preset, CPU)."""

import argparse
import contextlib
import io
import random

import pytest
import torch

import nanoseek
from nanoseek.infer import Engine, GenerationError, SamplingParams, sample_tokens, sampling_probs, verify_draft
from nanoseek.model import DeepSeekV3, LatentCacheLayer, SlotLatentCache

GREEDY = SamplingParams(temperature=0, max_tokens=8)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**changes):
    return nanoseek.get_preset("tiny").replace(**changes)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DeepSeekV3(tiny()).eval()


def prompts_of(*lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 512, (n,), generator=g).tolist() for n in lengths]


def engine(model, **kw):
    kw.setdefault("max_slots", 4)
    kw.setdefault("max_seq_len", 64)
    kw.setdefault("eos_token_ids", [])
    return Engine(model, **kw)


@torch.no_grad()
def full_greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def drive(eng, schedule, max_steps=200):
    """Step ``eng``; ``schedule`` maps step index → [(prompt, params, id)] to add before that step."""
    tokens, events = {}, []
    for step in range(max_steps):
        for prompt, params, rid in schedule.get(step, []):
            eng.add_request(prompt, params, rid)
        if not eng.has_unfinished() and step > max(schedule):
            break
        for ev in eng.step():
            tokens.setdefault(ev.request_id, []).append(ev.token_id)
            events.append(ev)
    return tokens, events


# ---------------------------------------------------------------------------------------- cache
def test_slot_cache_view_positions_mask_and_scatter():
    cfg = tiny()
    cache = SlotLatentCache(cfg, n_slots=4, max_len=10, device="cpu", dtype=torch.float32)
    assert cache.bytes_per_token() == (3 + 1) * (32 + 8) * 4  # layers incl. MTP × (r + rope) × fp32
    a, b = cache.allocate(), cache.allocate()
    cache.lengths[a], cache.lengths[b] = 3, 5
    for slots in ([a, b], [b, a]):  # contiguous (slice) and permuted (gather) batches
        view = cache.view(slots)
        assert isinstance(view, LatentCacheLayer)
        starts = [cache.lengths[s] for s in slots]
        pos = view.positions(2)
        assert pos.tolist() == [[s, s + 1] for s in starts]
        c = torch.randn(2, 2, 32)
        k = torch.randn(2, 2, 8)
        c_all, k_all, mask = view.update(1, c, k)
        assert c_all.shape == (2, 7, 32) and mask.shape == (2, 2, 7)
        for i, (slot, s) in enumerate(zip(slots, starts)):
            assert torch.equal(cache.c_kv[1][slot, s:s + 2], c[i])
            assert torch.equal(c_all[i, s:s + 2], c[i]) and torch.equal(k_all[i, s:s + 2], k[i])
            assert mask[i].tolist() == [[j <= s + t for j in range(7)] for t in range(2)]
    view.update(3, c, k)  # the MTP layer in the same step: fine
    with pytest.raises(RuntimeError, match="written twice through one view"):
        view.update(1, c, k)  # a second step through one view would overwrite the first
    with pytest.raises(IndexError, match="holds 4 layers"):
        view.update(4, c, k)
    view.advance()
    assert cache.lengths[a] == 5 and cache.lengths[b] == 7
    cache.truncate(b, 6)
    assert cache.length(b) == 6
    with pytest.raises(ValueError):
        cache.truncate(b, 7)
    cache.free(a)
    assert cache.n_free == 3 and cache.allocate() == a
    full = cache.view([b])
    with pytest.raises(ValueError, match="latent cache full"):
        full.update(0, torch.zeros(1, 5, 32), torch.zeros(1, 5, 8))


def test_bytes_per_token_in_stats(model):
    cfg = model.config
    plain = engine(model)
    assert plain.stats.cache_bytes_per_token == cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    spec = engine(model, speculative="mtp")  # one more layer for the MTP block
    assert spec.stats.cache_bytes_per_token == (cfg.num_hidden_layers + 1) * (32 + 8) * 4


# ---------------------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("prefill_chunk", [512, 5])
def test_greedy_batch_equals_full_forward_argmax(model, prefill_chunk):
    prompts = prompts_of(3, 9, 14)
    eng = engine(model, prefill_chunk=prefill_chunk)
    out = eng.generate(prompts, GREEDY)
    for prompt, c in zip(prompts, out):
        assert c.prompt_ids == prompt
        assert c.token_ids == full_greedy(model, prompt, 8)
        assert c.finish_reason == "length" and len(c.logprobs) == 8
    s = eng.stats
    assert s.tokens_generated == 24 and s.requests_finished == 3 and s.prefill_tokens == 26
    assert s.steps == 7  # step 1: prefill token + one decode token each, then 6 decode steps
    assert s.tokens_per_forward == 1.0 and s.acceptance_rate is None
    assert eng.cache.n_free == 4 and not eng.has_unfinished()


def test_requests_added_mid_flight_match_solo_runs(model):
    prompts = prompts_of(4, 11, 6, seed=2)
    solo = [engine(model).generate([p], GREEDY)[0].token_ids for p in prompts]
    eng = engine(model, max_slots=2)  # the third request waits for a free slot
    schedule = {0: [(prompts[0], GREEDY, "a")], 3: [(prompts[1], GREEDY, "b"), (prompts[2], GREEDY, "c")]}
    tokens, events = drive(eng, schedule)
    assert [tokens[k] for k in "abc"] == solo
    assert sum(ev.finished for ev in events) == 3


def test_abort_frees_the_slot(model):
    eng = engine(model, max_slots=1)
    a = eng.add_request(prompts_of(5)[0], SamplingParams(temperature=0, max_tokens=30))
    b = eng.add_request(prompts_of(4)[0], GREEDY)
    eng.step()
    assert eng.cache.n_free == 0 and eng.num_waiting == 1
    assert eng.abort(a) is True
    assert eng.cache.n_free == 1 and eng.num_running == 0
    assert eng.abort(a) is False and eng.abort("nope") is False
    events = eng.step()  # b is admitted into the freed slot
    assert {ev.request_id for ev in events} == {b}
    c = eng.add_request(prompts_of(4)[0], GREEDY)
    assert eng.abort(c) is True and eng.num_waiting == 0  # a waiting request can be aborted too


# ---------------------------------------------------------------------------------------- stops
def test_stop_token_ids_eos_and_max_tokens(model):
    prompt = prompts_of(6, seed=3)[0]
    ref = full_greedy(model, prompt, 8)
    k = 3
    first = ref.index(ref[k])  # the stop token's first occurrence ends the request
    c = engine(model).generate([prompt], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[ref[k]]))[0]
    assert c.token_ids == ref[:first + 1] and c.finish_reason == "stop"
    c = engine(model, eos_token_ids=[ref[k]]).generate([prompt], GREEDY)[0]
    assert c.token_ids == ref[:first + 1] and c.finish_reason == "stop"
    c = engine(model, eos_token_ids=[ref[k]]).generate([prompt], SamplingParams(temperature=0, max_tokens=8,
                                                                                  ignore_eos=True))[0]
    assert c.token_ids == ref and c.finish_reason == "length"
    c = engine(model).generate([prompt], SamplingParams(temperature=0, max_tokens=1))[0]
    assert c.token_ids == ref[:1] and c.finish_reason == "length"


class ByteFake:
    """A byte-level fake tokenizer: ids ≡ 0 mod 4 are the first byte of 'é', ≡ 1 its second byte,
    others two ASCII letters; decode replaces incomplete UTF-8 with U+FFFD like real byte BPE."""

    eos_id = 1

    @staticmethod
    def piece(t):
        if t % 4 == 0:
            return b"\xc3"
        if t % 4 == 1:
            return b"\xa9"
        return bytes([97 + t % 26, 97 + (t // 26) % 26])

    def decode(self, ids):
        return b"".join(self.piece(int(t)) for t in ids).decode("utf-8", errors="replace")

    def encode(self, text):
        raise NotImplementedError


def test_stop_strings_cut_text_and_streaming_holds_back(model):
    tok = ByteFake()
    prompt = prompts_of(7, seed=4)[0]
    eng = engine(model, tokenizer=tok, eos_token_ids=[])
    free = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=24))[0]
    assert free.text == tok.decode(free.token_ids)
    text = free.text
    # a stop string straddling token boundaries, taken from the middle of the free-running output
    cut = len(text) // 2
    stop = text[cut:cut + 3]
    where = text.find(stop)
    events = []
    eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=24, stop=["zzzzzz", stop]), "s")
    while eng.has_unfinished():
        events += eng.step()
    done = events[-1].completion
    assert done.finish_reason == "stop" and done.text == text[:where]
    assert "".join(ev.text for ev in events) == done.text
    n = len(done.token_ids)  # the token completing the stop string is the last one kept
    assert len(tok.decode(free.token_ids[:n])) >= where + len(stop) > len(tok.decode(free.token_ids[:n - 1]))
    assert done.token_ids == free.token_ids[:n]
    # streaming without stop strings: deltas add up to the text, no partial character ever leaks
    eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=24), "t")
    deltas = []
    while eng.has_unfinished():
        deltas += [ev.text for ev in eng.step()]
    assert "".join(deltas) == text
    assert not any(d.endswith("\ufffd") for d in deltas[:-1])


def reference_stop_scan(text: str, stops: list[str]) -> tuple[int | None, int]:
    """Brute force: the earliest start of a stop in ``text``; else the longest partial stop at its end."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        return min(hits), None
    return None, max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def test_stop_scanner_matches_a_brute_force_scan_over_any_chunking():
    from nanoseek.infer.engine import StopScanner

    scanner = StopScanner(["world", "x"])
    assert scanner.feed("hello wor", 0) == (None, 3)  # "wor" is held back: it may become "world"
    assert scanner.feed("ld!", 9)[0] == 6
    rng = random.Random(0)
    for _ in range(300):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
        scanner, pos, got = StopScanner(stops), 0, (None, 0)
        while pos < len(text) and got[0] is None:  # the engine stops feeding at the first hit
            n = rng.randint(1, 4)
            got = scanner.feed(text[pos:pos + n], pos)
            pos += n
        start, hold = reference_stop_scan(text[:pos], stops)
        assert got[0] == start, (stops, text[:pos], got)
        if start is None:
            assert got[1] == hold, (stops, text[:pos], got)


# ---------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("top_k", [50, 0])
def test_seeded_sampling_reproducible_and_independent_of_batch_mates(model, top_k):
    """With top_k 0 the request takes the plain softmax, in steps that skip the sort (alone, beside a
    greedy row) and in steps that sort for a top-p mate alike."""
    prompts = prompts_of(5, 8, 3, seed=5)
    pa = SamplingParams(temperature=0.8, top_k=top_k, max_tokens=10, seed=7)
    solo = engine(model).generate([prompts[0]], pa)[0].token_ids
    assert engine(model).generate([prompts[0]], pa)[0].token_ids == solo
    mates = {0: [(prompts[1], SamplingParams(temperature=1.2, top_p=0.9, max_tokens=6, seed=1), "b")],
             1: [(prompts[0], pa, "a")],
             2: [(prompts[2], GREEDY, "c"), (prompts[0], pa, "a2")]}
    tokens, _ = drive(engine(model), mates)
    assert tokens["a"] == solo and tokens["a2"] == solo
    other = SamplingParams(temperature=0.8, top_k=top_k, max_tokens=10, seed=8)
    assert engine(model).generate([prompts[0]], other)[0].token_ids != solo


@pytest.mark.parametrize("speculative", [None, "mtp"])
def test_logprobs_equal_log_softmax_of_full_forward(model, speculative):
    prompts = prompts_of(4, 9, seed=6)
    params = [SamplingParams(temperature=0.7, top_p=0.8, max_tokens=7, seed=3),
              SamplingParams(temperature=0, max_tokens=7)]
    out = engine(model, speculative=speculative).generate(prompts, params)
    for prompt, p, c in zip(prompts, params, out):
        ids = torch.tensor([prompt + c.token_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1:-1].float()
        t = p.temperature if p.temperature > 0 else 1.0
        want = (logits / t).log_softmax(-1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(c.logprobs), want, rtol=1e-4, atol=1e-4)
    assert engine(model).generate(prompts[:1], SamplingParams(max_tokens=2, logprobs=False))[0].logprobs is None


def test_sample_tokens_truncation_and_logprob_definition():
    torch.manual_seed(0)
    logits = torch.randn(3, 20) * 3
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    toks, lps = sample_tokens(logits, SamplingParams(temperature=5.0, top_k=1), gens)
    assert toks.tolist() == logits.argmax(-1).tolist()
    # the logprob is taken before truncation, at the temperature
    torch.testing.assert_close(lps, (logits / 5.0).log_softmax(-1).gather(-1, toks[:, None]).squeeze(-1))
    toks, _ = sample_tokens(logits, SamplingParams(temperature=1.0, top_p=1e-6), gens)
    assert toks.tolist() == logits.argmax(-1).tolist()
    probs = sampling_probs(logits, 1.0, top_k=4)
    assert ((probs > 0).sum(-1) == 4).all()
    probs = sampling_probs(logits, 1.0, top_p=0.5)
    sorted_p = logits.softmax(-1).sort(-1, descending=True).values
    kept = (probs > 0).sum(-1)
    for row in range(3):  # the smallest prefix reaching 0.5
        k = int(kept[row])
        assert sorted_p[row, :k].sum() >= 0.5 > sorted_p[row, :k - 1].sum()


def test_batch_needs_reads_the_rows_that_sample():
    from nanoseek.infer.sampling import batch_needs
    assert batch_needs([GREEDY, SamplingParams(temperature=0, top_k=3)]) == (False, False)
    assert batch_needs([GREEDY, SamplingParams(temperature=0.7)]) == (True, False)
    assert batch_needs([SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_p=0.9)]) == (True, True)
    assert batch_needs([SamplingParams(temperature=1.0, top_k=5)]) == (True, True)


def test_skipping_the_sort_and_the_draw_changes_no_token():
    """A row without top-k/top-p is drawn from the plain softmax whatever its batch asks, so the flags
    of ``batch_needs`` change the work of a step and never its tokens, log-probabilities or the
    distributions of the rows that sample."""
    from nanoseek.infer.sampling import RowParams, sample_rows, verify_rows
    torch.manual_seed(3)
    n, v = 6, 40
    logits = torch.randn(n, v) * 2
    u = torch.rand(n, dtype=torch.float64)
    plain_rows = RowParams.of([SamplingParams(temperature=0.8)] * 3 + [GREEDY] * 3)
    mixed_rows = RowParams.of([SamplingParams(temperature=0.8)] * 3 + [SamplingParams(temperature=0.8, top_k=2)] * 3)
    full = sample_rows(logits, plain_rows, u, True, True)
    lean = sample_rows(logits, plain_rows, u, True, False)
    beside_truncating = sample_rows(logits, mixed_rows, u, True, True)
    for a, b in zip(full, lean):
        assert torch.equal(a, b)
    for a, b in zip(full, beside_truncating):  # the first three rows do not depend on their neighbours
        assert torch.equal(a[:3], b[:3])
    assert ((beside_truncating[2][3:] > 0).sum(-1) == 2).all()  # and the top-k rows are still truncated
    drafts = torch.randint(v, (n,))
    pair = torch.randn(n, 2, v)
    q = torch.rand(n, v).softmax(-1)
    lean = verify_rows(pair, drafts, q, plain_rows, u, u.flip(0), True, False)
    for a, b in zip(lean, verify_rows(pair, drafts, q, plain_rows, u, u.flip(0), True, True)):
        assert torch.equal(a, b)
    greedy_rows = RowParams.of([GREEDY] * n)
    assert torch.equal(sample_rows(logits, greedy_rows, u, False, False)[0], logits.argmax(-1))
    assert all(torch.equal(a, b) for a, b in zip(sample_rows(logits, greedy_rows, u, False, False)[:2],
                                                sample_rows(logits, greedy_rows, u, True, True)[:2]))
    pair = torch.randn(n, 2, v)
    drafts = torch.cat([pair[:3, 0].argmax(-1), torch.randint(v, (3,))])
    q = torch.rand(n, v).softmax(-1)
    lean = verify_rows(pair, drafts, q, greedy_rows, u, u, False, False)
    for a, b in zip(lean, verify_rows(pair, drafts, q, greedy_rows, u, u, True, True)):
        assert torch.equal(a, b)
    assert lean[2][:3].all()


def test_speculative_rejection_sampling_keeps_the_target_distribution():
    torch.manual_seed(1)
    v, n = 6, 20000
    l0, l1, lq = torch.randn(v) * 1.5, torch.randn(v) * 1.5, torch.randn(v) * 1.5
    p1, p2, q = l0.softmax(-1), l1.softmax(-1), lq.softmax(-1)
    drafts = torch.multinomial(q, n, replacement=True)
    logits = torch.stack([l0, l1])[None].expand(n, 2, v)
    params = SamplingParams(temperature=1.0)
    tokens, lps, acc = verify_draft(logits, drafts, [q] * n, params, [None] * n)
    assert acc.float().mean().item() == pytest.approx(torch.minimum(p1, q).sum().item(), abs=0.015)
    first = torch.bincount(tokens[:, 0], minlength=v).float() / n
    second = torch.bincount(tokens[acc, 1], minlength=v).float() / acc.sum()
    torch.testing.assert_close(first, p1, atol=0.015, rtol=0)
    torch.testing.assert_close(second, p2, atol=0.02, rtol=0)
    assert torch.equal(tokens[acc, 0], drafts[acc])
    torch.testing.assert_close(lps[:, 0], l0.log_softmax(-1)[tokens[:, 0]])


# ---------------------------------------------------------------------------------------- MTP
def _bigram_model(base, alpha):
    """Copy of ``base`` whose blocks' outputs are scaled by ``alpha`` (0: the residual stream is the
    token's embedding, so the main model is a bigram model) and whose MTP module copies the next
    token's embedding through: its draft is then (almost) the main model's own next prediction."""

    def outputs(block):
        yield block.self_attn.o_proj.weight
        mlp = block.mlp
        if hasattr(mlp, "down_proj"):
            yield mlp.down_proj.weight
        else:
            yield mlp.experts.down_proj
            yield mlp.shared_experts.down_proj.weight

    m = DeepSeekV3(base.config).eval()
    m.load_state_dict(base.state_dict())
    h = base.config.hidden_size
    with torch.no_grad():
        for layer in m.model.layers:
            for w in outputs(layer):
                w.mul_(alpha)
        mtp = m.mtp[0]
        mtp.eh_proj.weight.zero_()
        mtp.eh_proj.weight[:, :h].copy_(torch.eye(h))  # [enorm(emb) ; hnorm(h)] → enorm(emb)
        for w in outputs(mtp.block):
            w.zero_()
    return m


@pytest.mark.parametrize("case", ["random", "forced", "mixed"])
def test_speculative_greedy_is_identical_to_plain_greedy(model, case):
    m = {"random": model, "forced": _bigram_model(model, 0.0), "mixed": _bigram_model(model, 0.3)}[case]
    prompts = prompts_of(3, 10, 6, seed=7)
    params = SamplingParams(temperature=0, max_tokens=16)
    plain = engine(m).generate(prompts, params)
    eng = engine(m, speculative="mtp", prefill_chunk=4 if case == "mixed" else 512)  # chunked MTP prefill too
    schedule = {0: [(prompts[0], params, "0"), (prompts[1], params, "1")], 2: [(prompts[2], params, "2")]}
    tokens, _ = drive(eng, schedule)  # also mid-flight admission under speculation
    assert [tokens[str(i)] for i in range(3)] == [c.token_ids for c in plain]
    s = eng.stats
    assert s.draft_tokens > 0 and s.tokens_generated == 48
    assert s.tokens_per_forward == pytest.approx(1 + s.acceptance_rate)
    assert eng.cache.n_free == eng.cache.n_slots
    if case == "random":
        assert s.acceptance_rate < 0.2
    elif case == "forced":
        assert s.acceptance_rate > 0.95 and s.decode_forwards <= 10  # plain decoding needs 17
    else:
        assert 0.2 < s.acceptance_rate < 1.0  # both the accept and the reject paths ran


def test_speculative_sampling_is_seeded_and_matches_logprobs(model):
    m = _bigram_model(model, 0.6)
    prompts = prompts_of(5, 8, seed=8)
    params = SamplingParams(temperature=0.9, top_k=40, max_tokens=12, seed=11)
    eng = engine(m, speculative="mtp")
    a = eng.generate(prompts, params)
    assert eng.stats.accepted_tokens > 0  # sampled drafts were accepted, some rejected
    assert eng.stats.accepted_tokens < eng.stats.draft_tokens
    solo = engine(m, speculative="mtp").generate(prompts[1:], params)[0]
    assert solo.token_ids == a[1].token_ids
    for prompt, c in zip(prompts, a):
        assert len(c.token_ids) == 12
        with torch.no_grad():
            logits = m(torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1:-1]
        want = (logits / 0.9).log_softmax(-1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(c.logprobs), want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("field,value", [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1),
                                         ("max_tokens", 0), ("max_tokens", -3), ("stop", [""]),
                                         ("stop_token_ids", [-1]), ("seed", 1.5), ("temperature", float("nan"))])
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_bad_requests_are_rejected(model):
    eng = engine(model, max_seq_len=20)
    with pytest.raises(GenerationError, match=r"12 tokens \+ max_tokens 9 = 21 tokens exceeds max_seq_len 20"):
        eng.add_request(list(range(12)), SamplingParams(max_tokens=9))
    with pytest.raises(ValueError, match="empty prompt"):
        eng.add_request([], GREEDY)
    with pytest.raises(ValueError, match="outside the model vocabulary"):
        eng.add_request([5, 512], GREEDY)
    with pytest.raises(ValueError, match="stop strings need"):
        eng.add_request([5], SamplingParams(stop=["x"], max_tokens=2))
    with pytest.raises(ValueError, match="text prompt needs"):
        eng.add_request("hello", GREEDY)
    eng.add_request([5], GREEDY, request_id="x")
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request([6], GREEDY, request_id="x")
    with pytest.raises(ValueError, match="MTP"):
        Engine(DeepSeekV3(tiny(num_nextn_predict_layers=0)), speculative="mtp")
    with pytest.raises(RuntimeError, match="idle engine"):
        eng.generate([[1, 2]], GREEDY)


# ---------------------------------------------------------------------------------------- CLI
def test_generate_cli_streams_the_greedy_completion(tmp_path):
    from nanoseek.data.tokenizer import train_tokenizer
    from nanoseek.infer.cli import add_generate_arguments, generate_main

    texts = ["the quick brown fox jumps over the lazy dog", "hello world, hello nanoseek"] * 20
    tok = train_tokenizer(iter(texts), 300, None)
    torch.manual_seed(9)
    m = DeepSeekV3(tiny(vocab_size=tok.vocab_size)).eval()  # every id decodes
    nanoseek.save(m, tmp_path / "ckpt")
    tok.save(tmp_path / "ckpt")
    parser = argparse.ArgumentParser()
    add_generate_arguments(parser)
    outputs = []
    for extra in ([], ["--speculative"], ["--chat"]):
        args = parser.parse_args(["--ckpt", str(tmp_path / "ckpt"), "--prompt", "hello world", "--max-tokens", "6",
                                  "--temperature", "0", "--device", "cpu"] + extra)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert generate_main(args) == 0
        outputs.append(buf.getvalue())
    eng = Engine(m, tokenizer=tok, max_slots=1, max_seq_len=64)
    want = eng.generate([tok.encode("hello world")], SamplingParams(temperature=0, max_tokens=6))[0]
    assert outputs[0] == outputs[1] == want.text + "\n"
    chat = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hello world"}]))
    want = eng.generate([chat], SamplingParams(temperature=0, max_tokens=6))[0]
    assert outputs[2] == want.text + "\n"


def test_padded_vocab_ids_are_never_sampled():
    """Model vocab padded past the tokenizer's: those ids have no text and must never be drawn."""
    from nanoseek.data.tokenizer import padded_vocab_size, train_tokenizer

    tok = train_tokenizer(iter([f"{a} plus {a} is {2 * a}" for a in range(50)]), vocab_size=300, out_dir=None)
    cfg = nanoseek.get_preset("tiny").replace(vocab_size=padded_vocab_size(tok.vocab_size) + 64)
    model = nanoseek.DeepSeekV3(cfg).eval()
    with torch.no_grad():  # make every padding id the favourite
        model.lm_head.weight[tok.vocab_size:] = model.lm_head.weight[:1] * 50 + 1.0
    engine = Engine(model, tok, max_slots=4)
    outs = engine.generate([[5, 6, 7], [8]], [SamplingParams(temperature=0, max_tokens=6),
                                            SamplingParams(temperature=1.0, max_tokens=6, seed=1)])
    assert all(t < tok.vocab_size for o in outs for t in o.token_ids)


# ---------------------------------------------------------------------------------------- compiled step
def _compiler_works() -> bool:
    """Whether torch.compile can build a CPU graph here (inductor needs a C++ compiler)."""
    try:
        return torch.compile(lambda x: x * 2 + 1)(torch.ones(3)).sum().item() == 9.0
    except Exception:  # no compiler, an unsupported platform: the engine then decodes eagerly
        return False


@pytest.fixture(scope="module")
def small_model():
    """One MoE decoder layer plus the MTP block: little to compile (a dense layer is plain linears)."""
    torch.manual_seed(3)
    return _bigram_model(DeepSeekV3(tiny(num_hidden_layers=1, first_k_dense_replace=0)).eval(), 0.5)


def test_compiled_decode_step_gives_the_eager_tokens(small_model):
    """torch.compile'd decode (plain and speculative) = eager decode, token for token and logprob for
    logprob: greedy and seeded sampled rows, mid-flight admission, both MoE formulations (the gathered
    one for at most E token-expert pairs, the grouped custom operator past that)."""
    if not _compiler_works():
        pytest.skip("torch.compile cannot build CPU graphs here (no C++ compiler)")
    prompts = prompts_of(3, 10, 6, 4, seed=9)
    params = [SamplingParams(temperature=0, max_tokens=12),
              SamplingParams(temperature=0.9, top_k=40, max_tokens=12, seed=5),
              SamplingParams(temperature=1.1, top_p=0.9, max_tokens=9, seed=6),
              SamplingParams(temperature=0, max_tokens=10)]
    schedule = {0: [(prompts[0], params[0], "0"), (prompts[1], params[1], "1")],
                2: [(prompts[2], params[2], "2"), (prompts[3], params[3], "3")]}
    for speculative in (None, "mtp"):
        runs = []
        for compile in (False, True):
            eng = engine(small_model, speculative=speculative, compile=compile)
            _, events = drive(eng, schedule)
            assert eng.decode_step.compiled == compile  # compiling did not fall back
            runs.append(([(e.request_id, e.token_id) for e in events], torch.tensor([e.logprob for e in events])))
        (eager_tokens, eager_lps), (compiled_tokens, compiled_lps) = runs
        assert compiled_tokens == eager_tokens
        torch.testing.assert_close(compiled_lps, eager_lps, rtol=1e-4, atol=1e-4)


def test_decode_step_falls_back_to_eager_when_compiling_fails(model, monkeypatch):
    def broken_compile(fn, **kw):
        def run(*args):
            raise RuntimeError("no C++ compiler")
        return run

    want = engine(model).generate(prompts_of(5, seed=4), GREEDY)[0].token_ids
    monkeypatch.setattr(torch, "compile", broken_compile)
    eng = engine(model, compile=True)
    with pytest.warns(RuntimeWarning, match="decoding eagerly"):
        got = eng.generate(prompts_of(5, seed=4), GREEDY)[0].token_ids
    assert got == want and not eng.decode_step.compiled
