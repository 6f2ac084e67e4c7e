"""``nanoseek chat``: a terminal chat with a checkpoint, streaming its replies.

The conversation is kept across turns and rendered with the checkpoint's chat template every turn
(only the answers go back into the history, not the reasoning, as the DeepSeek API recommends).
Commands: ``/reset`` forgets the conversation (the system prompt stays), ``/quit`` (or Ctrl-D)
leaves, ``/help``. Ctrl-C during a reply stops that reply; at the prompt it leaves.

Reasoning (``<think>…</think>``) is shown dimmed (ANSI ``ESC[2m``) when stdout is a terminal, and
as plain text followed by a blank line otherwise, so that piped output stays clean::

    printf 'What is 2+2?\\n/quit\\n' | nanoseek chat --ckpt out/sft --temperature 0
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from .reasoning import ReasoningSplitter, prompt_opens_reasoning

DIM, RESET = "\033[2m", "\033[0m"
HELP = "commands: /reset (forget the conversation), /quit (or Ctrl-D), /help"


class _Printer:
    """Writes reasoning (dimmed on a terminal) and answer deltas of one reply."""

    def __init__(self, out: TextIO, color: bool):
        self.out, self.color = out, color
        self.in_reasoning = False
        self.wrote_reasoning = False
        self.at_line_start = True

    def write(self, reasoning: str, content: str) -> None:
        if reasoning:
            if not self.in_reasoning and self.color:
                self.out.write(DIM)
            self.in_reasoning = True
            self.wrote_reasoning = True
            self._put(reasoning)
        if content:
            if self.in_reasoning:
                self._end_reasoning()
            self._put(content)
        self.out.flush()

    def _end_reasoning(self) -> None:
        if self.color:
            self.out.write(RESET)
        self.in_reasoning = False
        self._put("\n" if self.at_line_start else "\n\n")  # a blank line between thinking and answer

    def _put(self, text: str) -> None:
        self.out.write(text)
        self.at_line_start = text.endswith("\n")

    def end(self) -> None:
        if self.in_reasoning and self.color:
            self.out.write(RESET)
        self.in_reasoning = False
        if not self.at_line_start:
            self.out.write("\n")
        self.out.flush()


def chat_main(args: argparse.Namespace) -> int:
    from ..errors import NanoseekError
    from ..hf import load_with_tokenizer
    from .engine import Engine
    from .sampling import SamplingParams

    out = sys.stdout
    interactive = sys.stdin.isatty()
    color = out.isatty()
    if args.max_tokens <= 0:
        raise NanoseekError(f"--max-tokens must be positive, got {args.max_tokens}")
    model, tokenizer = load_with_tokenizer(args.ckpt, getattr(args, "device", "auto"), getattr(args, "dtype", "auto"))
    device = next(model.parameters()).device
    max_seq_len = args.max_seq_len or min(model.config.max_position_embeddings, 8192)
    engine = Engine(model, tokenizer, max_slots=1, max_seq_len=max_seq_len)
    SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens,
                   seed=args.seed)  # validate the flags once, before the first turn

    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = list(system)
    if interactive:
        print(f"nanoseek chat · {args.ckpt} on {device} · {HELP}", file=sys.stderr)
    turn = 0
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command = text.split()[0].lower()
            if command in ("/quit", "/exit"):
                break
            if command == "/reset":
                history = list(system)
                print("(conversation cleared)", file=sys.stderr)
                continue
            if command == "/help":
                print(HELP, file=sys.stderr)
                continue
            print(f"unknown command {command}; {HELP}", file=sys.stderr)
            continue

        history.append({"role": "user", "content": text})
        rendered = tokenizer.apply_chat_template(history, add_generation_prompt=True)
        prompt_ids = tokenizer.encode_chat(history)  # what you type is text, never a special token
        room = max_seq_len - len(prompt_ids)
        if room <= 0:
            history.pop()
            print(f"(the conversation is {len(prompt_ids)} tokens, the context is {max_seq_len}: /reset to start "
                  f"over)", file=sys.stderr)
            continue
        seed = None if args.seed is None else args.seed + turn
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                max_tokens=min(args.max_tokens, room), seed=seed, logprobs=False)
        turn += 1
        splitter = ReasoningSplitter(prompt_opens_reasoning(rendered))
        printer = _Printer(out, color)
        request_id = engine.add_request(prompt_ids, params)
        finish = None
        try:
            while engine.has_unfinished():
                for event in engine.step():
                    reasoning, content = splitter.feed(event.text)
                    if event.finished:
                        more_r, more_c = splitter.finish()
                        reasoning, content = reasoning + more_r, content + more_c
                        finish = event.finish_reason
                    printer.write(reasoning, content)
        except KeyboardInterrupt:
            engine.abort(request_id)
            printer.end()
            print("(stopped)", file=sys.stderr)
            history.pop()
            continue
        printer.end()
        if finish == "length":
            print(f"(reply cut at {params.max_tokens} tokens)", file=sys.stderr)
        history.append({"role": "assistant", "content": splitter.content})
    return 0
