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


def build_checkpoint(path: Path, steps: int = 400) -> Path:
    """Tokenizer + tiny model memorising the reasoning exchange; written to ``path``."""
    import nanoseek
    from nanoseek.data.tokenizer import padded_vocab_size, train_tokenizer

    tok = train_tokenizer(iter(_CORPUS * 20), vocab_size=300, out_dir=None)
    # The model's vocabulary is padded to a multiple of 64, as real checkpoints are: the engine must
    # never sample the padding ids (the tokenizer could not decode them).
    torch.manual_seed(0)
    model = nanoseek.DeepSeekV3(nanoseek.get_preset("tiny").replace(vocab_size=padded_vocab_size(tok.vocab_size)))
    text = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    ids = tok.encode(text + f"<think>{REASONING}</think>{ANSWER}<|eos|>")
    batch = torch.tensor([ids])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        for _ in range(steps):
            loss = model(batch[:, :-1], labels=batch[:, 1:]).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if loss.item() < 0.02:
                break
        model.eval()
        with torch.no_grad():  # greedy decoding must reproduce the whole exchange
            prompt = tok.encode(text)
            logits = model(batch[:, :-1]).logits[0]
            predicted = logits.argmax(-1)[len(prompt) - 1:].tolist()
            assert predicted == ids[len(prompt):], "the tiny model did not memorise the exchange"
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
