"""Tokenise a corpus into memory-mappable token shards plus a ``manifest.json``.

Layout of ``out_dir``::

    manifest.json          # Manifest.to_dict(): tokenizer hash, dtype, shards, sources
    train_00000.bin ...    # raw little-endian uint16 (vocab <= 65536) or uint32 token ids
    val_00000.bin ...      # held-out split, same format

Every document is encoded without bos and followed by ``<|eos|>``, the document separator;
shards hold the concatenation of these, cut every ``shard_tokens`` tokens (a document may span
two shards). Text that looks like a special token (``"<|eos|>"``) is encoded as plain text, so
``<|eos|>`` in a shard always is a separator (``<think>`` and the other reasoning tokens are
still matched).

Validation split
    A document goes to ``val`` when the first 8 bytes of BLAKE2b(its UTF-8 text), read as an
    unsigned integer, fall below ``val_fraction * 2**64``: deterministic, independent of file
    order, worker count and shard size, and identical copies of a document land on the same
    side (the top-up below may split exact duplicates that tie at its cut). If that leaves fewer than ``min_val_tokens`` validation tokens (pass ``seq_len + 1``
    to be sure of one validation sequence), the train documents with the smallest hashes move
    to ``val`` until it has enough — i.e. the split is still "hash below a threshold", with the
    threshold raised just enough. Train shards are rewritten once in that case.

Parallelism
    Documents are read and batched in the calling thread; ``workers`` threads encode batches
    concurrently (the Rust tokenizer releases the GIL) and results are written in input order,
    so the output does not depend on ``workers``. Threads rather than a process pool: no data
    is pickled between processes and no fork happens under the Rust thread pool.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import os
import re
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tokenizers import Tokenizer

from nanoseek.data.sources import (
    DataError,
    SourceStats,
    ensure_documents,
    file_sha256,
    iter_file_documents,
    resolve_paths,
)
from nanoseek.data.tokenizer import NanoTokenizer, load_tokenizer

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
DEFAULT_SHARD_TOKENS = 100_000_000
BATCH_CHARS = 1 << 20
BATCH_DOCS = 1024
_HASH_SPACE = 1 << 64


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32."""
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise DataError(f"vocab_size {vocab_size} does not fit in uint32 token shards")


def document_hash(text: str) -> int:
    """64-bit hash deciding the train/val split of a document."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


# ------------------------------------------------------------------------ manifest


@dataclass
class ShardInfo:
    file: str
    n_tokens: int


@dataclass
class SourceInfo:
    path: str
    sha256: str
    n_docs: int
    n_tokens: int
    n_skipped: int
    n_empty: int
    n_val_docs: int = 0
    n_val_tokens: int = 0


@dataclass
class Manifest:
    tokenizer_sha256: str
    vocab_size: int
    eos_id: int
    dtype: str
    shard_tokens: int
    val_fraction: float
    min_val_tokens: int
    train: list[ShardInfo] = field(default_factory=list)
    val: list[ShardInfo] = field(default_factory=list)
    sources: list[SourceInfo] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    version: int = MANIFEST_VERSION

    @property
    def n_train_tokens(self) -> int:
        return sum(s.n_tokens for s in self.train)

    @property
    def n_val_tokens(self) -> int:
        return sum(s.n_tokens for s in self.val)

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self.train if split == "train" else self.val

    def to_dict(self) -> dict:
        out = asdict(self)
        out["n_train_tokens"] = self.n_train_tokens
        out["n_val_tokens"] = self.n_val_tokens
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        version = data.get("version")
        if version != MANIFEST_VERSION:
            raise DataError(f"unsupported manifest version {version!r} (expected {MANIFEST_VERSION})")
        try:
            return cls(
                tokenizer_sha256=str(data["tokenizer_sha256"]),
                vocab_size=int(data["vocab_size"]),
                eos_id=int(data["eos_id"]),
                dtype=str(data["dtype"]),
                shard_tokens=int(data["shard_tokens"]),
                val_fraction=float(data["val_fraction"]),
                min_val_tokens=int(data["min_val_tokens"]),
                train=[ShardInfo(**s) for s in data["train"]],
                val=[ShardInfo(**s) for s in data["val"]],
                sources=[SourceInfo(**s) for s in data["sources"]],
                options=dict(data.get("options", {})),
                version=version,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"malformed manifest: {err}") from None

    def check_tokenizer(self, tokenizer: NanoTokenizer) -> None:
        """Raise :class:`DataError` if the shards were made with another tokenizer."""
        if tokenizer.fingerprint != self.tokenizer_sha256:
            raise DataError(
                f"the shards were built with tokenizer {self.tokenizer_sha256[:12]} but the tokenizer "
                f"given is {tokenizer.fingerprint[:12]}; rebuild the shards or use the matching tokenizer"
            )


def read_manifest(directory: str | os.PathLike) -> Manifest:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise DataError(f"no {MANIFEST_FILE} in shard directory {os.fspath(directory)!r}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg})") from None
    return Manifest.from_dict(data)


def open_shards(directory: str | os.PathLike, split: str = "train") -> list[np.memmap]:
    """Read-only ``np.memmap`` views of one split's shards, checked against the manifest."""
    manifest = read_manifest(directory)
    dtype = np.dtype(manifest.dtype)
    arrays = []
    for shard in manifest.shards(split):
        path = Path(directory) / shard.file
        if not path.is_file():
            raise DataError(f"shard {shard.file} listed in the manifest is missing from {os.fspath(directory)!r}")
        expected = shard.n_tokens * dtype.itemsize
        size = path.stat().st_size
        if size != expected:
            raise DataError(f"shard {path} has {size} bytes, the manifest says {expected}")
        arrays.append(np.memmap(path, dtype=dtype, mode="r", shape=(shard.n_tokens,)))
    return arrays


