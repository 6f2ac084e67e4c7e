"""Streaming readers that turn corpus files into documents (Python strings).

Inputs
    ``inputs`` may be one path or a list of paths. Each entry is
    * a file: used as is (its suffix must be one of ``.txt``, ``.jsonl``, ``.parquet``);
    * a directory: searched recursively for files with those suffixes, in sorted order;
      names starting with ``.`` (hidden files and folders) are left out;
    * a glob pattern (``*``, ``?``, ``[``; ``**`` recurses): the matches, sorted, with
      matched directories searched as above.
    A path that does not exist, a pattern with no match, or a directory with no corpus file
    raises :class:`DataError` naming it. Duplicates are read once, first occurrence wins.

Documents
    * ``.txt``: by default the **whole file is one document** (read into memory at once, so
      keep single files reasonable). With ``txt_split_lines=True`` every line is a document
      (read line by line, streaming); the line break is not part of the document.
    * ``.jsonl``: one JSON object per line; the document is the string in ``text_field``
      (default ``"text"``). Blank lines are ignored. A line that is not valid JSON, not an
      object, lacks the field, or holds a non-string value raises :class:`DataError` with the
      file and line number: such a file is broken or the field name is wrong, and silently
      dropping it would hide that. ``null`` counts as an empty document.
    * ``.parquet``: the document is the value of column ``text_field`` (default ``"text"``),
      a string or binary column. The file is read one record batch at a time
      (``ParquetFile.iter_batches``), so it streams. Nulls count as empty documents.

    Empty documents (``""``, or whitespace only in line mode) are dropped and counted in
    :attr:`SourceStats.n_empty`; they are never an error by themselves.

Invalid UTF-8 policy
    Text is decoded as strict UTF-8, document by document. By default a document holding
    bytes that are not valid UTF-8 (or, in JSON, a ``\\uD800``-style lone surrogate, which
    cannot be encoded as UTF-8) is **skipped and counted** in :attr:`SourceStats.n_skipped`;
    the first such place is kept in :attr:`SourceStats.first_error` and a warning is logged.
    With ``strict=True`` the first one raises :class:`DataError` naming the file and the
    absolute byte offset in the file (``.txt``/``.jsonl``) or the row and the byte offset
    inside the value (``.parquet``).

A corpus in which no document survives raises :class:`DataError` (see :func:`iter_documents`).
Nothing here loads a whole corpus into memory.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence, Union

import pyarrow as pa
import pyarrow.parquet as pq

from nanoseek.errors import NanoseekError

log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
PARQUET_BATCH_ROWS = 1024
_GLOB_CHARS = ("*", "?", "[")

PathLike = Union[str, "os.PathLike[str]"]


class DataError(NanoseekError, ValueError):
    """A corpus, tokenizer or shard directory is missing, empty, malformed or too small."""


@dataclass
class SourceStats:
    """What reading one file gave: kept, skipped (invalid UTF-8) and empty documents."""

    path: str
    n_docs: int = 0
    n_skipped: int = 0
    n_empty: int = 0
    first_error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- paths


def _is_corpus_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in SUPPORTED_SUFFIXES


def _walk_directory(directory: Path) -> list[Path]:
    found: list[Path] = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            candidate = Path(root) / name
            if _is_corpus_file(candidate):
                found.append(candidate)
    return found


def resolve_paths(inputs: PathLike | Sequence[PathLike]) -> list[Path]:
    """Expand files, directories and glob patterns into an ordered list of corpus files."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = list(inputs)
    if not inputs:
        raise DataError("no input paths were given")
    files: list[Path] = []
    for entry in inputs:
        text = os.fspath(entry)
        path = Path(text)
        if path.is_file():
            if path.suffix.lower() not in SUPPORTED_SUFFIXES:
                raise DataError(
                    f"unsupported corpus file {text!r}: expected one of {', '.join(SUPPORTED_SUFFIXES)}"
                )
            files.append(path)
        elif path.is_dir():
            found = _walk_directory(path)
            if not found:
                raise DataError(
                    f"directory {text!r} holds no {'/'.join(SUPPORTED_SUFFIXES)} files"
                )
            files.extend(found)
        elif any(ch in text for ch in _GLOB_CHARS):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise DataError(f"no files match the pattern {text!r}")
            found = []
            for match in matches:
                match_path = Path(match)
                if match_path.is_dir():
                    found.extend(_walk_directory(match_path))
                elif _is_corpus_file(match_path):
                    found.append(match_path)
            if not found:
                raise DataError(
                    f"the pattern {text!r} matches no {'/'.join(SUPPORTED_SUFFIXES)} files"
                )
            files.extend(found)
        else:
            raise DataError(f"input path does not exist: {text!r}")
    unique: list[Path] = []
    seen: set[str] = set()
    for path in files:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def file_sha256(path: PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(chunk_bytes)
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------- documents


def _bad_text(stats: SourceStats, strict: bool, where: str) -> None:
    """Apply the invalid-UTF-8 policy: raise when strict, else count the skipped document."""
    message = f"invalid UTF-8 in {where}"
    if strict:
        raise DataError(message)
    stats.n_skipped += 1
    if stats.first_error is None:
        stats.first_error = message
        log.warning("%s; skipping the document (strict=False)", message)


def _iter_txt(path: Path, stats: SourceStats, strict: bool, split_lines: bool) -> Iterator[str]:
    if not split_lines:
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            _bad_text(stats, strict, f"{path} at byte offset {err.start}")
            return
        if text:
            stats.n_docs += 1
            yield text
        else:
            stats.n_empty += 1
        return
    offset = 0
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            start = offset
            offset += len(raw)
            body = raw.rstrip(b"\r\n")
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError as err:
                _bad_text(stats, strict, f"{path} at byte offset {start + err.start} (line {line_no})")
                continue
            if text.strip():
                stats.n_docs += 1
                yield text
            else:
                stats.n_empty += 1


def _iter_jsonl(path: Path, stats: SourceStats, strict: bool, field: str) -> Iterator[str]:
    offset = 0
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            start = offset
            offset += len(raw)
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                _bad_text(stats, strict, f"{path} at byte offset {start + err.start} (line {line_no})")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {line_no}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path} line {line_no}: expected a JSON object, got {type(record).__name__}")
            if field not in record:
                keys = ", ".join(sorted(record)[:10])
                raise DataError(f"{path} line {line_no}: no field {field!r} (fields: {keys})")
            value = record[field]
            if value is None:
                stats.n_empty += 1
                continue
            if not isinstance(value, str):
                raise DataError(
                    f"{path} line {line_no}: field {field!r} holds {type(value).__name__}, not a string"
                )
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                _bad_text(
                    stats,
                    strict,
                    f"{path} line {line_no} starting at byte offset {start} (escaped lone surrogate)",
                )
                continue
            if value:
                stats.n_docs += 1
                yield value
            else:
                stats.n_empty += 1


