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
import contextlib
import sys
from typing import TextIO

from ..errors import NanoseekError
from ..hf import load_with_tokenizer
from .engine import Engine
from .reasoning import ReasoningSplitter, prompt_opens_reasoning
from .sampling import SamplingParams

with contextlib.suppress(ImportError):  # line editing and history for input() (only where Python has it)
    import readline  # noqa: F401

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
    """``nanoseek chat --ckpt DIR``: read messages (and commands) from stdin, stream each reply to stdout."""
    if args.max_tokens <= 0:
        raise NanoseekError(f"--max-tokens must be positive, got {args.max_tokens}")
    model, tokenizer = load_with_tokenizer(args.ckpt, getattr(args, "device", "auto"), getattr(args, "dtype", "auto"))
    max_seq_len = args.max_seq_len or min(model.config.max_position_embeddings, 8192)
    engine = Engine(model, tokenizer, max_slots=1, max_seq_len=max_seq_len)
    SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens,
                   seed=args.seed)  # validate the flags once, before the first turn
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"nanoseek chat · {args.ckpt} on {next(model.parameters()).device} · {HELP}", file=sys.stderr)
    _Chat(engine, tokenizer, args, max_seq_len, sys.stdout).run(interactive)
    return 0


class _Chat:
    """One terminal conversation: the history, the commands, and each turn's streamed reply."""

    def __init__(self, engine: Engine, tokenizer, args: argparse.Namespace, max_seq_len: int, out: TextIO):
        self.engine, self.tokenizer, self.args, self.max_seq_len = engine, tokenizer, args, max_seq_len
        self.out, self.color = out, out.isatty()  # reasoning is dimmed on a terminal
        self.system = [{"role": "system", "content": args.system}] if args.system else []
        self.history: list[dict[str, str]] = list(self.system)
        self.turn = 0  # replies started: turn t samples with seed + t

    def run(self, interactive: bool) -> None:
        """Answer each line until ``/quit``, end of input or Ctrl-C at the prompt."""
        while True:
            try:
                line = input("> " if interactive else "")
            except EOFError:
                if interactive:
                    print(file=sys.stderr)
                return
            except KeyboardInterrupt:
                print(file=sys.stderr)
                return
            text = line.strip()
            if text.startswith("/"):
                if self._command(text.split()[0].lower()):
                    return
            elif text:
                self._answer(text)

    def _command(self, command: str) -> bool:
        """Run ``/reset`` or ``/help`` (or say the command is unknown); True for ``/quit``."""
        if command in ("/quit", "/exit"):
            return True
        if command == "/reset":
            self.history = list(self.system)
            print("(conversation cleared)", file=sys.stderr)
        elif command == "/help":
            print(HELP, file=sys.stderr)
        else:
            print(f"unknown command {command}; {HELP}", file=sys.stderr)
        return False

    def _answer(self, text: str) -> None:
        """Stream the reply to ``text``; keep both in the history unless the reply was stopped."""
        args = self.args
        self.history.append({"role": "user", "content": text})
        rendered = self.tokenizer.apply_chat_template(self.history, add_generation_prompt=True)
        prompt_ids = self.tokenizer.encode_chat(self.history)  # what you type is text, never a special token
        room = self.max_seq_len - len(prompt_ids)
        if room <= 0:
            self.history.pop()
            print(f"(the conversation is {len(prompt_ids)} tokens, the context is {self.max_seq_len}: /reset to "
                  f"start over)", file=sys.stderr)
            return
        seed = None if args.seed is None else args.seed + self.turn
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                max_tokens=min(args.max_tokens, room), seed=seed, logprobs=False)
        self.turn += 1
        splitter = ReasoningSplitter(prompt_opens_reasoning(rendered))
        printer = _Printer(self.out, self.color)
        request_id = self.engine.add_request(prompt_ids, params)
        try:
            finish = self._stream(splitter, printer)
        except KeyboardInterrupt:
            self.engine.abort(request_id)
            printer.end()
            print("(stopped)", file=sys.stderr)
            self.history.pop()
            return
        printer.end()
        if finish == "length":
            print(f"(reply cut at {params.max_tokens} tokens)", file=sys.stderr)
        self.history.append({"role": "assistant", "content": splitter.content})

    def _stream(self, splitter: ReasoningSplitter, printer: _Printer) -> str | None:
        """Step the engine until the reply ends, printing reasoning and answer; the finish reason."""
        finish = None
        while self.engine.has_unfinished():
            for event in self.engine.step():
                reasoning, content = splitter.feed(event.text)
                if event.finished:
                    more_r, more_c = splitter.finish()
                    reasoning, content = reasoning + more_r, content + more_c
                    finish = event.finish_reason
                printer.write(reasoning, content)
        return finish
