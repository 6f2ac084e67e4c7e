"""Chat SFT data: JSONL conversations → tokens with assistant-only targets → packed fixed-length sequences.

Input
    JSONL, one conversation per line: ``{"messages": [{"role": ..., "content": ...}, ...]}`` with roles
    ``system``, ``user`` and ``assistant``, string contents and at least one assistant turn (other
    top-level keys and other message keys are ignored; blank lines are skipped). A bad record raises
    :class:`~nanoseek.data.sources.DataError` naming ``file:line``.

Which tokens are trained
    A conversation is rendered with the tokenizer's chat template and encoded with special-token
    matching on. For assistant turn ``i`` the span ``[len(enc(render(messages[:i], generation
    prompt))), len(enc(render(messages[:i+1]))))`` holds exactly the assistant content and the
    closing ``<|eos|>`` of that turn (the ``<|assistant|>`` marker belongs to the generation prompt
    and is not trained). Every assistant turn is trained; system and user tokens, the markers and the
    BOS are not. This needs a *prefix-stable* template (the encoding of each prefix rendering is a
    prefix of the encoding of the whole conversation); nanoseek's template is (special tokens split
    the text), and a custom template that is not raises a clear error instead of mislabelling.

Packing
    Examples are packed greedily in order (next-fit) into windows of ``seq_len + 1`` tokens; the rest
    of a window that cannot take the next example whole is padded with ``<|pad|>`` (never a target).
    The first token of every example is never a target, so no label crosses an example boundary
    (the MTP depth-k loss uses ``labels[:, i+k]``, the same masked labels, so it never does either).
    Examples attend to earlier examples of the same window (no attention mask), as in common packed
    SFT; each one starts with ``<|bos|>``. An example longer than ``seq_len + 1`` tokens is
    TRUNCATED to its first ``seq_len + 1`` tokens (counted as ``truncated``); one whose truncation
    leaves no assistant token is SKIPPED (counted as ``skipped``).

Split
    An example is held out when the SHA-256 of its canonical JSON falls below ``val_fraction`` of the
    hash range, so identical examples always land on the same side and adding data never moves an
    example between splits. When that leaves no example out of at least 10, the one with the smallest
    hash is held out, so there is always a validation loss.

Files (``DIR/sft_data.safetensors`` + ``DIR/sft_data.json``)
    ``{train,val}.tokens`` int32 ``[N, seq_len + 1]`` and ``{train,val}.mask`` uint8 (1 where the token
    is a target), and the metadata: seq_len, tokenizer fingerprint, sources and counts. No pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import safetensors.numpy
import torch

from ..fsutil import fsync_path, write_json_durable
from .sources import DataError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
DATA_FILE = "sft_data.safetensors"
META_FILE = "sft_data.json"
FORMAT_VERSION = 1
_ENCODE_CHUNK = 4096


# ----------------------------------------------------------------------------- reading
def validate_conversation(record: Any, where: str) -> list[dict[str, str]]:
    """The ``messages`` of one JSONL record as ``[{"role", "content"}]``; raises ``DataError`` naming ``where``."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with a 'messages' list, got {type(record).__name__}")
    if "messages" not in record:
        raise DataError(f"{where}: missing 'messages' (expected {{\"messages\": [{{\"role\": ..., "
                        f"\"content\": ...}}, ...]}})")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: message {index} must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: message {index} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = message.get("content")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {index} ({role}) content must be a string, "
                            f"got {type(content).__name__}")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant turn: nothing to train on")
    return out


def chat_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """``.jsonl`` files named directly, or found (sorted) in named directories."""
    files: list[Path] = []
    for p in paths:
        path = Path(p).expanduser()
        if path.is_dir():
            found = sorted(path.glob("*.jsonl"))
            if not found:
                raise DataError(f"{path}: a directory with no .jsonl file")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or directory")
    if not files:
        raise DataError("no SFT data given")
    return files


def read_chat_jsonl(path: str | os.PathLike) -> list[list[dict[str, str]]]:
    """The conversations of one chat JSONL file (blank lines skipped)."""
    path = Path(path)
    conversations = []
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
                conversations.append(validate_conversation(record, where))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    return conversations


def conversation_hash(messages: Sequence[dict]) -> str:
    """SHA-256 hex of the canonical JSON of ``messages`` (role and content only)."""
    canonical = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- tokenising
def _renderings(tokenizer, messages: Sequence[dict]) -> list[str]:
    """[whole conversation, then per assistant turn i: prompt before it, conversation through it]."""
    texts = [tokenizer.apply_chat_template(messages, add_generation_prompt=False)]
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            texts.append(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True))
            texts.append(tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False))
    return texts


def _not_prefix_stable(what: str) -> DataError:
    return DataError(f"the tokenizer's chat template is not prefix-stable ({what}), so the assistant tokens "
                     f"cannot be located by rendering prefixes; use a template whose rendering of a "
                     f"conversation prefix encodes to a prefix of the whole conversation's tokens")


