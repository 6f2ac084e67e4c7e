"""Tests for nanoseek.data: tokenizer, corpus readers, shards, packing and sampling."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from nanoseek.data import (
    CHAT_TEMPLATE,
    CONTROL_TOKENS,
    DataError,
    DeterministicSampler,
    NanoTokenizer,
    PackedDataset,
    build_shards,
    check_vocab,
    document_hash,
    iter_documents,
    load_tokenizer,
    open_shards,
    read_manifest,
    resolve_paths,
    train_tokenizer,
)
from nanoseek.data.sources import SourceStats
from nanoseek.data.tokenizer import render_default_chat

WORDS = ["the", "cat", "sat", "on", "a", "mat", "naïve", "café", "日本語", "Ωμέγα", "emoji🎉", "42", "x=y+1"]


def make_texts(n: int, seed: int = 0, words: int = 12) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, words))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(iter(make_texts(400) + ["<think>step</think><answer>7</answer>"] * 3), 360, out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir) -> NanoTokenizer:
    return load_tokenizer(tok_dir)


# ----------------------------------------------------------------------- tokenizer


ROUND_TRIP = [
    "hello world",
    "  leading and trailing spaces  ",
    "naïve café 日本語 Ωμέγα emoji🎉 \U0001f9ea combining: e\u0301",
    "tabs\tand\nnewlines\r\nand NUL \x00 bytes",
    "<|user|>hi<|assistant|><think>reason</think><answer>42</answer><|eos|>",
    "",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_control_tokens_fixed_single_ids(tok):
    for expected_id, token in enumerate(CONTROL_TOKENS):
        assert tok.token_id(token) == expected_id
        assert tok.encode(token) == [expected_id]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    ids = tok.encode("a<think>b</think>")
    assert tok.token_id("<think>") in ids and tok.token_id("</think>") in ids
    assert tok.encode("x", add_bos=True)[0] == tok.bos_id
    assert tok.encode("x", add_eos=True)[-1] == tok.eos_id
    with pytest.raises(KeyError):
        tok.token_id("definitely not one token")


def test_skip_special_keeps_reasoning_tokens(tok):
    ids = tok.encode("<|bos|><|user|>q<|assistant|><think>r</think><answer>a</answer><|eos|>")
    assert tok.decode(ids, skip_special=True) == "q<think>r</think><answer>a</answer>"


def test_plain_encoding_does_not_inject_special_tokens(tok):
    ids = tok.encode("a <|eos|> b <think>", allow_special=False)
    assert tok.eos_id not in ids
    assert tok.token_id("<think>") in ids
    assert tok.decode(ids) == "a <|eos|> b <think>"


def test_decode_rejects_out_of_range_ids(tok):
    with pytest.raises(ValueError, match="outside the tokenizer vocabulary"):
        tok.decode([tok.vocab_size])
    assert tok.decode(torch.tensor(tok.encode("cat"))) == "cat"


def test_save_load_and_vocab(tok, tok_dir):
    assert tok.vocab_size <= 360
    assert load_tokenizer(tok_dir).fingerprint == tok.fingerprint
    check_vocab(tok.vocab_size, tok.vocab_size)
    check_vocab(tok.vocab_size, 384)
    with pytest.raises(ValueError, match="at least"):
        check_vocab(tok.vocab_size, tok.vocab_size - 1)
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(iter(["abc"]), 100, None)
    with pytest.raises(DataError, match="empty"):
        train_tokenizer(iter([]), 300, None)


def test_train_from_files(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(make_texts(50, seed=3)), encoding="utf-8")
    tk = train_tokenizer([str(tmp_path / "a.txt")], 300, tmp_path / "out", txt_split_lines=True)
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert tk.decode(tk.encode("the cat sat")) == "the cat sat"
    with pytest.raises(DataError, match="does not exist"):
        train_tokenizer([str(tmp_path / "missing.txt")], 300, None)


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "<think>add</think><answer>4</answer>"},
    {"role": "user", "content": "naïve 日本語?"},
]


def test_chat_template(tok):
    text = tok.apply_chat_template(CHAT)
    assert text == (
        "<|bos|><|system|>Be brief.<|user|>2+2?<|assistant|><think>add</think><answer>4</answer><|eos|>"
        "<|user|>naïve 日本語?<|assistant|>"
    )
    assert tok.apply_chat_template(CHAT, add_generation_prompt=False) == text[: -len("<|assistant|>")]
    jinja2 = pytest.importorskip("jinja2")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    for flag in (True, False):
        rendered = env.from_string(CHAT_TEMPLATE).render(
            messages=CHAT, add_generation_prompt=flag, bos_token="<|bos|>", eos_token="<|eos|>"
        )
        assert rendered == render_default_chat(CHAT, flag)
    custom = NanoTokenizer(tok.backend, chat_template="{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert custom.apply_chat_template(CHAT[:2]) == "[Be brief.][2+2?]"
    with pytest.raises(ValueError, match="unknown chat role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    assert jinja2 is not None


def test_transformers_autotokenizer(tok, tok_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    assert isinstance(hf, transformers.PreTrainedTokenizerFast)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert len(hf) == tok.vocab_size
    for text in ROUND_TRIP:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        assert hf.encode(text) == tok.encode(text)  # no bos is added implicitly
    ids = tok.encode("<|user|>q<|assistant|><think>r</think><|eos|>")
    assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special=True)
    for flag in (True, False):
        rendered = hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=flag)
        assert rendered == tok.apply_chat_template(CHAT, add_generation_prompt=flag)
    hf_ids = hf.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
    assert list(hf_ids) == tok.encode(tok.apply_chat_template(CHAT))
    # A transformers save_pretrained round trip keeps ids, template and fingerprint.
    hf.save_pretrained(str(tmp_path / "hf"))
    again = load_tokenizer(tmp_path / "hf")
    assert again.fingerprint == tok.fingerprint
    assert again.apply_chat_template(CHAT) == tok.apply_chat_template(CHAT)


# ------------------------------------------------------------------------- sources


def write_jsonl(path, texts, field="text"):
    with open(path, "w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({field: text, "id": 1}) + "\n")


def write_parquet(path, values, column="text", binary=False, row_group_size=3):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    kind = pa.binary() if binary else pa.string()
    pq.write_table(pa.table({column: pa.array(values, type=kind)}), path, row_group_size=row_group_size)


def test_sources_formats(tmp_path):
    (tmp_path / "whole.txt").write_text("line one\n\nline two\n", encoding="utf-8")
    write_jsonl(tmp_path / "d.jsonl", ["a", "b", ""], field="body")
    write_parquet(tmp_path / "p.parquet", ["p0", None, "p2", "p3", "p4", "p5", "p6"], row_group_size=2)
    assert list(iter_documents(tmp_path / "whole.txt")) == ["line one\n\nline two\n"]
    assert list(iter_documents(tmp_path / "whole.txt", txt_split_lines=True)) == ["line one", "line two"]
    stats: list[SourceStats] = []
    assert list(iter_documents(tmp_path / "d.jsonl", text_field="body", stats_out=stats)) == ["a", "b"]
    assert (stats[0].n_docs, stats[0].n_empty) == (2, 1)
    stats = []
    assert list(iter_documents(tmp_path / "p.parquet", stats_out=stats)) == ["p0", "p2", "p3", "p4", "p5", "p6"]
    assert (stats[0].n_docs, stats[0].n_empty) == (6, 1)
    with pytest.raises(DataError, match=r"line 1: no field 'text'"):
        list(iter_documents(tmp_path / "d.jsonl"))
    with pytest.raises(DataError, match="no column 'body'"):
        list(iter_documents(tmp_path / "p.parquet", text_field="body"))


def test_resolve_paths(tmp_path):
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    for name in ("b.txt", "sub/a.jsonl", "sub/deep/c.parquet", "sub/notes.md", ".hidden.txt"):
        (tmp_path / name).write_text("x", encoding="utf-8")
    found = [p.relative_to(tmp_path).as_posix() for p in resolve_paths(tmp_path)]
    assert found == ["b.txt", "sub/a.jsonl", "sub/deep/c.parquet"]
    assert [p.name for p in resolve_paths(str(tmp_path / "**" / "*.jsonl"))] == ["a.jsonl"]
    assert len(resolve_paths([tmp_path / "b.txt", str(tmp_path / "*.txt")])) == 1
    with pytest.raises(DataError, match="does not exist: .*nope"):
        resolve_paths(tmp_path / "nope")
    with pytest.raises(DataError, match="no files match"):
        resolve_paths(str(tmp_path / "*.csv"))
    with pytest.raises(DataError, match="unsupported"):
        resolve_paths(tmp_path / "sub" / "notes.md")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="empty_dir"):
        resolve_paths(tmp_path / "empty_dir")


def test_invalid_utf8_policy(tmp_path):
    bad_txt = tmp_path / "bad.txt"
    bad_txt.write_bytes(b"good start \xff\xfe end")
    (tmp_path / "good.txt").write_text("fine", encoding="utf-8")
    stats: list[SourceStats] = []
    assert list(iter_documents([bad_txt, tmp_path / "good.txt"], stats_out=stats)) == ["fine"]
    assert stats[0].n_skipped == 1 and "byte offset 11" in stats[0].first_error
    with pytest.raises(DataError, match=r"bad\.txt at byte offset 11"):
        list(iter_documents(bad_txt, strict=True))

    lines = tmp_path / "lines.txt"
    lines.write_bytes(b"ok one\nbad \x80 two\nok three\n")
    assert list(iter_documents(lines, txt_split_lines=True)) == ["ok one", "ok three"]
    with pytest.raises(DataError, match=r"byte offset 11 \(line 2\)"):
        list(iter_documents(lines, txt_split_lines=True, strict=True))

    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'{"text": "a"}\n{"text": "b\xc3("}\n{"text": "\\ud800 lone"}\n{"text": "c"}\n')
    stats = []
    assert list(iter_documents(jsonl, stats_out=stats)) == ["a", "c"]
    assert stats[0].n_skipped == 2
    with pytest.raises(DataError, match=r"bad\.jsonl at byte offset 25 \(line 2\)"):
        list(iter_documents(jsonl, strict=True))

    parquet = tmp_path / "bad.parquet"
    write_parquet(parquet, [b"fine", b"no\xffpe", b"also fine"], binary=True)
    stats = []
    assert list(iter_documents(parquet, stats_out=stats)) == ["fine", "also fine"]
    assert stats[0].n_skipped == 1
    with pytest.raises(DataError, match=r"bad\.parquet row 1 at byte offset 2"):
        list(iter_documents(parquet, strict=True))


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="corpus is empty"):
        list(iter_documents([tmp_path / "empty.txt", tmp_path / "blank.jsonl"]))


# -------------------------------------------------------------------------- shards


@pytest.fixture()
def corpus(tmp_path):
    """One file of each format; returns (paths, documents in reading order)."""
    txt_docs = make_texts(6, seed=11)
    jsonl_docs = make_texts(7, seed=12)
    parquet_docs = make_texts(8, seed=13)
    (tmp_path / "c.txt").write_text("\n".join(txt_docs) + "\n", encoding="utf-8")
    write_jsonl(tmp_path / "b.jsonl", jsonl_docs)
    write_parquet(tmp_path / "a.parquet", parquet_docs)
    paths = [tmp_path / "c.txt", tmp_path / "b.jsonl", tmp_path / "a.parquet"]
    return paths, [txt_docs, jsonl_docs, parquet_docs]


def split_docs(arrays, eos):
    stream = np.concatenate([np.asarray(a) for a in arrays]) if arrays else np.empty(0, np.int64)
    docs, start = [], 0
    for end in np.flatnonzero(stream == eos):
        docs.append(tuple(stream[start:end].tolist()))
        start = end + 1
    assert start == stream.size  # the stream ends with a separator
    return docs


def test_build_shards_all_formats(tok, corpus, tmp_path):
    paths, per_file = corpus
    out = tmp_path / "shards"
    manifest = build_shards(paths, tok, out, shard_tokens=50, val_fraction=0.0, txt_split_lines=True, workers=1)
    expected = [[tok.encode(doc) + [tok.eos_id] for doc in docs] for docs in per_file]
    stream = [t for docs in expected for doc in docs for t in doc]
    assert manifest.n_train_tokens == len(stream) and manifest.n_val_tokens == 0
    assert manifest.dtype == "uint16" and manifest.tokenizer_sha256 == tok.fingerprint
    assert [s.n_tokens for s in manifest.train[:-1]] == [50] * (len(manifest.train) - 1)
    for info, docs, path in zip(manifest.sources, expected, paths):
        assert info.path == str(path) and len(info.sha256) == 64
        assert info.n_docs == len(docs) and info.n_tokens == sum(map(len, docs)) and info.n_skipped == 0
    assert read_manifest(out).to_dict() == manifest.to_dict()
    shards = open_shards(out)
    assert all(isinstance(s, np.memmap) and not s.flags.writeable for s in shards)
    assert np.concatenate(shards).tolist() == stream
    manifest.check_tokenizer(tok)
    # Threads change nothing.
    again = build_shards(paths, tok, tmp_path / "threads", shard_tokens=50, val_fraction=0.0,
                         txt_split_lines=True, workers=2, batch_chars=40)
    assert np.concatenate(open_shards(tmp_path / "threads")).tolist() == stream
    assert [s.n_tokens for s in again.train] == [s.n_tokens for s in manifest.train]
    with pytest.raises(DataError, match="already holds shards"):
        build_shards(paths, tok, out, val_fraction=0.0)


def test_build_shards_counts_bad_documents(tok, tmp_path):
    (tmp_path / "ok.txt").write_text("the cat", encoding="utf-8")
    (tmp_path / "bad.txt").write_bytes(b"the \xff mat")
    manifest = build_shards(tmp_path, tok, tmp_path / "out", val_fraction=0.0)
    bad = [s for s in manifest.sources if s.path.endswith("bad.txt")][0]
    assert (bad.n_docs, bad.n_skipped, bad.n_tokens) == (0, 1, 0)
    with pytest.raises(DataError, match=r"bad\.txt at byte offset 4"):
        build_shards(tmp_path, tok, tmp_path / "strict", strict=True)
    assert not any((tmp_path / "strict").iterdir())  # nothing half-built is left


def test_build_shards_errors(tok, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_shards([tmp_path / "missing.jsonl"], tok, tmp_path / "o1")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match="corpus is empty"):
        build_shards([tmp_path / "empty.txt"], tok, tmp_path / "o2")
    with pytest.raises(DataError, match="no manifest.json"):
        open_shards(tmp_path)


def test_validation_split(tok, corpus, tmp_path):
    paths, per_file = corpus
    all_docs = {tuple(tok.encode(d)) for docs in per_file for d in docs}
    m1 = build_shards(paths, tok, tmp_path / "s1", val_fraction=0.3, txt_split_lines=True)
    m2 = build_shards(list(reversed(paths)), tok, tmp_path / "s2", val_fraction=0.3, txt_split_lines=True)
    train1, val1 = (set(split_docs(open_shards(tmp_path / "s1", s), tok.eos_id)) for s in ("train", "val"))
    train2, val2 = (set(split_docs(open_shards(tmp_path / "s2", s), tok.eos_id)) for s in ("train", "val"))
    assert val1 and train1 and not (train1 & val1) and train1 | val1 == all_docs
    assert (train1, val1) == (train2, val2)  # membership does not depend on file order
    expected_val = {
        tuple(tok.encode(d)) for docs in per_file for d in docs if document_hash(d) < 0.3 * 2**64
    }
    assert val1 == expected_val
    assert m1.n_val_tokens == sum(s.n_val_tokens for s in m1.sources) == m2.n_val_tokens

    # min_val_tokens raises the threshold just enough: smallest-hash documents move over.
    m3 = build_shards(paths, tok, tmp_path / "s3", val_fraction=0.0, min_val_tokens=40, txt_split_lines=True,
                      shard_tokens=64)
    val3 = split_docs(open_shards(tmp_path / "s3", "val"), tok.eos_id)
    train3 = split_docs(open_shards(tmp_path / "s3", "train"), tok.eos_id)
    assert m3.n_val_tokens >= 40 and m3.n_train_tokens + m3.n_val_tokens == m1.n_train_tokens + m1.n_val_tokens
    ranked = sorted((document_hash(d), tuple(tok.encode(d))) for docs in per_file for d in docs)
    taken, chosen = 0, set()
    for _h, ids in ranked:
        if taken >= 40:
            break
        chosen.add(ids)
        taken += len(ids) + 1
    assert set(val3) == chosen and not (set(train3) & chosen) and set(train3) | chosen == all_docs
    assert sum(s.n_val_tokens for s in m3.sources) == m3.n_val_tokens
    assert [s.n_tokens for s in m3.train[:-1]] == [64] * (len(m3.train) - 1)
    with pytest.raises(DataError, match="too small"):
        build_shards(paths, tok, tmp_path / "s4", val_fraction=0.0, min_val_tokens=10**6)


# -------------------------------------------------------------------------- loader


def test_packed_dataset():
    shards = [np.arange(0, 7, dtype=np.uint16), np.arange(7, 10, dtype=np.uint16), np.arange(10, 23, dtype=np.uint16)]
    ds = PackedDataset(shards, seq_len=5)
    assert len(ds) == (23 - 1) // 5 == 4
    assert ds[1].tolist() == list(range(5, 11))  # crosses two shard boundaries
    x, y = ds.get_batch([0, 3])
    assert x.dtype == torch.int64 and x.shape == (2, 5)
    assert x[1].tolist() == list(range(15, 20)) and y[1].tolist() == list(range(16, 21))
    assert torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(DataError, match=r"has 23 tokens but seq_len=30 needs at least 31"):
        PackedDataset(shards, seq_len=30)


def test_packed_dataset_from_dir(tok, corpus, tmp_path):
    paths, _ = corpus
    build_shards(paths, tok, tmp_path / "s", val_fraction=0.0, txt_split_lines=True)
    ds = PackedDataset(tmp_path / "s", seq_len=16)
    stream = np.concatenate(open_shards(tmp_path / "s"))
    assert ds[2].tolist() == stream[32:49].tolist()
    with pytest.raises(DataError, match=r"val data has 0 tokens"):
        PackedDataset(tmp_path / "s", seq_len=16, split="val")


def take(sampler, n):
    return [sampler.next_batch().tolist() for _ in range(n)]


def test_sampler_resume_exact():
    reference = DeterministicSampler(23, seed=7, batch_size=4)
    expected = take(reference, 20)  # 5 steps per epoch: crosses epochs
    first = DeterministicSampler(23, seed=7, batch_size=4)
    assert take(first, 7) == expected[:7]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = DeterministicSampler(23, seed=7, batch_size=4)
    resumed.load_state_dict(state)
    assert take(resumed, 13) == expected[7:]
    assert take(first, 13) == expected[7:]
    # skip(n) == consuming n batches
    skipper = DeterministicSampler(23, seed=7, batch_size=4)
    skipper.skip(9)
    assert take(skipper, 3) == expected[9:12]
    # epochs are permutations, different each epoch, deterministic in the seed
    epoch0 = sum(expected[:5], [])
    assert len(set(epoch0)) == 20 and set(epoch0) <= set(range(23))
    assert epoch0 != sum(expected[5:10], [])
    assert take(DeterministicSampler(23, seed=8, batch_size=4), 5) != expected[:5]
    with pytest.raises(DataError, match="seed"):
        DeterministicSampler(23, seed=8, batch_size=4).load_state_dict(state)
    with pytest.raises(DataError, match="n_sequences"):
        DeterministicSampler(24, seed=7, batch_size=4).load_state_dict(state)


def test_sampler_ranks_partition():
    n, world, batch = 24, 3, 2
    samplers = [DeterministicSampler(n, seed=1, rank=r, world_size=world, batch_size=batch) for r in range(world)]
    steps = samplers[0].steps_per_epoch
    assert steps == 4
    for epoch in range(2):
        per_rank = [sum(take(s, steps), []) for s in samplers]
        flat = sum(per_rank, [])
        assert len(flat) == len(set(flat)) == n  # disjoint and covering
        assert sorted(flat) == list(range(n))
        # the ranks together follow the single global order
        global_order = samplers[0].permutation(epoch).tolist()
        interleaved = []
        for step in range(steps):
            for rank in range(world):
                interleaved += per_rank[rank][step * batch : (step + 1) * batch]
        assert interleaved == global_order
    # resume on another world size, from a position that splits evenly
    single = DeterministicSampler(n, seed=1, batch_size=batch * world)
    reference = take(single, 6)
    state = samplers[0].state_dict()
    assert state["epoch"] == 2 and state["consumed"] == 0
    part = DeterministicSampler(n, seed=1, rank=1, world_size=world, batch_size=batch)
    part.skip(2)
    moved = DeterministicSampler(n, seed=1, batch_size=batch * world)
    moved.load_state_dict(part.state_dict())
    assert take(moved, 2) == reference[2:4]
    odd = DeterministicSampler(n, seed=1, batch_size=5)
    with pytest.raises(DataError, match="whole number of global batches"):
        odd.load_state_dict(part.state_dict())
    with pytest.raises(DataError, match="cannot fill one global batch"):
        DeterministicSampler(5, seed=0, world_size=2, batch_size=3)


def test_iterate_batches(tok, corpus, tmp_path):
    from nanoseek.data import iterate_batches

    paths, _ = corpus
    build_shards(paths, tok, tmp_path / "s", val_fraction=0.0, txt_split_lines=True)
    ds = PackedDataset(tmp_path / "s", seq_len=8)
    sampler = DeterministicSampler(len(ds), seed=3, batch_size=2)
    x, y = next(iterate_batches(ds, sampler))
    assert x.shape == y.shape == (2, 8) and x.dtype == y.dtype == torch.int64
    first = DeterministicSampler(len(ds), seed=3, batch_size=2).next_batch()
    assert torch.equal(x, ds.get_batch(first)[0])


def test_digits_are_split_one_token_each_by_default():
    from nanoseek.data.tokenizer import train_tokenizer

    texts = [f"{a} + {b} = {a + b}" for a in range(100, 200) for b in range(3)]
    tok = train_tokenizer(iter(texts), vocab_size=400, out_dir=None)
    pieces = [tok.decode([i]) for i in tok.encode("123 + 45 = 168")]
    assert all(len(p.strip()) <= 1 for p in pieces if p.strip().isdigit()), pieces
    merged = train_tokenizer(iter(texts), vocab_size=400, out_dir=None, split_digits=False)
    assert any(len(merged.decode([i]).strip()) > 1 and merged.decode([i]).strip().isdigit()
               for i in merged.encode("123 + 45 = 168"))
