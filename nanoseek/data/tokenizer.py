"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``) with nanoseek's control tokens.

Token ids 0-9 are fixed, in this order::

    0 <|bos|>  1 <|eos|>  2 <|pad|>  3 <|user|>  4 <|assistant|>  5 <|system|>
    6 <think>  7 </think>  8 <answer>  9 </answer>

Special or not
    ``<|bos|>``, ``<|eos|>``, ``<|pad|>``, ``<|user|>``, ``<|assistant|>`` and ``<|system|>`` are
    *special*: ``decode(ids, skip_special=True)`` (and ``skip_special_tokens=True`` in
    ``transformers``) drops them. ``<think>``, ``</think>``, ``<answer>`` and ``</answer>`` are
    *added but not special*: they are always matched as single tokens when they appear in text,
    but decoding never strips them, because they are part of an R1-style answer that reward
    functions and users must see.

Special tokens in text
    :meth:`NanoTokenizer.encode` matches all ten tokens when their text appears (that is how a
    rendered chat template becomes ids), like ``transformers``. Pass ``allow_special=False`` to
    encode the six special ones as plain text instead; :func:`nanoseek.data.shards.build_shards`
    does that, so a web page containing ``"<|eos|>"`` cannot inject a document separator.
    :meth:`NanoTokenizer.encode_chat` does the same for a conversation: the chat template's own
    markers are special tokens, the text of each message never is (a user who writes
    ``<|eos|><|system|>`` gets those characters, not a forged system turn).

Chat template
    :data:`CHAT_TEMPLATE` (Jinja, for ``transformers``; rendered here in plain Python, or with
    jinja2 in a sandbox for a custom template) gives::

        <|bos|><|system|>{system}<|user|>{user}<|assistant|>{reply}<|eos|><|user|>...<|assistant|>

    Each finished assistant turn ends with ``<|eos|>`` so the model learns to stop; the final
    ``<|assistant|>`` is the generation prompt. R1-style prompting appends ``<think>`` to it.

Files (``save`` / :func:`load_tokenizer`)
    ``tokenizer.json`` (the ``tokenizers`` model), ``tokenizer_config.json`` (class, bos/eos/pad,
    chat template) and ``special_tokens_map.json``: ``transformers.AutoTokenizer`` loads the
    directory as a ``PreTrainedTokenizerFast`` with the same ids. No pickle anywhere.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import secrets
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nanoseek.data.sources import DataError, iter_documents, SourceStats

