"""Evaluation metrics against direct counts, and one real run through the shared engine."""

import json

import pytest
import torch

import nanoseek
from nanoseek.cli import main
from nanoseek.data.tokenizer import padded_vocab_size, train_tokenizer
from nanoseek.infer.engine import Engine
from nanoseek.tasks import get_task
from nanoseek.tasks.evaluate import (EVAL_SEED_BASE, VALIDATION_SEED_BASE, eval_problems, evaluate, majority_answer,
                                     pass_at_k, score)


def test_pass_at_k_known_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)
    assert pass_at_k(3, 2, 2) == 1.0  # every pair holds a correct one
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_majority_answer():
    outs = ["<think>a</think> <answer>7</answer>", "<answer> 5 </answer>", "<answer>5</answer>", "junk"]
    assert majority_answer(outs) == "5"
    assert majority_answer(["no answer here"]) is None


def test_score_matches_a_direct_count():
    task = get_task("arithmetic")
    problems = task.generate(0, 4, difficulty=1)
    right = [f"<think>x</think> <answer>{p.answer}</answer>" for p in problems]
    wrong = [f"<think>x</think> <answer>{int(p.answer) + 1}</answer>" for p in problems]
    unformatted = [f"the answer is <answer>{p.answer}</answer>" for p in problems]
    samples = [
        [right[0], right[0], wrong[0]],       # 2/3 correct, majority right
        [wrong[1], wrong[1], right[1]],       # 1/3 correct, majority wrong
        [wrong[2], "nothing", "nothing"],     # 0/3
        [unformatted[3], right[3], right[3]], # 3/3 correct, one badly formatted
    ]
    lengths = [[10, 20, 30], [5, 5, 5], [1, 2, 3], [4, 4, 4]]
    result = score(task, problems, samples, lengths, k=2)
    assert result.accuracy == pytest.approx(6 / 12)
    expected_pass2 = (pass_at_k(3, 2, 2) + pass_at_k(3, 1, 2) + 0 + 1) / 4
    assert result.pass_at_k == pytest.approx(expected_pass2)
    assert result.maj_at_k == pytest.approx(2 / 4)
    assert result.mean_length == pytest.approx(sum(map(sum, lengths)) / 12)
    # well formed: problem 0: 3, problem 1: 3, problem 2: 1 (the wrong one), problem 3: 2
    assert result.format_rate == pytest.approx(9 / 12)


def test_eval_problems_are_held_out():
    task = get_task("arithmetic")
    held_out = eval_problems(task, 5, difficulty=2, seed=3)
    assert [p.prompt for p in held_out] == [p.prompt for p in task.generate(EVAL_SEED_BASE + 3, 5, 2)]
    assert [p.prompt for p in held_out] != [p.prompt for p in task.generate(3, 5, 2)]
    # the validation split (choosing checkpoints) is a third seed range: neither training's nor the test's
    validation = eval_problems(task, 5, difficulty=2, seed=3, split="validation")
    assert [p.prompt for p in validation] == [p.prompt for p in task.generate(VALIDATION_SEED_BASE + 3, 5, 2)]
    assert VALIDATION_SEED_BASE >= 2 * EVAL_SEED_BASE and [p.prompt for p in validation] != [p.prompt for p in held_out]
    with pytest.raises(ValueError, match="'train'"):
        eval_problems(task, 5, split="train")


def test_evaluate_through_the_engine_counts_what_it_returns():
    torch.manual_seed(0)
    texts = [f"{a} + {b} = {a + b}" for a in range(30) for b in range(5)]
    tok = train_tokenizer(iter(texts), vocab_size=300, out_dir=None)
    cfg = nanoseek.get_preset("tiny").replace(vocab_size=padded_vocab_size(tok.vocab_size),
                                             max_position_embeddings=512)
    engine = Engine(nanoseek.DeepSeekV3(cfg).eval(), tok, max_slots=8)
    result = evaluate(engine, tok, "arithmetic", n_problems=3, samples=2, k=2, temperature=1.0,
                      max_tokens=8, seed=1)
    assert result.n_problems == 3 and result.samples_per_problem == 2
    verdicts = [v for p in result.problems for v in p.verdicts]
    assert result.accuracy == pytest.approx(verdicts.count("correct") / len(verdicts))
    assert all(1 <= n <= 8 for p in result.problems for n in p.lengths)
    again = evaluate(engine, tok, "arithmetic", n_problems=3, samples=2, k=2, temperature=1.0,
                     max_tokens=8, seed=1)
    assert [p.completions for p in again.problems] == [p.completions for p in result.problems]


def test_eval_command_takes_the_difficulty_in_the_task_spec(tmp_path, capsys):
    texts = [f"{a} + {b} = {a + b}" for a in range(30) for b in range(5)]
    ckpt = tmp_path / "ckpt"
    tok = train_tokenizer(iter(texts), vocab_size=300, out_dir=tmp_path / "tok")
    cfg = nanoseek.get_preset("tiny").replace(vocab_size=padded_vocab_size(tok.vocab_size),
                                             max_position_embeddings=512)
    torch.manual_seed(0)
    nanoseek.save(nanoseek.DeepSeekV3(cfg), ckpt)
    for f in (tmp_path / "tok").iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    base = ["eval", "--ckpt", str(ckpt), "--n", "2", "--max-tokens", "4", "--device", "cpu"]
    assert main([*base, "--task", "arithmetic:2"]) == 0
    assert json.loads(capsys.readouterr().out)["difficulty"] == 2
    assert main([*base, "--task", "arithmetic", "--difficulty", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["difficulty"] == 3
    assert main([*base, "--task", "arithmetic:2", "--difficulty", "3"]) == 2
    err = capsys.readouterr().err
    assert "arithmetic:2" in err and "--difficulty 3" in err
