"""Tests for nanoseek.tasks: safe math, verifiers, generators, R1-Zero format, rewards."""

import json
import time
from fractions import Fraction

import pytest

from nanoseek.tasks import (
    REWARDS,
    TASKS,
    CountdownTask,
    GSM8KTask,
    MathParseError,
    Problem,
    RegistryError,
    Task,
    TaskDataError,
    Verdict,
    accuracy_reward,
    check_countdown,
    combined_reward,
    countdown_reward,
    format_completion,
    format_ok,
    format_prompt,
    format_reward,
    get_reward,
    get_task,
    load_gsm8k,
    parse_answer,
    parse_expression,
    parse_number,
    register_reward,
    register_task,
    safe_eval,
    try_eval,
)
from nanoseek.tasks.passkey import CHARS_PER_LEVEL, PasskeyTask, difficulty_for_tokens

GENERATED = ["arithmetic", "countdown", "linear", "passkey"]


def wrap(answer: str, think: str = "reasoning") -> str:
    return f"<think>{think}</think> <answer>{answer}</answer>"


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    elapsed = time.perf_counter() - start
    # A safety bound (hostile input must not stall the reward), not a benchmark.
    assert elapsed < 1.0, f"took {elapsed:.2f}s"
    return result


# ---------------------------------------------------------------- safe_math


@pytest.mark.parametrize("expr, value", [
    ("1 + 2 * 3", 7),
    ("(1 + 2) * 3", 9),
    ("7 / 2", Fraction(7, 2)),
    ("-3 + +4", 1),
    ("0.1 + 0.2", Fraction(3, 10)),
    ("6 \u00d7 7 \u00f7 2 \u2212 1", 20),
    (" 100 - 99\n", 1),
])
def test_safe_eval_values(expr, value):
    assert safe_eval(expr) == value


def test_parse_expression_reports_numbers():
    parsed = parse_expression("-(25 - 3) * 25")
    assert parsed.value == -550
    assert parsed.numbers == (25, 3, 25)


HOSTILE = [
    "9**9**9**9",
    "2**99999999",
    "(" * 10_000 + "1" + ")" * 10_000,
    "__import__('os').system('echo hi')",
    "().__class__",
    "().__class__.__bases__[0].__subclasses__()",
    "lambda: 1",
    "(lambda x: x)(1)",
    "open('/etc/passwd')",
    "x",
    "'abc'",
    "[1, 2]",
    "1 if 1 else 2",
    "1 // 2",
    "7 % 3",
    "1 < 2",
    "1_000",
    "0x10",
    "1e999",
    "1j",
    "True",
    "1; 2",
    "1 / 0",
    "1 / (2 - 2)",
    "",
    "   ",
    "007",
    "1 +",
    "-" * 150 + "1",            # depth
    "1+" * 99 + "1",            # node count
    "999999 * 999999 * 999999",  # intermediate magnitude
    "1 / 999999 / 999999 / 999",  # denominator magnitude
    "9" * 20,                    # constant magnitude
    "1\x00",
    "9" * 10_000_000,            # 10 MB
]


@pytest.mark.parametrize("expr", HOSTILE, ids=lambda s: repr(s[:30]))
def test_safe_eval_rejects_hostile_fast(expr):
    with pytest.raises(MathParseError):
        timed(safe_eval, expr)
    assert timed(try_eval, expr) is None


def test_safe_eval_rejects_non_string():
    for bad in (None, 5, b"1+1", ["1"]):
        with pytest.raises(MathParseError):
            safe_eval(bad)


def test_deep_nesting_with_raised_length_limit_still_invalid():
    nested = "(" * 10_000 + "1" + ")" * 10_000
    with pytest.raises(MathParseError):
        timed(parse_expression, nested, max_chars=10**6)
    unary = "-" * 50_000 + "1"
    with pytest.raises(MathParseError):
        timed(parse_expression, unary, max_chars=10**6, max_nodes=10**6)


def test_integer_only_mode():
    with pytest.raises(MathParseError):
        parse_expression("2.5 * 2", allow_float=False)