def _spans(encoded: list[list[int]]) -> tuple[list[int], list[bool]]:
    full = encoded[0]
    mask = [False] * len(full)
    for k in range(1, len(encoded), 2):
        before, through = encoded[k], encoded[k + 1]
        if through[: len(before)] != before:
            raise _not_prefix_stable("the generation prompt before an assistant turn is not a token prefix "
                                     "of the conversation through that turn")
        if full[: len(through)] != through:
            raise _not_prefix_stable("a conversation through an assistant turn is not a token prefix of the "
                                     "whole conversation")
        for j in range(len(before), len(through)):
            mask[j] = True
    return full, mask


def tokenize_conversation(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[bool]]:
    """``(ids, mask)`` of one conversation: ``mask[j]`` is True where token ``j`` is an assistant token
    (content or the turn's closing EOS), i.e. a training target."""
    return _spans([tokenizer.encode(t, allow_special=True) for t in _renderings(tokenizer, messages)])


def tokenize_conversations(tokenizer, conversations: Sequence[Sequence[dict]]) -> list[tuple[list[int], list[bool]]]:
    """:func:`tokenize_conversation` for many, batch-encoded."""
    out = []
    for begin in range(0, len(conversations), _ENCODE_CHUNK):
        chunk = conversations[begin: begin + _ENCODE_CHUNK]
        texts, counts = [], []
        for messages in chunk:
            r = _renderings(tokenizer, messages)
            texts.extend(r)
            counts.append(len(r))
        encoded = tokenizer.encode_batch(texts, allow_special=True)
        at = 0
        for n in counts:
            out.append(_spans(encoded[at: at + n]))
            at += n
    return out


# ----------------------------------------------------------------------------- packing
@dataclass
class PackStats:
    examples: int = 0  # examples given
    packed: int = 0  # examples in the sequences
    truncated: int = 0  # longer than seq_len + 1 tokens: cut to the first seq_len + 1
    skipped: int = 0  # no assistant token left after truncation
    sequences: int = 0
    tokens: int = 0  # real tokens in the sequences (padding excluded)
    target_tokens: int = 0
    pad_tokens: int = 0
    longest: int = 0  # longest example before truncation, in tokens

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def pack_examples(examples: Sequence[tuple[Sequence[int], Sequence[bool]]], seq_len: int,
                  pad_id: int) -> tuple[np.ndarray, np.ndarray, PackStats]:
    """Greedy next-fit packing into ``[N, seq_len + 1]`` token and target-mask arrays (see the module doc)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    window = seq_len + 1
    stats = PackStats(examples=len(examples))
    rows_t: list[np.ndarray] = []
    rows_m: list[np.ndarray] = []
    cur_t = np.full(window, pad_id, dtype=np.int32)
    cur_m = np.zeros(window, dtype=np.uint8)
    used = 0

    def flush() -> None:
        nonlocal cur_t, cur_m, used
        if used:
            rows_t.append(cur_t)
            rows_m.append(cur_m)
            stats.pad_tokens += window - used
            cur_t = np.full(window, pad_id, dtype=np.int32)
            cur_m = np.zeros(window, dtype=np.uint8)
            used = 0

    for ids, mask in examples:
        n = len(ids)
        stats.longest = max(stats.longest, n)
        ids = np.asarray(ids, dtype=np.int64)
        mask = np.asarray(mask, dtype=np.uint8).copy()
        if n > window:
            ids, mask, n = ids[:window], mask[:window], window
            stats.truncated += 1
        if n:
            mask[0] = 0  # the first token of an example is never a target: no label crosses a boundary
        if not mask.any():
            stats.skipped += 1
            continue
        if used + n > window:
            flush()
        cur_t[used: used + n] = ids
        cur_m[used: used + n] = mask
        used += n
        stats.packed += 1
        stats.tokens += n
        stats.target_tokens += int(mask.sum())
    flush()
    stats.sequences = len(rows_t)
    tokens = np.stack(rows_t) if rows_t else np.zeros((0, window), dtype=np.int32)
    masks = np.stack(rows_m) if rows_m else np.zeros((0, window), dtype=np.uint8)
    return tokens, masks, stats


def split_by_hash(hashes: Sequence[str], val_fraction: float, min_for_val: int = 10) -> list[bool]:
    """``is_val`` per example (see the module doc)."""
    threshold = int(val_fraction * 2**64)
    is_val = [int(h[:16], 16) < threshold for h in hashes]
    if val_fraction > 0 and not any(is_val) and len(hashes) >= min_for_val:
        smallest = min(hashes)
        is_val = [h == smallest for h in hashes]
    return is_val


# ----------------------------------------------------------------------------- dataset
class SFTDataset:
    """Packed SFT sequences with the pretraining datasets' interface: ``len()`` and ``get_batch``."""

    def __init__(self, tokens: np.ndarray, mask: np.ndarray) -> None:
        if tokens.shape != mask.shape or tokens.ndim != 2:
            raise ValueError(f"tokens {tokens.shape} and mask {mask.shape} must be the same [N, seq_len + 1]")
        self.tokens = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))
        self.mask = torch.from_numpy(np.ascontiguousarray(mask).astype(bool))
        self.seq_len = int(tokens.shape[1]) - 1

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_target_tokens(self) -> int:
        return int(self.mask[:, 1:].sum())

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)`` int64 ``[len(indices), seq_len]``; targets are -100 where not trained."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        rows, keep = self.tokens[idx], self.mask[idx]
        x = rows[:, :-1].contiguous()
        y = torch.where(keep[:, 1:], rows[:, 1:], torch.full_like(rows[:, 1:], IGNORE_INDEX)).contiguous()
        return x, y