def _iter_parquet(path: Path, stats: SourceStats, strict: bool, column: str) -> Iterator[str]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable parquet file ({err})") from None
    names = parquet.schema_arrow.names
    if column not in names:
        raise DataError(f"{path}: no column {column!r} (columns: {', '.join(names[:20])})")
    kind = parquet.schema_arrow.field(column).type
    textual = (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
        or (hasattr(pa.types, "is_string_view") and pa.types.is_string_view(kind))
        or (hasattr(pa.types, "is_binary_view") and pa.types.is_binary_view(kind))
    )
    if not textual:
        raise DataError(f"{path}: column {column!r} has type {kind}, expected string or binary")
    row = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[column]):
        # Read as bytes so that invalid UTF-8 reaches the policy below instead of an Arrow error.
        values = batch.column(0).cast(pa.large_binary()).to_pylist()
        for raw in values:
            index = row
            row += 1
            if raw is None:
                stats.n_empty += 1
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                _bad_text(stats, strict, f"{path} row {index} at byte offset {err.start} of column {column!r}")
                continue
            if text:
                stats.n_docs += 1
                yield text
            else:
                stats.n_empty += 1


def iter_file_documents(
    path: PathLike,
    *,
    text_field: str = "text",
    txt_split_lines: bool = False,
    strict: bool = False,
    stats: SourceStats | None = None,
) -> Iterator[str]:
    """Yield the documents of one corpus file; counts go into ``stats`` as they happen."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"input path does not exist: {os.fspath(path)!r}")
    if stats is None:
        stats = SourceStats(path=os.fspath(path))
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _iter_txt(path, stats, strict, txt_split_lines)
    if suffix == ".jsonl":
        return _iter_jsonl(path, stats, strict, text_field)
    if suffix == ".parquet":
        return _iter_parquet(path, stats, strict, text_field)
    raise DataError(f"unsupported corpus file {os.fspath(path)!r}: expected one of {', '.join(SUPPORTED_SUFFIXES)}")


def iter_documents(
    inputs: PathLike | Sequence[PathLike],
    *,
    text_field: str = "text",
    txt_split_lines: bool = False,
    strict: bool = False,
    stats_out: list[SourceStats] | None = None,
) -> Iterator[str]:
    """Yield the documents of every file in ``inputs``, file by file, streaming.

    Paths are resolved (and missing ones reported) before the first document is yielded.
    ``stats_out``, if given, receives one :class:`SourceStats` per file as it is opened.
    After the last file, if not a single document was yielded, raises :class:`DataError`.
    """
    paths = resolve_paths(inputs)
    return _iter_documents(paths, text_field, txt_split_lines, strict, stats_out)


def _iter_documents(
    paths: list[Path],
    text_field: str,
    txt_split_lines: bool,
    strict: bool,
    stats_out: list[SourceStats] | None,
) -> Iterator[str]:
    all_stats: list[SourceStats] = []
    for path in paths:
        stats = SourceStats(path=os.fspath(path))
        all_stats.append(stats)
        if stats_out is not None:
            stats_out.append(stats)
        yield from iter_file_documents(
            path, text_field=text_field, txt_split_lines=txt_split_lines, strict=strict, stats=stats
        )
    ensure_documents(all_stats)


def ensure_documents(all_stats: Iterable[SourceStats]) -> None:
    """Raise :class:`DataError` when the files read gave no document at all."""
    all_stats = list(all_stats)
    if sum(s.n_docs for s in all_stats) > 0:
        return
    names = ", ".join(s.path for s in all_stats[:5]) + (" ..." if len(all_stats) > 5 else "")
    skipped = sum(s.n_skipped for s in all_stats)
    empty = sum(s.n_empty for s in all_stats)
    raise DataError(
        f"the corpus is empty: no document in {names} "
        f"({skipped} skipped for invalid UTF-8, {empty} empty)"
    )