# ---------------------------------------------------------------- format


def test_parse_answer_takes_last_and_caps_length():
    assert parse_answer("<answer>1</answer> then <answer> 2 </answer>") == "2"
    assert parse_answer("<answer>1</answer> <answer>2") == "1"
    assert parse_answer("no tags") is None
    assert parse_answer("</answer><answer>") is None
    assert parse_answer("<answer>" + "9" * 5000 + "</answer>") is None
    assert parse_answer(None) is None


def test_format_ok():
    assert format_ok("<think>a</think><answer>b</answer>")
    assert format_ok("  <think>\nsteps\n</think>\n\n<answer> 42 </answer>\n ")
    assert format_ok("<think></think> <answer>1</answer>")
    bad = [
        "<answer>1</answer>",
        "<think>a</think>",
        "hi <think>a</think><answer>1</answer>",
        "<think>a</think><answer>1</answer> trailing",
        "<think>a</think> between <answer>1</answer>",
        "<think>a</think><answer>1</answer><answer>2</answer>",
        "<think>a<think>b</think><answer>1</answer>",
        "<think>a</think></think><answer>1</answer>",
        "<think>a</think><answer>  </answer>",
        "<answer>1</answer><think>a</think>",
        "<think>a <answer>1</answer></think><answer>2</answer>",
        "",
        None,
    ]
    for text in bad:
        assert not format_ok(text), text


def test_prompt_template_and_completion():
    problem = get_task("linear").generate(0, 1, 1)[0]
    prompt = format_prompt(problem)
    assert problem.prompt in prompt and "<think>" in prompt and "<answer>" in prompt
    assert prompt.rstrip().endswith("Assistant:")
    assert format_prompt(problem, prefill_think=True).endswith("<think>")
    completion = format_completion(problem)
    assert completion == f"<think>{problem.solution}</think> <answer>{problem.answer}</answer>"
    assert format_ok(completion)


def test_format_reward_with_prefilled_think():
    prompt = format_prompt("q", prefill_think=True)
    assert format_reward(prompt, "steps</think> <answer>1</answer>", {}) == 1.0
    assert format_reward("plain prompt", "steps</think> <answer>1</answer>", {}) == 0.0


# ---------------------------------------------------------------- verifiers


def test_arithmetic_verifier():
    task = get_task("arithmetic")
    fields = {"task": "arithmetic", "answer": -1234}
    assert task.check("-1234", fields) is Verdict.CORRECT
    assert task.check("  -1234 ", fields) is Verdict.CORRECT
    assert task.check("1234", fields) is Verdict.WRONG
    for bad in ["-1,234", "-1234.0", "x = -1234", "minus 1234", "", "--1234", "9**9**9"]:
        assert task.check(bad, fields) is Verdict.MALFORMED, bad


def test_linear_verifier():
    task = get_task("linear")
    fields = {"task": "linear", "x": -2}
    for good in ["x = -2", "x=-2", "-2", " X = -2 "]:
        assert task.check(good, fields) is Verdict.CORRECT, good
    assert task.check("x = 3", fields) is Verdict.WRONG
    assert task.check("3", {"task": "linear", "x": 3}) is Verdict.CORRECT
    for bad in ["x = -2.5", "y = -2", "x == -2", "-2 + 0", "two"]:
        assert task.check(bad, fields) is Verdict.MALFORMED, bad