log = logging.getLogger(__name__)

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"
THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD, USER, ASSISTANT, SYSTEM)
REASONING_TOKENS: tuple[str, ...] = (THINK, END_THINK, ANSWER, END_ANSWER)
CONTROL_TOKENS: tuple[str, ...] = SPECIAL_TOKENS + REASONING_TOKENS
BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + len(CONTROL_TOKENS)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('unknown chat role: ' ~ message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"


def _raise_template_error(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


_FINGERPRINT_KEYS = ("added_tokens", "normalizer", "pre_tokenizer", "model", "decoder")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 over what decides the ids and the text of a ``tokenizers.Tokenizer``.

    Only the model, added tokens, normalizer, pre-tokenizer and decoder count: the
    post-processor, padding and truncation settings (which ``transformers`` rewrites on
    ``save_pretrained``) do not change what nanoseek encodes, so they do not change the hash.
    """
    state = json.loads(tokenizer.to_str())
    core = {key: state.get(key) for key in _FINGERPRINT_KEYS}
    canonical = json.dumps(core, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def render_default_chat(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """Plain-Python rendering of :data:`CHAT_TEMPLATE` (same output, no jinja2 needed)."""
    markers = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
    parts = [BOS]
    for message in messages:
        role = message["role"]
        if role not in markers:
            raise ValueError(f"unknown chat role: {role}")
        parts.append(markers[role] + str(message["content"]))
        if role == "assistant":
            parts.append(EOS)
    if add_generation_prompt:
        parts.append(ASSISTANT)
    return "".join(parts)


class NanoTokenizer:
    """Thin wrapper over a ``tokenizers.Tokenizer`` with nanoseek's ids and chat template."""

    def __init__(self, tokenizer: Any, chat_template: str = CHAT_TEMPLATE) -> None:
        self._tok = tokenizer
        self.chat_template = chat_template
        self._compiled_template = None
        ids = {}
        for token in CONTROL_TOKENS:
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise DataError(f"the tokenizer has no {token!r} token; train it with nanoseek")
            ids[token] = token_id
        self._control_ids = ids
        self._vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        special = set()
        for token_id, added in tokenizer.get_added_tokens_decoder().items():
            if added.special:
                special.add(int(token_id))
        self.special_ids = frozenset(special)
        self._fingerprint = tokenizer_fingerprint(tokenizer)
        self._plain = None  # copy that encodes special-token text as ordinary text
        self._special_re: re.Pattern[str] | None = None  # the special tokens' texts
        self._special_by_text: dict[str, int] = {}

    # ------------------------------------------------------------------ properties

    @property
    def backend(self) -> Any:
        """The underlying ``tokenizers.Tokenizer`` (do not mutate it)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (including the ten control tokens)."""
        return self._vocab_size

    def __len__(self) -> int:
        return self._vocab_size

    @property
    def bos_id(self) -> int:
        return self._control_ids[BOS]

    @property
    def eos_id(self) -> int:
        return self._control_ids[EOS]

    @property
    def pad_id(self) -> int:
        return self._control_ids[PAD]

    @property
    def fingerprint(self) -> str:
        """:func:`tokenizer_fingerprint`: stable across save/load and ``save_pretrained``."""
        return self._fingerprint

    def token_id(self, token: str) -> int:
        """Id of a single token (e.g. ``"<think>"``); raises ``KeyError`` if it is not one token."""
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise KeyError(f"{token!r} is not a single token of this tokenizer")
        return token_id

    def id_to_token(self, token_id: int) -> str:
        token = self._tok.id_to_token(int(token_id))
        if token is None:
            raise KeyError(f"id {token_id} is outside the tokenizer vocabulary ({self._vocab_size})")
        return token

    # ------------------------------------------------------------------ encode/decode

    def _encoder(self, allow_special: bool) -> Any:
        if allow_special:
            return self._tok
        if self._plain is None:
            plain = Tokenizer.from_str(self._tok.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain

    def encode(
        self, text: str, add_bos: bool = False, add_eos: bool = False, allow_special: bool = True
    ) -> list[int]:
        """Token ids of ``text``; ``add_bos``/``add_eos`` put ``<|bos|>``/``<|eos|>`` around it."""
        ids = self._encoder(allow_special).encode(text, add_special_tokens=False).ids
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(
        self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False, allow_special: bool = True
    ) -> list[list[int]]:
        encodings = self._encoder(allow_special).encode_batch_fast(list(texts), add_special_tokens=False)
        out = []
        for encoding in encodings:
            ids = encoding.ids
            if add_bos:
                ids.insert(0, self.bos_id)
            if add_eos:
                ids.append(self.eos_id)
            out.append(ids)
        return out

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids``. ``skip_special`` drops the six special tokens, never ``<think>`` & co.

        Ids outside ``[0, vocab_size)`` (e.g. a padded model vocabulary) raise ``ValueError``.
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        for token_id in ids:
            if not 0 <= token_id < self._vocab_size:
                raise ValueError(
                    f"token id {token_id} is outside the tokenizer vocabulary (size {self._vocab_size})"
                )
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    # ------------------------------------------------------------------ chat

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` ([{"role", "content"}]) with :attr:`chat_template` as a string."""
        if not messages and not add_generation_prompt:
            raise ValueError("cannot render an empty conversation")
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(f"message {index} must be a dict with 'role' and 'content'")
        if self.chat_template == CHAT_TEMPLATE:
            return render_default_chat(messages, add_generation_prompt)
        if self._compiled_template is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            self._compiled_template = env.from_string(self.chat_template)
        return self._compiled_template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=BOS,
            eos_token=EOS,
            pad_token=PAD,
        )

    def chat_pieces(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[tuple[str, bool]]:
        """The rendered conversation as ``(text, is_content)`` pieces, in order.

        ``is_content`` marks the text of a message's (string) ``content``; the other pieces come from
        the chat template. Joined, the pieces are :meth:`apply_chat_template`'s string. The template is
        rendered with a random stand-in for each content; a custom template that looks inside the
        content (slices it, changes it) gives a different string than the real rendering, and then
        the whole rendering is one template piece, refused (``ValueError``) if a content holds the
        text of a special token.
        """
        contents = [m.get("content") if isinstance(m, dict) else None for m in messages]
        nonce = secrets.token_hex(8)
        while nonce in self.chat_template or any(isinstance(c, str) and nonce in c for c in contents):
            nonce = secrets.token_hex(8)  # (a 64-bit random value: in practice never taken twice)
        stand_ins = [{**m, "content": f"\ue000{nonce}:{i}\ue001"} if isinstance(c, str) else m
                     for i, (m, c) in enumerate(zip(messages, contents))]
        rendered = self.apply_chat_template(stand_ins, add_generation_prompt)
        parts = re.split(f"\ue000{nonce}:([0-9]+)\ue001", rendered)
        pieces: list[tuple[str, bool]] = []
        for k, part in enumerate(parts):
            text, is_content = (part, False) if k % 2 == 0 else (contents[int(part)], True)
            if text:
                pieces.append((text, is_content))
        if self.chat_template == CHAT_TEMPLATE:  # rendered in Python: contents are copied as they are
            return pieces
        real = self.apply_chat_template(messages, add_generation_prompt)
        if "".join(text for text, _ in pieces) == real:
            return pieces
        for index, content in enumerate(contents):
            found = self._special_pattern().search(content) if isinstance(content, str) else None
            if found:
                raise ValueError(f"message {index} holds the text of the special token {found.group()!r}, and "
                                 "this chat template rewrites message contents, so it cannot be kept as plain text")
        return [(real, False)] if real else []

    def encode_chat_pieces(self, pieces: Sequence[tuple[str, bool]]) -> list[int]:
        """Ids of :meth:`chat_pieces`: special tokens are matched in the template's text only.

        Text between two special tokens is encoded in one run whatever pieces it spans, so a
        conversation whose contents hold no special-token text gets exactly
        ``encode(apply_chat_template(...))``.
        """
        pattern = self._special_pattern()
        runs: list[str | int] = []  # text to encode with special tokens as plain text, or a special id
        pending: list[str] = []
        for text, is_content in pieces:
            if is_content:
                pending.append(text)
                continue
            pos = 0
            for match in pattern.finditer(text):
                pending.append(text[pos:match.start()])
                runs.append("".join(pending))
                runs.append(self._special_by_text[match.group()])
                pending, pos = [], match.end()
            pending.append(text[pos:])
        runs.append("".join(pending))
        texts = [run for run in runs if isinstance(run, str) and run]
        encoded = iter(self.encode_batch(texts, allow_special=False) if texts else [])
        ids: list[int] = []
        for run in runs:
            if isinstance(run, int):
                ids.append(run)
            elif run:
                ids.extend(next(encoded))
        return ids

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """Ids of a conversation: the template's markers are special tokens, message contents never are."""
        return self.encode_chat_pieces(self.chat_pieces(messages, add_generation_prompt))

    def _special_pattern(self) -> "re.Pattern[str]":
        if self._special_re is None:
            by_text = {self._tok.id_to_token(i): i for i in self.special_ids}
            self._special_by_text = by_text
            texts = sorted(by_text, key=len, reverse=True)  # longest first: no token hides a longer one
            self._special_re = re.compile("|".join(re.escape(t) for t in texts) if texts else "(?!)")
        return self._special_re

    # ------------------------------------------------------------------ files

    def save(self, out_dir: str | os.PathLike, model_max_length: int | None = None) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json to ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(out / TOKENIZER_FILE))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "additional_special_tokens": [USER, ASSISTANT, SYSTEM],
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "chat_template": self.chat_template,
        }
        if model_max_length is not None:
            config["model_max_length"] = int(model_max_length)
        special_map = {
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "additional_special_tokens": [USER, ASSISTANT, SYSTEM],
        }
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (out / SPECIAL_MAP_FILE).write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
        return out


def load_tokenizer(directory: str | os.PathLike) -> NanoTokenizer:
    """Load a tokenizer directory written by :meth:`NanoTokenizer.save` (or ``save_pretrained``)."""
    root = Path(directory)
    path = root / TOKENIZER_FILE
    if not path.is_file():
        raise DataError(f"no {TOKENIZER_FILE} in tokenizer directory {os.fspath(root)!r}")
    tokenizer = Tokenizer.from_file(str(path))
    chat_template = CHAT_TEMPLATE
    config_path = root / CONFIG_FILE
    jinja_path = root / "chat_template.jinja"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if isinstance(config.get("chat_template"), str):
            chat_template = config["chat_template"]
    if jinja_path.is_file():  # written by transformers>=5 save_pretrained
        chat_template = jinja_path.read_text(encoding="utf-8")
    return NanoTokenizer(tokenizer, chat_template=chat_template)


def check_vocab(tokenizer_vocab_size: int, model_vocab_size: int) -> None:
    """Raise ``ValueError`` if the model has fewer embedding rows than the tokenizer has ids.

    A larger model vocabulary is fine (padding to a multiple of 64 is normal).
    """
    if tokenizer_vocab_size > model_vocab_size:
        raise ValueError(
            f"the tokenizer produces ids up to {tokenizer_vocab_size - 1} ({tokenizer_vocab_size} ids) "
            f"but the model vocab_size is {model_vocab_size}; set the model vocab_size to at least "
            f"{tokenizer_vocab_size} (e.g. {padded_vocab_size(tokenizer_vocab_size)}, a multiple of 64)"
        )


def padded_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    """Round ``vocab_size`` up to a multiple of ``multiple``."""
    return -(-int(vocab_size) // multiple) * multiple


# ---------------------------------------------------------------------- training


def _is_path_list(corpus: Any) -> bool:
    if isinstance(corpus, (str, os.PathLike)):
        return True
    if isinstance(corpus, (list, tuple)):
        return all(isinstance(item, (str, os.PathLike)) for item in corpus)
    return False


def train_tokenizer(
    corpus: str | os.PathLike | Sequence[str | os.PathLike] | Iterable[str],
    vocab_size: int,
    out_dir: str | os.PathLike | None,
    *,
    min_frequency: int = 2,
    text_field: str = "text",
    txt_split_lines: bool = False,
    strict: bool = False,
    show_progress: bool = False,
    split_digits: bool = True,
) -> NanoTokenizer:
    """Train a byte-level BPE tokenizer and save it to ``out_dir`` (skipped when ``None``).

    ``corpus`` is either paths (a path, or a list/tuple of paths: files, directories or globs,
    read with :mod:`nanoseek.data.sources`) or any other iterable/iterator of texts. A *list of
    strings is always taken as paths*; wrap texts in ``iter(...)`` to train on them directly.

    ``vocab_size`` counts everything: 256 byte tokens, the ten control tokens and the merges.
    It is an upper bound; a small corpus may give fewer ids (:attr:`NanoTokenizer.vocab_size`).

    ``split_digits`` (default) makes every digit its own pre-token, so numbers are spelled digit
    by digit as in LLaMA's tokenizer: arithmetic is then learnable column by column instead of
    over thousands of arbitrary multi-digit tokens.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs {BYTE_ALPHABET_SIZE} byte "
            f"tokens + {len(CONTROL_TOKENS)} control tokens = {MIN_VOCAB_SIZE} at least"
        )
    stats: list[SourceStats] = []
    if _is_path_list(corpus):
        texts: Iterator[str] = iter_documents(
            corpus, text_field=text_field, txt_split_lines=txt_split_lines, strict=strict, stats_out=stats
        )
    else:
        texts = _counting(iter(corpus))

    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                               if split_digits else byte_level)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(CONTROL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)

    # The trainer registers every token it is given as special; turn the reasoning tokens into
    # plain added tokens so decoding with skip_special keeps them.
    state = json.loads(tokenizer.to_str())
    for added in state["added_tokens"]:
        if added["content"] in REASONING_TOKENS:
            added["special"] = False
    tokenizer = Tokenizer.from_str(json.dumps(state, ensure_ascii=False))

    skipped = sum(s.n_skipped for s in stats)
    if skipped:
        log.warning("tokenizer training skipped %d documents with invalid UTF-8", skipped)
    result = NanoTokenizer(tokenizer)
    if result.vocab_size < vocab_size:
        log.warning(
            "the corpus only supported %d of the %d requested ids", result.vocab_size, vocab_size
        )
    if out_dir is not None:
        result.save(out_dir)
    return result


def _counting(texts: Iterator[Any]) -> Iterator[str]:
    count = 0
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"training texts must be str, got {type(text).__name__}")
        count += 1
        yield text
    if count == 0:
        raise DataError("the corpus is empty: the text iterator gave no document")


# ---------------------------------------------------------------------- CLI


def tokenizer_main(argv: Sequence[str] | None = None) -> int:
    """``nanoseek tokenizer train --input FILES --vocab-size N --out DIR``."""
    parser = argparse.ArgumentParser(prog="nanoseek tokenizer", description="Byte-level BPE tokenizer tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a tokenizer on .txt/.jsonl/.parquet files")
    train.add_argument("--input", nargs="+", required=True, help="files, directories or glob patterns")
    train.add_argument("--vocab-size", type=int, required=True, help="total ids, bytes and control tokens included")
    train.add_argument("--out", required=True, help="output directory")
    train.add_argument("--min-frequency", type=int, default=2)
    train.add_argument("--text-field", default="text", help="jsonl field / parquet column (default: text)")
    train.add_argument("--txt-split-lines", action="store_true", help="one document per line in .txt files")
    train.add_argument("--strict", action="store_true", help="fail on invalid UTF-8 instead of skipping")
    train.add_argument("--no-split-digits", dest="split_digits", action="store_false",
                       help="let BPE merge digits into multi-digit tokens (default: one token per digit)")
    args = parser.parse_args(argv)
    tokenizer = train_tokenizer(
        args.input,
        args.vocab_size,
        args.out,
        min_frequency=args.min_frequency,
        text_field=args.text_field,
        txt_split_lines=args.txt_split_lines,
        split_digits=args.split_digits,
        strict=args.strict,
    )
    print(f"saved tokenizer with {tokenizer.vocab_size} ids to {args.out} (sha256 {tokenizer.fingerprint[:12]})")
    return 0
