"""Shared by the server, chat and web-page tests: a tiny chat checkpoint and a live uvicorn server.

The checkpoint is the ``tiny`` preset with a small BPE tokenizer, trained for a few seconds to
memorise ONE chat exchange with R1-style reasoning, so that greedy decoding of :data:`QUESTION`
answers exactly ``<think>REASONING</think>ANSWER<|eos|>``: the reasoning split, the EOS stop and
the finish reason can then be checked end to end. Other prompts give the usual random-ish text.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import torch

QUESTION = "What is 2+2?"
REASONING = "two plus two is four"
ANSWER = "The answer is 4."

_CORPUS = [
    "hello world, the quick brown fox jumps over the lazy dog.",
    "What is 2+2? two plus two is four. The answer is 4.",
    "numbers: one two three four five six seven eight nine ten",
    "The model thinks first, then it answers the question.",
]


def _greedy_margin(model, batch: torch.Tensor, n_prompt: int) -> float:
    """Smallest gap, over the answer's positions, between the target token's logit and the best other one.

    Greedy decoding reproduces the exchange when it is positive; a margin of a few units keeps it so
    under any CPU kernel's rounding (the engine's absorbed attention differs from this forward by ~1e-5).
    """
    model.eval()
    with torch.no_grad():
        logits = model(batch[:, :-1]).logits[0, n_prompt - 1:]
    model.train()
    target = batch[0, n_prompt:]
    chosen = logits.gather(1, target[:, None])[:, 0]
    best_other = logits.scatter(1, target[:, None], float("-inf")).amax(dim=1)
    return (chosen - best_other).min().item()


def build_checkpoint(path: Path, max_steps: int = 400, margin: float = 2.0) -> Path:
    """Tokenizer + tiny model memorising the reasoning exchange; written to ``path``.

    Trains at a learning rate low enough that the loss falls steadily on every CPU (at 1e-2 it
    reached 0.1 and then climbed back under AVX-512 kernels) and stops as soon as greedy decoding
    reproduces the exchange with a logit margin of ``margin`` (about 50 steps, whatever the seed or
    kernel), instead of training for a fixed count on a trajectory rounding can change.
    """
    import nanoseek
    from nanoseek.data.tokenizer import padded_vocab_size, train_tokenizer

    tok = train_tokenizer(iter(_CORPUS * 20), vocab_size=300, out_dir=None)
    # The model's vocabulary is padded to a multiple of 64, as real checkpoints are: the engine must
    # never sample the padding ids (the tokenizer could not decode them).
    torch.manual_seed(0)
    model = nanoseek.DeepSeekV3(nanoseek.get_preset("tiny").replace(vocab_size=padded_vocab_size(tok.vocab_size)))
    text = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    ids = tok.encode(text + f"<think>{REASONING}</think>{ANSWER}<|eos|>")
    batch, n_prompt = torch.tensor([ids]), len(tok.encode(text))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        reached = float("-inf")
        for step in range(1, max_steps + 1):
            loss = model(batch[:, :-1], labels=batch[:, 1:]).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 10 == 0:
                reached = _greedy_margin(model, batch, n_prompt)
                if reached >= margin:
                    break
        assert reached >= margin, (f"the tiny model did not memorise the exchange in {max_steps} steps "
                                   f"(greedy logit margin {reached:.3f} < {margin})")
        model.eval()
    finally:
        torch.set_num_threads(threads)
    nanoseek.save(model, path)  # first the model (save refuses a non-checkpoint directory) ...
    tok.save(path)  # ... then the tokenizer next to it
    return path


def tiny_checkpoint(tmp_path_factory) -> Path:
    """One checkpoint per test session, shared by every module that asks."""
    path = tmp_path_factory.getbasetemp() / "tiny_chat_ckpt"
    if not (path / "config.json").is_file() or not (path / "tokenizer.json").is_file():
        build_checkpoint(path)
    return path


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def live_server(app, timeout: float = 30.0):
    """Run ``app`` with uvicorn on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    import uvicorn

    sock = free_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2,
                            timeout_keep_alive=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