def test_countdown_verifier():
    numbers, target = [25, 3, 7, 50], 82
    assert check_countdown("25 + 50 + 7", numbers, target) is Verdict.CORRECT
    assert check_countdown("(50 - 25) * 3 + 7", numbers, target) is Verdict.CORRECT
    assert check_countdown("50 + 25 + 7 = 82", numbers, target) is Verdict.CORRECT
    assert check_countdown("50 \u00d7 1 + 25 + 7", numbers, target) is Verdict.WRONG  # 1 not given
    assert check_countdown("25 + 25 + 25 + 7", numbers, target) is Verdict.WRONG      # reuse
    assert check_countdown("82", numbers, target) is Verdict.WRONG                    # not given
    assert check_countdown("50 + 25", numbers, target) is Verdict.WRONG               # wrong value
    assert check_countdown("50 + 25 + 7 = 83", numbers, target) is Verdict.WRONG      # wrong claim
    assert check_countdown("50 + 25 + 7", numbers, target, use_all=True) is Verdict.WRONG
    assert check_countdown("(50 - 25) * 3 + 7", numbers, target, use_all=True) is Verdict.CORRECT
    # Duplicates in the given numbers may each be used once.
    assert check_countdown("5 * 5 - 1", [5, 5, 1], 24) is Verdict.CORRECT
    assert check_countdown("5 * 5 * 5 - 101", [5, 5, 101], 24) is Verdict.WRONG
    # Division is exact, not floor.
    assert check_countdown("(7 / 2) * 2", [7, 2, 2], 7) is Verdict.CORRECT
    assert check_countdown("7 / 2", [7, 2], 3) is Verdict.WRONG
    for bad in ["50 ** 1 + 32", "25.0 + 50 + 7", "a + b", "1 = 2 = 3", "", "sum([25,50,7])"]:
        assert check_countdown(bad, numbers, target) is Verdict.MALFORMED, bad


def test_gsm8k_parse_number():
    assert parse_number("1,234") == 1234
    assert parse_number("$18") == 18
    assert parse_number(" -$3.50 ") == Fraction(-7, 2)
    assert parse_number("18.0") == 18
    for bad in ["18 dollars", "1/2", "1e3", "", "$", "abc", "9" * 500]:
        assert parse_number(bad) is None, bad


def test_gsm8k_verifier():
    task = get_task("gsm8k")
    fields = {"task": "gsm8k", "answer": "1234"}
    for good in ["1234", "1,234", "$1,234", "1234.0", "1234.00"]:
        assert task.check(good, fields) is Verdict.CORRECT, good
    assert task.check("1235", fields) is Verdict.WRONG
    assert task.check("1234 apples", fields) is Verdict.MALFORMED


# ---------------------------------------------------------------- hostile completions


HOSTILE_ANSWERS = [
    "9**9**9**9",
    "2**99999999",
    "(" * 10_000 + "1" + ")" * 10_000,
    "__import__('os').system('echo hi')",
    "().__class__",
    "lambda: 82",
]


@pytest.mark.parametrize("task_name", ["arithmetic", "countdown", "linear", "gsm8k", "passkey"])
def test_hostile_answers_get_zero_reward_fast(task_name):
    fields = {"passkey": {"task": "passkey", "key": "82"},
              "arithmetic": {"task": "arithmetic", "answer": 82},
              "countdown": {"task": "countdown", "numbers": [25, 50, 7], "target": 82},
              "linear": {"task": "linear", "x": 82},
              "gsm8k": {"task": "gsm8k", "answer": "82"}}[task_name]
    right = "25 + 50 + 7" if task_name == "countdown" else "82"
    completions = [wrap(a) for a in HOSTILE_ANSWERS]
    huge = "x" * 10_000_000
    completions += [
        huge,
        wrap(right, think=huge),                    # long but well-formed: judged on its answer
        "<answer>" + huge + "</answer>",
        "<answer>" * 1_000_000,
        "<think>" * 1_000_000 + "<answer>82",
    ]
    for i, completion in enumerate(completions):
        for reward in (accuracy_reward, countdown_reward, combined_reward(1.0, 0.0)):
            value = timed(reward, "prompt", completion, fields)
            if i == len(HOSTILE_ANSWERS) + 1:
                assert value >= 1.0
            else:
                assert value == 0.0, (reward, completion[:40])
        timed(format_reward, "prompt", completion, fields)


# ---------------------------------------------------------------- generators


@pytest.mark.parametrize("name", GENERATED)
def test_generators_deterministic_per_seed(name):
    task = get_task(name)
    a = task.generate(seed=7, n=20, difficulty=2)
    b = task.generate(seed=7, n=20, difficulty=2)
    c = task.generate(seed=8, n=20, difficulty=2)
    assert [p.to_dict() for p in a] == [p.to_dict() for p in b]
    assert [p.prompt for p in a] != [p.prompt for p in c]
    assert [p.prompt for p in task.generate(seed=7, n=5, difficulty=2)] == [p.prompt for p in a[:5]]
    assert len({p.prompt for p in a}) > 10  # not the same problem over and over