# ----------------------------------------------------------------------------- build / load
def build_sft_data(paths: Sequence[str | os.PathLike], tokenizer, seq_len: int, out_dir: str | os.PathLike,
                   val_fraction: float = 0.02, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Read, tokenise, split and pack chat JSONL files into ``out_dir``; returns the metadata."""
    files = chat_files(paths)
    conversations, sources = [], []
    for f in files:
        convs = read_chat_jsonl(f)
        if not convs:
            raise DataError(f"{f}: no conversation in the file")
        conversations.extend(convs)
        sources.append({"path": str(Path(f).resolve()), "conversations": len(convs)})
    hashes = [conversation_hash(c) for c in conversations]
    is_val = split_by_hash(hashes, val_fraction)
    examples = tokenize_conversations(tokenizer, conversations)
    arrays, meta_splits = {}, {}
    for split, want in (("train", False), ("val", True)):
        chosen = [ex for ex, v in zip(examples, is_val) if v == want]
        tokens, mask, stats = pack_examples(chosen, seq_len, tokenizer.pad_id)
        arrays[f"{split}.tokens"], arrays[f"{split}.mask"] = tokens, mask
        meta_splits[split] = stats.to_dict()
    train = meta_splits["train"]
    if train["sequences"] == 0:
        raise DataError(f"no training sequence: all {train['examples']} training examples lost their assistant "
                        f"tokens to truncation at seq_len={seq_len} (the longest example has {train['longest']} "
                        f"tokens); raise --seq-len")
    meta = {"version": FORMAT_VERSION, "seq_len": int(seq_len), "tokenizer_sha256": tokenizer.fingerprint,
            "val_fraction": val_fraction, "sources": sources, "conversations": len(conversations),
            "distinct_conversations": len(set(hashes)), "splits": meta_splits}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"{DATA_FILE}.tmp-{os.getpid()}"
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
    fsync_path(tmp)
    os.replace(tmp, out / DATA_FILE)
    write_json_durable(out / META_FILE, meta)
    total_truncated = sum(s["truncated"] for s in meta_splits.values())
    total_skipped = sum(s["skipped"] for s in meta_splits.values())
    log(f"sft data: {len(conversations)} conversations ({meta['distinct_conversations']} distinct) from "
        f"{len(files)} file(s): {train['sequences']} train sequences ({train['target_tokens']} target tokens), "
        f"{meta_splits['val']['sequences']} val sequences ({meta_splits['val']['examples']} held-out examples)")
    if total_truncated or total_skipped:
        log(f"note: {total_truncated} example(s) longer than seq_len + 1 = {seq_len + 1} tokens were truncated "
            f"(longest {max(s['longest'] for s in meta_splits.values())}), {total_skipped} of them skipped for "
            f"losing every assistant token; raise --seq-len to keep them whole")
    return meta


def read_sft_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(data_dir) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read the SFT data description {path}: {exc}") from None
    if meta.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: unsupported SFT data version {meta.get('version')!r}")
    return meta


def load_sft_data(data_dir: str | os.PathLike, seq_len: int | None = None,
                  tokenizer=None) -> tuple[SFTDataset, SFTDataset | None, dict[str, Any]]:
    """``(train, val or None, meta)`` from a directory written by :func:`build_sft_data`, checked
    against ``seq_len`` and the tokenizer when given."""
    meta = read_sft_meta(data_dir)
    if seq_len is not None and meta["seq_len"] != seq_len:
        raise DataError(f"{data_dir}: the SFT data was packed for seq_len={meta['seq_len']}, not {seq_len}")
    if tokenizer is not None and meta["tokenizer_sha256"] != tokenizer.fingerprint:
        raise DataError(f"{data_dir}: the SFT data was tokenised with another tokenizer")
    path = Path(data_dir) / DATA_FILE
    try:
        arrays = safetensors.numpy.load_file(str(path))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    train = SFTDataset(arrays["train.tokens"], arrays["train.mask"])
    val = SFTDataset(arrays["val.tokens"], arrays["val.mask"]) if len(arrays["val.tokens"]) else None
    return train, val, meta


__all__ = ["IGNORE_INDEX", "PackStats", "SFTDataset", "build_sft_data", "chat_files", "conversation_hash",
           "load_sft_data", "pack_examples", "read_chat_jsonl", "read_sft_meta", "split_by_hash",
           "tokenize_conversation", "tokenize_conversations", "validate_conversation"]