# ------------------------------------------------------------------------- writing


class _ShardWriter:
    """Appends token arrays to ``{prefix}_{i:05d}.bin`` files of at most ``shard_tokens`` each."""

    def __init__(self, out_dir: Path, prefix: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out_dir, self.prefix, self.dtype, self.shard_tokens = out_dir, prefix, dtype, shard_tokens
        self.shards: list[ShardInfo] = []
        self._handle = None
        self._filled = 0
        self.total = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        while tokens.size:
            if self._handle is None:
                name = f"{self.prefix}_{len(self.shards):05d}.bin"
                self._handle = open(self.out_dir / name, "wb")
                self.shards.append(ShardInfo(file=name, n_tokens=0))
                self._filled = 0
            room = self.shard_tokens - self._filled
            part = tokens[:room]
            self._handle.write(part.tobytes())
            self._filled += part.size
            self.shards[-1].n_tokens = self._filled
            self.total += part.size
            tokens = tokens[room:]
            if self._filled == self.shard_tokens:
                self._handle.close()
                self._handle = None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _encode_batch(tokenizer: Any, texts: list[str], eos_id: int, dtype: np.dtype):
    """Encode a batch: (tokens with eos after each document, per-document lengths, hashes)."""
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    pieces = []
    lengths = np.empty(len(texts), dtype=np.int64)
    for index, encoding in enumerate(encodings):
        ids = encoding.ids
        ids.append(eos_id)
        pieces.append(np.asarray(ids, dtype=dtype))
        lengths[index] = len(ids)
    hashes = np.array([document_hash(text) for text in texts], dtype=np.uint64)
    tokens = np.concatenate(pieces) if pieces else np.empty(0, dtype=dtype)
    return tokens, lengths, hashes


def _batches(documents, batch_chars: int, batch_docs: int):
    batch: list[str] = []
    chars = 0
    for text in documents:
        batch.append(text)
        chars += len(text)
        if chars >= batch_chars or len(batch) >= batch_docs:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class _Reserve:
    """The train documents with the smallest hashes, enough to cover ``need`` tokens."""

    def __init__(self, need: int) -> None:
        self.need = need
        self._heap: list[tuple[int, int, int, int]] = []  # (-hash, start, length, source)
        self._tokens = 0

    @property
    def full(self) -> bool:
        return self._tokens >= self.need

    @property
    def max_hash(self) -> int:
        return -self._heap[0][0]

    def offer(self, doc_hash: int, start: int, length: int, source: int) -> None:
        if self.full and doc_hash >= self.max_hash:
            return
        heapq.heappush(self._heap, (-doc_hash, start, length, source))
        self._tokens += length
        while self._heap and self._tokens - self._heap[0][2] >= self.need:
            self._tokens -= heapq.heappop(self._heap)[2]

    def smallest_first(self) -> list[tuple[int, int, int, int]]:
        """(hash, start, length, source), ascending by hash."""
        return sorted((-h, start, length, source) for h, start, length, source in self._heap)


_SHARD_NAME = re.compile(r"^(train|val)(\.rewrite)?_\d{5}\.bin$")


def _our_files(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if p.name in (MANIFEST_FILE, MANIFEST_FILE + ".tmp") or _SHARD_NAME.match(p.name)]


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"output path {os.fspath(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    ours = _our_files(out)
    if ours and not overwrite:
        raise DataError(f"{os.fspath(out)!r} already holds shards; pass overwrite=True (--overwrite) to replace them")
    for path in ours:
        path.unlink()


def build_shards(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer: NanoTokenizer | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    val_fraction: float = 0.005,
    min_val_tokens: int = 0,
    workers: int | None = None,
    text_field: str = "text",
    txt_split_lines: bool = False,
    strict: bool = False,
    overwrite: bool = False,
    batch_chars: int = BATCH_CHARS,
) -> Manifest:
    """Tokenise ``sources`` (files, directories, globs) into shards in ``out_dir``.

    ``tokenizer`` is a :class:`NanoTokenizer` or a tokenizer directory. ``workers`` defaults to
    ``min(4, os.cpu_count())``. See the module docstring for the split and the file layout.
    """
    if not isinstance(tokenizer, NanoTokenizer):
        tokenizer = load_tokenizer(tokenizer)
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if min_val_tokens < 0:
        raise ValueError(f"min_val_tokens must be >= 0, got {min_val_tokens}")
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    workers = max(1, int(workers))
    paths = resolve_paths(sources)
    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)

    dtype = token_dtype(tokenizer.vocab_size)
    eos_id = tokenizer.eos_id
    encoder = Tokenizer.from_str(tokenizer.backend.to_str())
    encoder.encode_special_tokens = True
    threshold = min(int(val_fraction * _HASH_SPACE), _HASH_SPACE)
    train = _ShardWriter(out, "train", dtype, shard_tokens)
    val = _ShardWriter(out, "val", dtype, shard_tokens)
    reserve = _Reserve(min_val_tokens) if min_val_tokens > 0 else None
    all_stats: list[SourceStats] = []
    infos: list[SourceInfo] = []

    def consume(result, source: int) -> None:
        tokens, lengths, hashes = result
        info = infos[source]
        info.n_tokens += int(tokens.size)
        is_val = hashes < np.uint64(threshold) if threshold else np.zeros(len(hashes), dtype=bool)
        if reserve is not None:
            train_lengths = np.where(is_val, 0, lengths)
            offsets = train.total + np.cumsum(train_lengths) - train_lengths
            candidates = ~is_val
            if reserve.full:
                candidates &= hashes < np.uint64(reserve.max_hash)
            for index in np.flatnonzero(candidates):
                reserve.offer(int(hashes[index]), int(offsets[index]), int(lengths[index]), source)
        if not is_val.any():
            train.write(tokens)
            return
        ends = np.cumsum(lengths)
        begin = 0  # start of the train documents not yet written
        for index in np.flatnonzero(is_val):
            doc_start = int(ends[index] - lengths[index])
            train.write(tokens[begin:doc_start])
            val.write(tokens[doc_start : ends[index]])
            info.n_val_docs += 1
            info.n_val_tokens += int(lengths[index])
            begin = int(ends[index])
        train.write(tokens[begin:])

    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nanoseek-tok") as pool:
            for source, path in enumerate(paths):
                stats = SourceStats(path=os.fspath(path))
                all_stats.append(stats)
                infos.append(SourceInfo(os.fspath(path), file_sha256(path), 0, 0, 0, 0))
                documents = iter_file_documents(
                    path, text_field=text_field, txt_split_lines=txt_split_lines, strict=strict, stats=stats
                )
                pending: deque[Future] = deque()
                for batch in _batches(documents, batch_chars, BATCH_DOCS):
                    pending.append(pool.submit(_encode_batch, encoder, batch, eos_id, dtype))
                    while len(pending) >= 2 * workers:
                        consume(pending.popleft().result(), source)
                while pending:
                    consume(pending.popleft().result(), source)
                infos[source].n_docs = stats.n_docs
                infos[source].n_skipped = stats.n_skipped
                infos[source].n_empty = stats.n_empty
        train.close()
        ensure_documents(all_stats)
        if reserve is not None and val.total < min_val_tokens:
            _top_up_validation(out, train, val, reserve, min_val_tokens - val.total, infos, dtype, shard_tokens)
        if train.total == 0:
            raise DataError(
                f"every document went to the validation split ({val.total} tokens); lower val_fraction "
                f"or min_val_tokens, or add data"
            )
    except BaseException:
        train.close()
        val.close()
        for path in _our_files(out):  # no half-built shard directory is left behind
            path.unlink()
        raise
    train.close()
    val.close()

    manifest = Manifest(
        tokenizer_sha256=tokenizer.fingerprint,
        vocab_size=tokenizer.vocab_size,
        eos_id=eos_id,
        dtype=dtype.name,
        shard_tokens=shard_tokens,
        val_fraction=val_fraction,
        min_val_tokens=min_val_tokens,
        train=train.shards,
        val=val.shards,
        sources=infos,
        options={"text_field": text_field, "txt_split_lines": txt_split_lines, "strict": strict},
    )
    tmp = out / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / MANIFEST_FILE)
    return manifest