@pytest.mark.parametrize("name", GENERATED)
@pytest.mark.parametrize("difficulty", [1, 2, 4])
def test_generated_problems_verify(name, difficulty):
    task = get_task(name)
    problems = task.generate(seed=difficulty, n=200, difficulty=difficulty)
    assert len(problems) == 200
    for p in problems:
        assert p.fields["task"] == name
        json.dumps(p.fields)  # fields must survive a JSONL round trip
        assert task.check(p.answer, p.fields) is Verdict.CORRECT, (p.prompt, p.answer)
        completion = format_completion(p)
        assert format_ok(completion)
        assert accuracy_reward(p.prompt, completion, p.fields) == 1.0
        assert countdown_reward(p.prompt, completion, p.fields) == 1.0
        assert combined_reward(1.0, 0.5)(p.prompt, completion, p.fields) == 1.5
        assert p.solution.strip() and p.prompt.strip()


def test_difficulty_knobs():
    countdown = get_task("countdown")
    assert {len(p.fields["numbers"]) for p in countdown.generate(0, 30, 1)} == {3}
    assert {len(p.fields["numbers"]) for p in countdown.generate(0, 30, 4)} == {6}
    for p in countdown.generate(0, 50, 3):
        assert all(1 <= n <= 100 for n in p.fields["numbers"])
        assert 1 <= p.fields["target"] <= 999
    arithmetic = get_task("arithmetic")
    easy = arithmetic.generate(0, 30, 1)
    hard = arithmetic.generate(0, 30, 6)
    assert max(abs(p.fields["answer"]) for p in easy) < 20
    assert max(len(p.fields["expression"]) for p in hard) > max(len(p.fields["expression"]) for p in easy)
    assert any("=" in p.fields["equation"] and p.fields["equation"].count("x") == 2
               for p in get_task("linear").generate(0, 20, 3))


def test_passkey_length_depth_and_verdicts():
    task = get_task("passkey")
    lengths = {d: [p.fields["haystack_chars"] for p in task.generate(0, 10, d)] for d in (1, 4, 16)}
    for d, chars in lengths.items():  # CHARS_PER_LEVEL characters per level, plus the needle
        assert all(CHARS_PER_LEVEL * d <= c <= CHARS_PER_LEVEL * d + 120 for c in chars), (d, chars)
    for depth in (0.0, 0.5, 1.0):
        for p in PasskeyTask(depth=depth).generate(1, 5, 16):
            haystack = p.prompt.partition("\n")[0]
            needle = f"The pass key is {p.answer}. Remember it. {p.answer} is the pass key."
            filler = len(haystack) - len(needle) - 1  # the filler alone (one joining space less)
            assert abs(haystack.index(needle) / filler - depth) < 0.05, (depth, haystack.index(needle), filler)
            assert p.prompt.count(p.answer) == 2 and p.prompt.endswith("What is the pass key?")
    depths = [p.fields["depth"] for p in task.generate(0, 200, 2)]
    assert min(depths) < 0.1 and max(depths) > 0.9  # drawn across the haystack by default
    fields = task.generate(0, 1, 1)[0].fields
    assert task.check(fields["key"], fields) is Verdict.CORRECT
    assert task.check(str(int(fields["key"]) + 1), fields) is Verdict.WRONG
    assert task.check("the key", fields) is Verdict.MALFORMED
    with pytest.raises(ValueError, match="depth"):
        PasskeyTask(depth=1.5)
    # difficulty_for_tokens: the largest level that fits, counted here in characters
    level = difficulty_for_tokens(2000, len)
    assert max(len(p.prompt) for p in task.generate(0, 8, level)) <= 2000
    assert max(len(p.prompt) for p in task.generate(0, 8, level + 1)) > 2000


