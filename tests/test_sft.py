"""SFT and distillation: assistant-only labels, packing, bad records, cold start, a tiny SFT run that learns
(and resumes), RUN_DIR/final for every stage, and rejection sampling that keeps only verified samples.

Runs use the ``tiny`` preset on the CPU with one thread. Cold-start chat examples are ~130 tokens with
the test tokenizer (the R1 system instruction alone is ~50), so those runs pack 192-token sequences.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nanoseek
from nanoseek.cli import main
from nanoseek.data import NanoTokenizer, load_tokenizer, padded_vocab_size, train_tokenizer
from nanoseek.data.sft import (
    IGNORE_INDEX,
    SFTDataset,
    build_sft_data,
    load_sft_data,
    pack_examples,
    read_chat_jsonl,
    split_by_hash,
    tokenize_conversation,
)
from nanoseek.data.sources import DataError
from nanoseek.tasks import SYSTEM_PROMPT, chat_messages, format_completion, get_task
from nanoseek.tasks.coldstart import make_cold_start, write_jsonl
from nanoseek.tasks.evaluate import EVAL_SEED_BASE, chat_prompt

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(log=lambda *a, **k: None)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> NanoTokenizer:
    problems = get_task("arithmetic").generate(0, 300, 1)
    texts = [SYSTEM_PROMPT + " " + p.prompt + " " + format_completion(p) for p in problems]
    return train_tokenizer(iter(texts + ["be nice hi hello how world"] * 3), vocab_size=400, out_dir=None)


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory, tok) -> Path:
    """A tiny random model (with MTP) and the tokenizer: the teacher and the SFT starting point."""
    out = tmp_path_factory.mktemp("init")
    cfg = nanoseek.get_preset("tiny").replace(vocab_size=padded_vocab_size(tok.vocab_size),
                                             max_position_embeddings=512, bos_token_id=tok.bos_id,
                                             eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    torch.manual_seed(0)
    nanoseek.save(nanoseek.DeepSeekV3(cfg), out)
    tok.save(out)
    return out


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


CONVO = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
         {"role": "assistant", "content": "hello"}, {"role": "user", "content": "how"},
         {"role": "assistant", "content": "world"}]


# ------------------------------------------------------------------------------------ labels
def test_only_assistant_tokens_are_targets_token_by_token(tok):
    enc = tok.encode
    c = tok.token_id
    # hand-rendered: <|bos|><|system|>be nice<|user|>hi<|assistant|>hello<|eos|><|user|>how<|assistant|>world<|eos|>
    pieces = [([c("<|bos|>"), c("<|system|>")], False), (enc("be nice"), False), ([c("<|user|>")], False),
              (enc("hi"), False), ([c("<|assistant|>")], False), (enc("hello"), True), ([tok.eos_id], True),
              ([c("<|user|>")], False), (enc("how"), False), ([c("<|assistant|>")], False),
              (enc("world"), True), ([tok.eos_id], True)]
    want_ids = [i for ids, _ in pieces for i in ids]
    want_mask = [m for ids, m in pieces for _ in ids]
    ids, mask = tokenize_conversation(tok, CONVO)
    assert ids == want_ids
    assert mask == want_mask
    tokens, masks, stats = pack_examples([(ids, mask)], seq_len=len(ids) + 3, pad_id=tok.pad_id)
    x, y = SFTDataset(tokens, masks).get_batch([0])
    assert x[0, : len(ids)].tolist() == ids and (x[0, len(ids):] == tok.pad_id).all()
    for j in range(x.shape[1]):  # target j is token j+1 where that is an assistant token, else ignored
        nxt = j + 1
        expect = want_ids[nxt] if nxt < len(ids) and want_mask[nxt] else IGNORE_INDEX
        assert y[0, j].item() == expect, j
    assert stats.target_tokens == sum(want_mask)
    assert tok.decode([t for t in y[0].tolist() if t != IGNORE_INDEX]) == "hello<|eos|>world<|eos|>"


def test_mtp_loss_reads_the_same_masked_labels(init_ckpt, tok):
    model = nanoseek.load(init_ckpt)
    assert len(model.mtp) == 1
    ids, mask = tokenize_conversation(tok, CONVO)
    tokens, masks, _ = pack_examples([(ids, mask)] * 2, seq_len=2 * len(ids) + 1, pad_id=tok.pad_id)
    x, y = SFTDataset(tokens, masks).get_batch([0])
    with torch.no_grad():
        out = model(x, labels=y, mtp_loss_weight=0.3, aux_loss_alpha=0.0)
    shifted = y[:, 1:]  # depth 1 at position i predicts labels[i + 1]: still -100 off the assistant tokens
    keep = shifted != IGNORE_INDEX
    assert keep.sum() == (y != IGNORE_INDEX).sum() - (y[:, 0] != IGNORE_INDEX).sum()
    ce = torch.nn.functional.cross_entropy(out.mtp_logits[0].float()[keep], shifted[keep])
    assert torch.allclose(out.mtp_loss, ce, atol=1e-5)


def test_packing_boundaries_truncation_and_skips():
    def ex(n, first_target):  # n tokens (ids 10..), targets from index first_target on
        return list(range(10, 10 + n)), [i >= first_target for i in range(n)]

    a, b, c = ex(10, 6), ex(8, 4), ex(12, 3)
    long_kept, long_lost = ex(30, 15), ex(30, 25)
    tokens, masks, st = pack_examples([a, b, c, long_kept, long_lost], seq_len=20, pad_id=2)
    assert (st.examples, st.packed, st.truncated, st.skipped, st.sequences) == (5, 4, 2, 1, 3)
    assert tokens.shape == (3, 21) and st.longest == 30
    # next-fit: [a b pad*3], [c pad*9], [first 21 tokens of long_kept]
    assert tokens[0, :18].tolist() == a[0] + b[0] and (tokens[0, 18:] == 2).all() and masks[0, 18:].sum() == 0
    assert tokens[1, :12].tolist() == c[0] and (tokens[1, 12:] == 2).all()
    assert tokens[2].tolist() == long_kept[0][:21]
    x, y = SFTDataset(tokens, masks).get_batch([0, 1, 2])
    assert y[0, 9].item() == IGNORE_INDEX  # a's last position would predict b's first token: never a target
    assert y[0, 8].item() == a[0][9]  # a's own last token is a target
    assert y[0, 17:].eq(IGNORE_INDEX).all()  # b's end predicts padding
    assert y[0, 10:13].eq(IGNORE_INDEX).all() and y[0, 13].item() == b[0][4]
    assert st.pad_tokens == 3 + 9 and st.target_tokens == 4 + 4 + 9 + 6
    # the first token of an example is never a target, even when its mask says so
    t2, m2, _ = pack_examples([ex(4, 0)], seq_len=4, pad_id=2)
    assert m2[0, 0] == 0 and m2[0, 1:4].all()


@pytest.mark.parametrize("line,needle", [
    ('{"msgs": []}', "missing 'messages'"),
    ('{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}',
     "unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}',
     "content must be a string"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
    ('{"messages": [', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
])
def test_bad_records_name_file_and_line(tmp_path, line, needle):
    path = tmp_path / "chat.jsonl"
    good = json.dumps({"messages": CONVO})
    path.write_text(good + "\n\n" + line + "\n")  # the blank line 2 is skipped; the bad record is line 3
    with pytest.raises(DataError) as exc:
        read_chat_jsonl(path)
    assert f"{path}:3:" in str(exc.value) and needle in str(exc.value)


def test_template_that_is_not_prefix_stable_is_refused(tok):
    odd = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
           "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
           "{% if add_generation_prompt %}<|assistant|>Sure:{% endif %}")
    bad = NanoTokenizer(tok.backend, chat_template=odd)
    with pytest.raises(DataError, match="not prefix-stable"):
        tokenize_conversation(bad, CONVO)


def test_hash_split_keeps_duplicates_together_and_tops_up():
    hashes = [f"{i:064x}" for i in range(5)] * 2 + ["f" * 64] * 10
    is_val = split_by_hash(hashes, 0.5)
    assert is_val[:10] == [True] * 10 and not any(is_val[10:])
    assert split_by_hash(["8" * 64] * 3 + ["9" * 64] * 7, 0.0) == [False] * 10  # 0: nothing held out
    top = split_by_hash(["9" * 64] * 6 + ["8" * 64] * 4, 0.01)  # none under the threshold: the smallest goes
    assert top == [False] * 6 + [True] * 4
    assert split_by_hash(["9" * 64] * 5, 0.01) == [False] * 5  # too few examples to spare one


# ------------------------------------------------------------------------------------ cold start
def test_cold_start_examples_are_the_solver_solutions_below_the_eval_seeds(tmp_path, tok):
    recs = make_cold_start(["arithmetic:2", "linear"], n=5, seed=7)
    assert [r["task"] for r in recs] == ["arithmetic", "linear", "arithmetic", "linear", "arithmetic"]
    arith = get_task("arithmetic").generate(7, 3, 2)
    assert [r["messages"] for r in recs if r["task"] == "arithmetic"] == \
        [chat_messages(p, with_completion=True) for p in arith]
    assert recs[1]["difficulty"] == 1
    with pytest.raises(nanoseek.NanoseekError, match="held out"):
        make_cold_start(["arithmetic"], n=2, seed=EVAL_SEED_BASE)
    with pytest.raises(nanoseek.NanoseekError, match="unknown task"):
        make_cold_start(["nope"], n=2)
    path = write_jsonl(recs, tmp_path / "cs.jsonl")
    assert read_chat_jsonl(path) == [r["messages"] for r in recs]
    meta = build_sft_data([path], tok, 192, tmp_path / "data", val_fraction=0.0, **QUIET)
    train, val, _ = load_sft_data(tmp_path / "data", 192, tok)
    assert val is None and meta["splits"]["train"]["packed"] == 5 and len(train) == 5


def test_cold_start_answer_only_share_states_the_bare_answer(tmp_path):
    worked = make_cold_start(["arithmetic:2"], n=400, seed=3)
    mixed = make_cold_start(["arithmetic:2"], n=400, seed=3, answer_only_fraction=0.5)
    assert [r["messages"][:2] for r in mixed] == [r["messages"][:2] for r in worked]  # same questions
    cut = [m for m, w in zip(mixed, worked) if m != w]
    assert 160 <= len(cut) <= 240  # each example independently, p = 0.5
    for rec in cut:
        answer = rec["messages"][2]["content"].rpartition("<answer>")[2].removesuffix("</answer>")
        assert rec["messages"][2]["content"] == f"<think>The answer is {answer}.</think> <answer>{answer}</answer>"
    assert make_cold_start(["arithmetic:2"], n=400, seed=3, answer_only_fraction=0.5) == mixed  # seeded
    every = make_cold_start(["arithmetic:2"], n=50, seed=3, answer_only_fraction=1.0)
    answers = [p.answer for p in get_task("arithmetic").generate(3, 50, 2)]
    assert [r["messages"][2]["content"] for r in every] == [
        f"<think>The answer is {a}.</think> <answer>{a}</answer>" for a in answers]
    with pytest.raises(nanoseek.NanoseekError, match="answer_only_fraction"):
        make_cold_start(["arithmetic"], n=2, answer_only_fraction=1.5)


# ------------------------------------------------------------------------------------ training
SFT_RUN = dict(cold_start=["arithmetic:1"], cold_start_n=48, seq_len=192, batch_size=4, max_steps=24, lr=3e-3,
               warmup_steps=2, checkpoint_every=12, eval_every=12, eval_batches=2, val_fraction=0.1, device="cpu",
               seed=0)


def test_sft_run_learns_writes_final_and_resumes(init_ckpt, tmp_path, capsys):
    from nanoseek.train.sft import sft

    run = tmp_path / "sft"
    result = sft(run, dict(SFT_RUN, init_from=str(init_ckpt)), **QUIET)
    recs = records(run)
    assert {r["stage"] for r in recs} == {"sft"}
    first, last = recs[0], recs[-1]
    assert first["step"] == 1 and last["step"] == 24
    assert last["lm_loss"] < first["lm_loss"] - 1.0, (first["lm_loss"], last["lm_loss"])
    assert last["val_loss"] < first["lm_loss"] - 1.0
    assert last["mtp_loss"] is not None and last["mtp_loss"] < first["mtp_loss"]
    cost = json.loads((run / "cost.json").read_text())
    assert "sft" in cost["stages"] and cost["stages"]["sft"]["tokens"] > 0
    assert (run / "cold_start.jsonl").is_file() and (run / "report.md").is_file()
    cfg = json.loads((run / "train_config.json").read_text())
    assert cfg["init_from"] == str(init_ckpt) and cfg["data"] == [str(run.resolve() / "cold_start.jsonl")]
    assert (cfg["cold_start"], cfg["cold_start_n"], cfg["lr"]) == (["arithmetic:1"], 48, 3e-3)  # all it ran with
    # the last checkpoint's model and RUN_DIR/final: the same self-contained model with the init tokenizer
    final = run / "final"
    assert Path(result["final"]) == final.resolve()
    model = nanoseek.load(final)
    ckpt_model = nanoseek.load(run / "checkpoints" / "step_00000024" / "model")
    for (k, v), (k2, v2) in zip(model.state_dict().items(), ckpt_model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert (final / "tokenizer.json").read_bytes() == (init_ckpt / "tokenizer.json").read_bytes()
    # --resume continues the run (through the CLI)
    assert main(["sft", "--out", str(run), "--resume", "--max-steps", "26", "--checkpoint-every", "2"]) == 0
    assert "final model:" in capsys.readouterr().out
    steps = [r["step"] for r in records(run)]
    assert steps[-2:] == [25, 26] and steps.count(24) == 1
    assert (run / "checkpoints" / "step_00000026").is_dir()
    assert not torch.equal(nanoseek.load(final).lm_head.weight, model.lm_head.weight)


def test_sft_input_errors(init_ckpt, tmp_path, capsys):
    assert main(["sft", "--init-from", str(init_ckpt), "--out", str(tmp_path / "a")]) == 2
    assert "sft needs data" in capsys.readouterr().err
    assert main(["sft", "--init-from", str(init_ckpt), "--cold-start", "arithmetic:x", "--out",
                 str(tmp_path / "b")]) == 2
    assert "positive integer" in capsys.readouterr().err
    assert main(["sft", "--init-from", str(init_ckpt), "--cold-start", "arithmetic", "--cold-start-answer-only",
                 "2", "--out", str(tmp_path / "d")]) == 2
    assert "cold_start_answer_only must be <= 1, got 2.0" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "x"}]}\n')
    assert main(["sft", "--init-from", str(init_ckpt), "--data", str(bad), "--out", str(tmp_path / "c"),
                 "--device", "cpu"]) == 2
    assert f"{bad}:1: no assistant turn" in capsys.readouterr().err


def test_pretrain_also_leaves_a_final_model(tmp_path):
    from nanoseek.train.pretrain import pretrain

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"{p.prompt} {p.answer}" for p in get_task("arithmetic").generate(0, 200, 1)))
    run = tmp_path / "pre"
    result = pretrain(run, dict(preset="tiny", data=[str(corpus)], vocab_size=300, max_steps=2, seq_len=32,
                                batch_size=2, warmup_steps=1, checkpoint_every=2, eval_every=2, eval_batches=1,
                                device="cpu"), **QUIET)
    assert Path(result["final"]) == (run / "final").resolve()
    assert (run / "final" / "tokenizer.json").is_file()
    assert nanoseek.load(run / "final").config.vocab_size >= 300


# ------------------------------------------------------------------------------------ distillation
MAX_CHARS = 200


def scripted_samples(problem) -> list[tuple[str, str | None]]:
    """(completion, the reason it must be rejected or None when it must be kept), in sample order."""
    good = format_completion(problem)
    assert len(good) < MAX_CHARS
    a = problem.answer
    return [
        (good, None),
        (good, "duplicate"),
        (f"<think>guess</think> <answer>{int(a) + 1}</answer>", "wrong"),
        ("it is probably some number", "missing"),
        (f"<think>hmm</think> <answer>{a} apples</answer>", "malformed"),
        (f"{a} <answer>{a}</answer>", "bad_format"),
        (f"<think>{'checking ' * 30}</think> <answer>{a}</answer>", "too_long"),
        (f"<think>{a} it is</think> <answer>{a}</answer>", None),
        (f"<think>{a} it is</think> <answer>{a}</answer>", "duplicate"),
    ]


def test_distill_keeps_only_verified_samples_and_trains_the_student(init_ckpt, tmp_path, monkeypatch, capsys):
    from nanoseek.infer.engine import Completion, Engine
    from nanoseek.train.distill import REJECT_REASONS

    n_prompts, seed = 3, 5
    problems = get_task("arithmetic").generate(seed, n_prompts, 1)
    tokenizer = load_tokenizer(init_ckpt)
    by_prompt = {chat_prompt(tokenizer, p): p for p in problems}
    assert len(by_prompt) == n_prompts
    k = len(scripted_samples(problems[0]))
    calls = []

    def fake_generate(self, prompts, params):
        calls.append((list(prompts), list(params)))
        outs, seen = [], {}
        for text in prompts:
            j = seen.get(text, 0)
            seen[text] = j + 1
            completion = scripted_samples(by_prompt[text])[j][0]
            ids = self.tokenizer.encode(completion)
            outs.append(Completion(f"r{len(outs)}", [], ids, None, completion, "stop"))
        return outs

    monkeypatch.setattr(Engine, "generate", fake_generate)
    run = tmp_path / "distill"
    code = main(["distill", "--teacher", str(init_ckpt), "--task", "arithmetic:1", "--prompts", str(n_prompts),
                 "--samples-per-prompt", str(k), "--max-length-chars", str(MAX_CHARS), "--temperature", "0.8",
                 "--student-preset", "tiny", "--out", str(run), "--seed", str(seed), "--device", "cpu",
                 "--max-steps", "2", "--batch-size", "2", "--seq-len", "192", "--warmup-steps", "1",
                 "--checkpoint-every", "2", "--eval-every", "2"])
    assert code == 0, capsys.readouterr().err
    # the teacher saw every problem's chat prompt k times, each sample with its own seed
    [(prompts, params)] = calls
    assert len(prompts) == n_prompts * k and set(prompts) == set(by_prompt)
    assert len({p.seed for p in params}) == len(params) and all(p.temperature == 0.8 for p in params)
    stats = json.loads((run / "distill_stats.json").read_text())
    want = {r: 0 for r in REJECT_REASONS}
    kept_want = []
    for p in problems:
        for text, reason in scripted_samples(p):
            if reason is None:
                kept_want.append(chat_messages(p) + [{"role": "assistant", "content": text}])
            else:
                want[reason] += 1
    assert stats["rejected"] == want and stats["kept"] == len(kept_want) == 2 * n_prompts
    assert stats["sampled"] == n_prompts * k and stats["prompts_with_kept"] == n_prompts
    assert read_chat_jsonl(run / "distill_data.jsonl") == kept_want
    # the student: a fresh tiny model with the teacher's tokenizer, trained through the SFT path
    recs = records(run)
    assert {r["stage"] for r in recs} == {"distill"} and recs[-1]["step"] == 2
    cost = json.loads((run / "cost.json").read_text())
    assert {"distill", "distill_sampling"} <= set(cost["stages"])
    saved = json.loads((run / "train_config.json").read_text())  # everything the run was started with
    assert (saved["teacher"], saved["task"], saved["prompts"], saved["samples_per_prompt"], saved["temperature"],
            saved["max_length_chars"], saved["preset"]) == (str(init_ckpt), "arithmetic:1", n_prompts, k, 0.8,
                                                            MAX_CHARS, "tiny")
    student = nanoseek.load(run / "final")
    assert student.config.vocab_size == padded_vocab_size(tokenizer.vocab_size)
    assert (run / "final" / "tokenizer.json").read_bytes() == (init_ckpt / "tokenizer.json").read_bytes()


def test_distill_from_a_random_teacher_fails_with_no_verified_samples(init_ckpt, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    run = tmp_path / "d"
    res = subprocess.run([sys.executable, "-m", "nanoseek", "distill", "--teacher", str(init_ckpt), "--task",
                          "arithmetic:1", "--prompts", "2", "--samples-per-prompt", "2", "--max-tokens", "6",
                          "--student-preset", "tiny", "--out", str(run), "--device", "cpu"],
                         capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert res.returncode == 2, res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: distill: no verified samples"), res.stderr
    stats = json.loads((run / "distill_stats.json").read_text())
    assert stats["sampled"] == 4 and stats["kept"] == 0 and sum(stats["rejected"].values()) == 4
    assert not (run / "distill_data.jsonl").exists() and not (run / "checkpoints").exists()