def _top_up_validation(
    out: Path,
    train: _ShardWriter,
    val: _ShardWriter,
    reserve: _Reserve,
    need: int,
    infos: list[SourceInfo],
    dtype: np.dtype,
    shard_tokens: int,
) -> None:
    """Move the smallest-hash train documents to ``val`` until it gains ``need`` tokens."""
    chosen = []
    moved = 0
    for _doc_hash, start, length, source in reserve.smallest_first():
        if moved >= need:
            break
        chosen.append((start, length, source))
        moved += length
    if moved < need or moved >= train.total:
        raise DataError(
            f"the corpus is too small to hold out {val.total + need} validation tokens: it has "
            f"{train.total + val.total} tokens in all; lower min_val_tokens or add data"
        )
    chosen.sort()
    old = [
        np.memmap(out / shard.file, dtype=dtype, mode="r", shape=(shard.n_tokens,))
        for shard in train.shards
        if shard.n_tokens
    ]
    stream_starts = np.cumsum([0] + [a.size for a in old])

    def read(start: int, stop: int) -> np.ndarray:
        parts = []
        index = int(np.searchsorted(stream_starts, start, side="right")) - 1
        while start < stop:
            local = start - int(stream_starts[index])
            take = min(stop - start, old[index].size - local)
            parts.append(np.array(old[index][local : local + take]))
            start += take
            index += 1
        return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)

    for start, length, source in chosen:
        val.write(read(start, start + length))
        infos[source].n_val_docs += 1
        infos[source].n_val_tokens += length

    rewritten = _ShardWriter(out, "train.rewrite", dtype, shard_tokens)
    cursor = 0
    window = max(1, min(shard_tokens, 1 << 24))
    keep_ranges = []
    for start, length, _source in chosen:
        keep_ranges.append((cursor, start))
        cursor = start + length
    keep_ranges.append((cursor, train.total))
    for begin, end in keep_ranges:
        while begin < end:
            stop = min(end, begin + window)
            rewritten.write(read(begin, stop))
            begin = stop
    rewritten.close()
    del old
    for shard in train.shards:
        (out / shard.file).unlink()
    final = []
    for index, shard in enumerate(rewritten.shards):
        name = f"train_{index:05d}.bin"
        os.replace(out / shard.file, out / name)
        final.append(ShardInfo(file=name, n_tokens=shard.n_tokens))
    train.shards = final
    train.total = rewritten.total