def test_generate_rejects_bad_arguments():
    task = get_task("linear")
    with pytest.raises(ValueError):
        task.generate(0, 1, difficulty=0)
    with pytest.raises(ValueError):
        task.generate(0, -1, difficulty=1)
    assert task.generate(0, 0) == []


def test_countdown_solution_is_a_trace_ending_at_the_answer():
    for p in get_task("countdown").generate(3, 20, 3):
        assert p.solution.rstrip().endswith(f"{p.answer} = {p.fields['target']}.")
        assert "Try " in p.solution


def test_wrong_answers_score_per_countdown_scale():
    p = get_task("countdown").generate(0, 1, 2)[0]
    numbers, target = p.fields["numbers"], p.fields["target"]
    wrong = " + ".join(map(str, numbers))
    if safe_eval(wrong) == target:
        wrong = str(numbers[0])
    assert countdown_reward("", wrap(wrong), p.fields) == pytest.approx(0.1)
    assert countdown_reward("", wrap("no idea"), p.fields) == 0.0
    assert countdown_reward("", "no answer tags", p.fields) == 0.0
    assert countdown_reward("", wrap(p.answer), p.fields) == 1.0


# ---------------------------------------------------------------- gsm8k loader


def _gsm_line(question, answer_text):
    return json.dumps({"question": question, "answer": answer_text}) + "\n"


def test_gsm8k_loader_and_generate(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text(
        _gsm_line("Tom has 3 apples and buys 4. How many?", "3+4=<<3+4=7>>7 apples.\n#### 7")
        + "\n"
        + _gsm_line("A car costs $12,000 and a bike $500. Total?",
                    "12000+500=<<12000+500=12500>>12,500\n#### 12,500")
        + _gsm_line("Half of 5?", "5/2=<<5/2=2.5>>2.5\n#### 2.50"),
        encoding="utf-8",
    )
    problems = load_gsm8k(path)
    assert [p.answer for p in problems] == ["7", "12500", "2.5"]
    assert problems[0].solution == "3+4=7 apples."
    assert "<<" not in problems[1].solution
    task = GSM8KTask.from_file(path)
    for p in task.generate(seed=0, n=7):
        assert accuracy_reward(p.prompt, format_completion(p), p.fields) == 1.0
        assert format_ok(format_completion(p))
    assert [p.prompt for p in task.generate(1, 3)] == [p.prompt for p in task.generate(1, 3)]
    assert accuracy_reward("", wrap("$12,500.00"), problems[1].fields) == 1.0
    assert accuracy_reward("", wrap("12,501"), problems[1].fields) == 0.0
    with pytest.raises(TaskDataError):
        GSM8KTask().generate(0, 1)


@pytest.mark.parametrize("bad_line, reason", [
    ("{not json", "invalid JSON"),
    ('["a list"]', "JSON object"),
    (json.dumps({"question": "q"}), "answer"),
    (json.dumps({"question": "q", "answer": "no final line"}), "####"),
    (json.dumps({"question": "q", "answer": "x\n#### seven"}), "not a number"),
])
def test_gsm8k_loader_names_file_and_line(tmp_path, bad_line, reason):
    path = tmp_path / "bad.jsonl"
    good = _gsm_line("q1", "1+1=2\n#### 2")
    path.write_text(good + "\n" + bad_line + "\n" + good, encoding="utf-8")
    with pytest.raises(TaskDataError) as info:
        load_gsm8k(path)
    message = str(info.value)
    assert f"{path}:3:" in message and reason in message


def test_gsm8k_loader_missing_file_and_bad_utf8(tmp_path):
    with pytest.raises(TaskDataError, match="not found"):
        load_gsm8k(tmp_path / "nope.jsonl")
    path = tmp_path / "bin.jsonl"
    path.write_bytes(_gsm_line("q", "#### 1").encode() + b"\xff\xfe\n")
    with pytest.raises(TaskDataError, match=r"bin.jsonl:2: not valid UTF-8"):
        load_gsm8k(path)


# ---------------------------------------------------------------- registries


def test_registries():
    assert {"arithmetic", "countdown", "linear", "gsm8k"} <= set(TASKS)
    assert {"accuracy", "format", "combined", "countdown"} <= set(REWARDS)
    assert get_reward("countdown") is countdown_reward
    with pytest.raises(RegistryError, match="known tasks"):
        get_task("nope")
    with pytest.raises(RegistryError, match="known rewards"):
        get_reward("nope")
    with pytest.raises(ValueError):
        register_task(CountdownTask())
    assert accuracy_reward("", wrap("1"), {}) is None
    assert combined_reward()("", wrap("1"), {"no": "task"}) is None
    with pytest.raises(RegistryError):
        accuracy_reward("", wrap("1"), {"task": "unknown-task"})


def test_user_task_and_reward_registration():
    class EchoTask(Task):
        name = "test-echo"

        def make_problem(self, rng, difficulty):
            word = rng.choice(["alpha", "beta", "gamma"])
            return Problem(prompt=f"Repeat: {word}", answer=word, fields={"word": word},
                           solution=f"The word is {word}.")

        def check(self, answer, fields):
            return Verdict.CORRECT if answer == fields["word"] else Verdict.WRONG

    task = register_task(EchoTask(), overwrite=True)
    try:
        p = get_task("test-echo").generate(0, 1)[0]
        assert p.fields["task"] == "test-echo"
        assert accuracy_reward(p.prompt, format_completion(p), p.fields) == 1.0

        def length_penalty(prompt, completion, fields):
            return -len(completion) / 1000

        register_reward("test-length", length_penalty, overwrite=True)
        assert get_reward("test-length")("", "abc", {}) == pytest.approx(-0.003)
    finally:
        TASKS.pop(task.name, None)
        REWARDS.pop("test-length", None)


def test_chat_messages_share_one_instruction_and_carry_the_ideal_completion():
    from nanoseek.tasks import SYSTEM_PROMPT, chat_messages, format_completion, get_task

    problem = get_task("linear").generate(0, 1, 1)[0]
    msgs = chat_messages(problem, with_completion=True)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert msgs[0]["content"] == SYSTEM_PROMPT and msgs[1]["content"] == problem.prompt
    assert msgs[2]["content"] == format_completion(problem)
    assert get_task("linear").grade(msgs[2]["content"], problem.fields).value == "correct"


# ---------------------------------------------------------------- issue 13, item 9


def test_arithmetic_check_returns_a_verdict_for_integers_past_the_int_digit_limit():
    # int() refuses strings of more than 4300 digits (sys.get_int_max_str_digits): the verifier
    # raised ValueError here, although Task.check must never raise on bad text.
    task = get_task("arithmetic")
    fields = {"task": "arithmetic", "answer": 42}
    assert task.check("9" * 5000, fields) is Verdict.WRONG
    assert task.check("-" + "9" * 5000, fields) is Verdict.WRONG
    assert task.check("0" * 5000 + "42", fields) is Verdict.CORRECT  # leading zeros, as int() read them
    assert task.check("-0", {"task": "arithmetic", "answer": 0}) is Verdict.CORRECT
    assert task.check("-42", fields) is Verdict.WRONG
    for name in BUILTIN_TASKS:  # no verifier raises on a huge number
        assert isinstance(get_task(name).check("9" * 5000, VALID[name][0]), Verdict)


def test_a_flat_long_sum_parses_and_deep_nesting_is_refused_for_its_depth():
    # A flat sum of more than MAX_DEPTH (40) terms was refused as "nests deeper than 40": ast.parse
    # makes it a left-leaning tree as deep as it is long.
    for n in (41, 50, 64):
        assert safe_eval("+".join(["1"] * n)) == n
    assert safe_eval("-".join(["2"] * 60)) == 2 - 2 * 59
    assert safe_eval("+".join(["2*3"] * 30)) == 180  # sums of products: depth 2 however long
    assert check_countdown("1+" * 44 + "6", [1] * 44 + [6], 50) is Verdict.CORRECT
    # length is its own limit, with its own message
    with pytest.raises(MathParseError, match="more than 128 nodes"):
        safe_eval("+".join(["1"] * 65))
    with pytest.raises(MathParseError, match="longer than 200 characters"):
        safe_eval("+".join(["1"] * 101))
    # nesting is still bounded, with the depth message
    for deep in ("1+(" * 40 + "1" + ")" * 40, "2*(" * 40 + "1" + ")" * 40, "-" * 41 + "1", "- (" * 40 + "1" + ")" * 40):
        with pytest.raises(MathParseError, match="nests deeper than 40"):
            safe_eval(deep)
    assert safe_eval("1+(" * 38 + "1" + ")" * 38) == 39  # within the depth limit
    # with the length limits raised, a long chain evaluates in a loop (no recursion, no depth error)
    long_sum = "+".join(["1"] * 900)  # (ast.parse itself recurses past a few thousand terms)
    assert timed(safe_eval, long_sum, max_chars=10**6, max_nodes=10**6) == 900


BUILTIN_TASKS = ("arithmetic", "countdown", "linear", "gsm8k", "passkey")
#: per built-in task: (fields of a problem, a correct answer written with ASCII digits)
VALID = {"arithmetic": ({"task": "arithmetic", "answer": 1209}, "1209"),
         "countdown": ({"task": "countdown", "numbers": [25, 3, 7, 50], "target": 82}, "(50 - 25) * 3 + 7"),
         "linear": ({"task": "linear", "x": -37}, "x = -37"),
         "gsm8k": ({"task": "gsm8k", "answer": "1209"}, "1,209"),
         "passkey": ({"task": "passkey", "key": "12093"}, "12093")}
#: zero of each digit set Python's \d / int() / Fraction() accept besides ASCII
UNICODE_ZEROS = {"arabic-indic": 0x0660, "extended arabic-indic": 0x06F0, "devanagari": 0x0966,
                 "full-width": 0xFF10, "mathematical bold": 0x1D7CE}


def _in_script(text, zero, only_first=False):
    out, done = [], False
    for c in text:
        if c in "0123456789" and not (only_first and done):
            c, done = chr(zero + int(c)), True
        out.append(c)
    return "".join(out)


def test_every_task_reads_only_ascii_digits():
    # One rule for every task (nanoseek.tasks.base, "Digits"): arithmetic, linear and gsm8k accepted
    # Arabic-Indic or full-width digits (\d, int() and Fraction() take them) while countdown refused them.
    unknown = {n for n in TASKS if n not in BUILTIN_TASKS and not n.startswith("test")}
    assert not unknown, f"new registered task(s) {unknown}: add them to VALID"
    for name in BUILTIN_TASKS:
        task = get_task(name)
        fields, answer = VALID[name]
        assert task.check(answer, fields) is Verdict.CORRECT, name
        assert accuracy_reward("", wrap(answer), fields) == 1.0
        for script, zero in UNICODE_ZEROS.items():
            for only_first in (False, True):
                other = _in_script(answer, zero, only_first)
                assert other != answer
                assert task.check(other, fields) is Verdict.MALFORMED, (name, script, other)
                assert accuracy_reward("", wrap(other), fields) == 0.0
        for sup in ("\u00b2", "\u2082"):  # superscript / subscript two: isdigit() but not int()
            assert task.check(answer + sup, fields) is Verdict.MALFORMED, (name, sup)


def test_task_specs_take_ascii_difficulties_only():
    from nanoseek.errors import ConfigError
    from nanoseek.tasks import ASCII_DIGITS, is_ascii_digits
    from nanoseek.tasks.coldstart import parse_task_spec

    assert ASCII_DIGITS == "0123456789" and is_ascii_digits("042") and not is_ascii_digits("")
    assert not any(is_ascii_digits(x) for x in ("\u0663", "\uff13", "\u00b3", "3 ", "-3", None))
    assert parse_task_spec("countdown:3") == ("countdown", 3)
    for bad in ("countdown:\u00b3", "countdown:\u0663", "countdown:0", "countdown:x"):
        with pytest.raises(ConfigError, match="positive integer"):  # "³" raised ValueError from int()
            parse_task_spec(bad)