# ----------------------------------------------------------------------------- CLI


def data_main(argv: Sequence[str] | None = None) -> int:
    """``nanoseek data build --input FILES --tokenizer DIR --out DIR`` (and ``data info DIR``)."""
    parser = argparse.ArgumentParser(prog="nanoseek data", description="Token shard tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="tokenise a corpus into shards")
    build.add_argument("--input", nargs="+", required=True, help="files, directories or glob patterns")
    build.add_argument("--tokenizer", required=True, help="tokenizer directory")
    build.add_argument("--out", required=True, help="output shard directory")
    build.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    build.add_argument("--val-fraction", type=float, default=0.005)
    build.add_argument("--min-val-tokens", type=int, default=0, help="e.g. seq_len + 1")
    build.add_argument("--workers", type=int, default=None)
    build.add_argument("--text-field", default="text")
    build.add_argument("--txt-split-lines", action="store_true")
    build.add_argument("--strict", action="store_true")
    build.add_argument("--overwrite", action="store_true")
    info = commands.add_parser("info", help="summarise a shard directory")
    info.add_argument("dir")
    args = parser.parse_args(argv)
    if args.command == "build":
        manifest = build_shards(
            args.input,
            args.tokenizer,
            args.out,
            shard_tokens=args.shard_tokens,
            val_fraction=args.val_fraction,
            min_val_tokens=args.min_val_tokens,
            workers=args.workers,
            text_field=args.text_field,
            txt_split_lines=args.txt_split_lines,
            strict=args.strict,
            overwrite=args.overwrite,
        )
    else:
        manifest = read_manifest(args.dir)
    skipped = sum(s.n_skipped for s in manifest.sources)
    docs = sum(s.n_docs for s in manifest.sources)
    print(
        f"{len(manifest.sources)} files, {docs} documents ({skipped} skipped for invalid UTF-8); "
        f"train {manifest.n_train_tokens} tokens in {len(manifest.train)} shards, "
        f"val {manifest.n_val_tokens} tokens in {len(manifest.val)} shards; dtype {manifest.dtype}"
    )
    return 0
