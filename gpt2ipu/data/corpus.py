"""Documents from text corpora: JSON lines (plain, gzip, zstd), Parquet and plain-text files.

Dataset `text` (the user's own files) and dataset `hf` (a Hub dataset's Parquet files) join the
chain where extraction ends: the tokenize stage reads their documents through this module, as it
reads the extract stage's `articles.jsonl` (itself JSON lines with `text` and `title` fields).

Planning (dataset `text`). `find_corpus_files` expands the configured paths (files, folders,
globs) into a sorted list; `plan_parts` cuts it into parts of about `part_bytes` each, so parts stay
comparable in size and their tokenize jobs spread over `--cores`:

- a file bigger than `part_bytes` is split into pieces: Parquet by row groups (consecutive groups
  up to about `part_bytes` compressed), uncompressed JSON lines and line-per-document text by byte
  ranges `[start, stop)`, where a line belongs to the range its first byte is in (a reader of a
  range skips the line already begun at `start` and finishes the one begun before `stop`);
- gzip and zstd streams, and text files read as one document each, cannot be cut: one piece;
- files smaller than `part_bytes` are grouped, in path order, into runs of about `GROUP_CUT` files:
  a run ends before a file whose name hashes to 0 modulo `GROUP_CUT`, or when it would pass
  `part_bytes`. Cutting by name rather than by size alone keeps a replaced file's neighbours in
  their parts, so it reruns its own part only (unless its new size passes the limit).

A manifest part is `{"name", "pieces": [{"path", "format", "start", "stop"}], "files": [{"path",
"bytes", "mtime_ns", "sha256"}]}`; `start`/`stop` are row-group numbers (Parquet) or byte offsets
(line formats), both null for a whole file.

Reading. `DocumentReader.batches` yields a part's documents in batches of about `BATCH_BYTES`
(Parquet: batches of rows inside one row group at a time), so a tokenize job's memory is bounded by
a batch and a row group, whatever the part's size. Empty documents (blank after stripping, or a
null value) are skipped and counted. Bad input ends in one `UserError` naming the file and the line,
column or byte offset.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from gpt2ipu.errors import UserError
from gpt2ipu.fsutil import sha256_file

BATCH_BYTES = 16 << 20
DEFAULT_PART_BYTES = 256 << 20
GROUP_CUT = 32
# suffix -> format; the longest suffix that matches wins.
FORMATS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl",
    ".jsonl.gz": "jsonl.gz", ".ndjson.gz": "jsonl.gz",
    ".jsonl.zst": "jsonl.zst", ".ndjson.zst": "jsonl.zst",
    ".parquet": "parquet",
    ".txt": "txt",
}
TXT_UNITS = ("file", "line")
COMPRESSED_FORMATS = ("jsonl.gz", "jsonl.zst")   # streams: never cut into byte ranges


@dataclass(frozen=True)
class TextFields:
    """Where a record keeps its document: `text` (required), `title` and `id` (optional).

    With a title field the document is `title + "\\n\\n" + text` (tokenize.include_title); the id
    field only names a record in error messages."""

    text: str = "text"
    title: str | None = None
    id: str | None = None
    # plain-text files: each file one document ("file"), or each non-empty line one ("line")
    txt_unit: str = "file"

    def columns(self) -> list[str]:
        return [name for name in (self.text, self.title, self.id) if name]


ARTICLE_FIELDS = TextFields(text="text", title="title", id="id")


def document_text(text: str, title: str | None, include_title: bool) -> str:
    """The text a document is made of: `title + "\\n\\n" + text`, or the text alone.

    Wikipedia articles start with their title, so by default it heads the document (separated
    like a paragraph); a record with no title, or `include_title=False`, gives the text alone."""
    if include_title and title:
        return f"{title}\n\n{text}"
    return text


def corpus_format(path: str | os.PathLike) -> str | None:
    name = Path(path).name.lower()
    matches = [suffix for suffix in FORMATS if name.endswith(suffix)]
    return FORMATS[max(matches, key=len)] if matches else None


# ---------------------------------------------------------------------------------------------
# Finding the files and planning the parts


def find_corpus_files(paths: Sequence[str], key: str = "text.paths") -> list[Path]:
    """The corpus files named by `paths` (files, folders searched recursively, globs), sorted and
    resolved; a UserError naming `key` for a path that matches nothing or a file of no known format."""
    if not paths:
        raise UserError(f"config key {key} is empty: list files, folders or globs of .jsonl(.gz/.zst), "
                        ".parquet or .txt documents")
    found: dict[Path, None] = {}
    for raw in paths:
        expanded = str(Path(raw).expanduser())
        if glob.has_magic(expanded):
            candidates = [Path(p) for p in sorted(glob.glob(expanded, recursive=True)) if Path(p).is_file()]
            candidates = [p for p in candidates if corpus_format(p)]
        elif Path(expanded).is_dir():
            candidates = sorted(p for p in Path(expanded).rglob("*") if p.is_file() and corpus_format(p)
                                and not any(part.startswith(".") for part in p.relative_to(expanded).parts))
        elif Path(expanded).is_file():
            if corpus_format(expanded) is None:
                raise UserError(f"{raw} (config key {key}): unknown format; corpus files end in "
                                f"{', '.join(FORMATS)}")
            candidates = [Path(expanded)]
        else:
            raise UserError(f"{raw} (config key {key}) does not exist; fix the path or remove it")
        if not candidates:
            raise UserError(f"{raw} (config key {key}) matches no file ending in {', '.join(FORMATS)}")
        for path in candidates:
            found.setdefault(path.resolve(), None)
    return sorted(found)


def file_stamps(paths: Sequence[str]) -> list[list[Any]]:
    """[path, size, mtime in ns] of every corpus file `paths` names: the workflow's cheap rerun key
    for the manifest (a file added, removed or replaced, even by an older one, changes it). A path
    that matches nothing is kept as [path, None, None]: the manifest job says what is wrong."""
    stamps: list[list[Any]] = []
    for raw in paths:
        try:
            files = find_corpus_files([raw])
        except UserError:
            stamps.append([raw, None, None])
            continue
        for path in files:
            stat = path.stat()
            stamps.append([str(path), stat.st_size, stat.st_mtime_ns])
    return stamps


@dataclass
class Piece:
    path: str
    format: str
    start: int | None = None
    stop: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "start": self.start, "stop": self.stop}

    @classmethod
    def from_dict(cls, piece: dict[str, Any]) -> Piece:
        """A piece as a manifest or a rule's params hold it (`as_dict`)."""
        return cls(piece["path"], piece["format"], piece.get("start"), piece.get("stop"))


def split_file(path: Path, fmt: str, part_bytes: int, txt_unit: str) -> list[Piece]:
    """The pieces of one file: several for a big splittable file, else the whole file."""
    size = path.stat().st_size
    if size <= part_bytes:
        return [Piece(str(path), fmt)]
    if fmt == "parquet":
        return parquet_pieces(path, part_bytes)
    if fmt == "jsonl" or (fmt == "txt" and txt_unit == "line"):
        count = -(-size // part_bytes)
        bounds = [size * i // count for i in range(count + 1)]
        return [Piece(str(path), fmt, start, stop) for start, stop in zip(bounds, bounds[1:])]
    return [Piece(str(path), fmt)]


def parquet_pieces(path: Path, part_bytes: int) -> list[Piece]:
    """Runs of consecutive row groups of about `part_bytes` compressed bytes each."""
    metadata = open_parquet(path).metadata
    pieces, start, run_bytes = [], 0, 0
    for group in range(metadata.num_row_groups):
        run_bytes += row_group_compressed_bytes(metadata.row_group(group))
        if run_bytes >= part_bytes:
            pieces.append(Piece(str(path), "parquet", start, group + 1))
            start, run_bytes = group + 1, 0
    if start < metadata.num_row_groups or not pieces:
        pieces.append(Piece(str(path), "parquet", start, metadata.num_row_groups))
    return pieces


def part_name(path: Path, root: Path) -> str:
    """A plain name (a folder and wildcard value) from the file's path below the corpus root,
    suffix kept (`a.jsonl` and `a.parquet` are two parts)."""
    relative = str(path.relative_to(root)) if path.is_relative_to(root) else path.name
    return re.sub(r"[^A-Za-z0-9._-]", "_", relative.replace(os.sep, "-")).strip("._-") or "part"


def plan_parts(files: Sequence[Path], *, part_bytes: int = DEFAULT_PART_BYTES, txt_unit: str = "file",
               hash_files: bool = True) -> list[dict[str, Any]]:
    """Manifest parts for `files` (see the module doc), each with its files' size, mtime and sha256."""
    if part_bytes < 1:
        raise UserError(f"config key text.part_bytes is {part_bytes}: it must be at least 1")
    root = Path(os.path.commonpath([str(f.parent) for f in files])) if files else Path("/")
    parts: list[dict[str, Any]] = []
    group: list[Path] = []
    group_bytes = 0

    def close_group() -> None:
        nonlocal group, group_bytes
        if group:
            name = part_name(group[0], root)
            if len(group) > 1:
                name = f"{name}--{part_name(group[-1], root)}"
            parts.append(part_entry(name, [Piece(str(f), corpus_format(f)) for f in group], group, hash_files))
        group, group_bytes = [], 0

    for path in files:
        fmt, size = corpus_format(path), path.stat().st_size
        if size > part_bytes:
            close_group()
            pieces = split_file(path, fmt, part_bytes, txt_unit)
            name = part_name(path, root)
            for number, piece in enumerate(pieces, 1):
                piece_name = name if len(pieces) == 1 else f"{name}.{number:04d}"
                parts.append(part_entry(piece_name, [piece], [path], hash_files))
            continue
        if group and (zlib.crc32(path.name.encode()) % GROUP_CUT == 0 or group_bytes + size > part_bytes):
            close_group()
        group.append(path)
        group_bytes += size
    close_group()
    return unique_names(parts)


def part_entry(name: str, pieces: list[Piece], files: list[Path], hash_files: bool) -> dict[str, Any]:
    described = []
    for path in files:
        stat = path.stat()
        entry = {"path": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        if hash_files:
            entry["sha256"] = sha256_file(path)
        described.append(entry)
    return {"name": name, "pieces": [p.as_dict() for p in pieces], "files": described}


def unique_names(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    for part in parts:
        name, n = part["name"], 1
        while part["name"] in seen:
            n += 1
            part["name"] = f"{name}-{n}"
        seen.add(part["name"])
    return parts


def refuse_duplicate_files(parts: list[dict[str, Any]], key: str = "text.paths") -> None:
    """Two files with the same content: every document would be in the corpus twice, and a
    document held out for validation also trained on."""
    by_sha: dict[str, str] = {}
    for part in parts:
        for entry in part["files"]:
            sha = entry.get("sha256")
            if sha and by_sha.setdefault(sha, entry["path"]) != entry["path"]:
                raise UserError(f"config key {key} holds the same file twice: {by_sha[sha]} and {entry['path']} "
                                f"have the same content (sha256 {sha}); remove one (its validation documents "
                                "would be trained on too)")


# ---------------------------------------------------------------------------------------------
# Reading documents


def open_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError subclasses for a bad file
        raise UserError(f"{path}: not a readable Parquet file ({err}); check the file or remove it") from None


@dataclass
class DocumentCounts:
    documents: int = 0
    empty_documents: int = 0
    input_bytes: int = 0


@dataclass
class DocumentReader:
    """Reads the documents of a list of pieces in bounded batches (see the module doc).

    `hint` ends every bad-input message (what to do, e.g. re-run the extract stage)."""

    pieces: list[Piece]
    fields: TextFields = field(default_factory=TextFields)
    include_title: bool = True
    hint: str = "fix or remove the file"
    counts: DocumentCounts = field(default_factory=DocumentCounts)

    def total_bytes(self) -> int:
        """Input bytes the pieces cover (the progress bar's total)."""
        total = 0
        for piece in self.pieces:
            size = Path(piece.path).stat().st_size
            if piece.format == "parquet" and piece.start is not None:
                total += parquet_range_bytes(Path(piece.path), piece.start, piece.stop)
            elif piece.start is not None:
                total += min(piece.stop, size) - piece.start
            else:
                total += size
        return total

    def batches(self, batch_bytes: int = BATCH_BYTES,
                on_bytes: Callable[[int], None] | None = None) -> Iterator[list[str]]:
        """Document texts in batches of about `batch_bytes`; `on_bytes(n)` reports input read."""
        batch: list[str] = []
        pending = 0
        for piece in self.pieces:
            for texts, read_bytes in self._piece_batches(piece, batch_bytes):
                batch.extend(texts)
                pending += sum(len(t) for t in texts)
                self.counts.input_bytes += read_bytes
                if on_bytes is not None:
                    on_bytes(read_bytes)
                if pending >= batch_bytes:
                    yield batch
                    batch, pending = [], 0
        if batch:
            yield batch

    def _keep(self, text: Any, title: Any) -> str | None:
        if text is None or not text.strip():
            self.counts.empty_documents += 1
            return None
        self.counts.documents += 1
        return document_text(text, title if isinstance(title, str) else None, self.include_title)

    def _piece_batches(self, piece: Piece, batch_bytes: int) -> Iterator[tuple[list[str], int]]:
        path = Path(piece.path)
        if not path.is_file():
            raise UserError(f"{path}: file not found; {self.hint}")
        if piece.format == "parquet":
            yield from self._parquet_batches(path, piece, batch_bytes)
        elif piece.format == "txt" and self.fields.txt_unit == "file":
            yield self._whole_text_file(path)
        else:
            yield from self._line_batches(path, piece, batch_bytes)

    # -- line formats: JSON lines (plain, gzip, zstd) and line-per-document text -------------
    def _line_batches(self, path: Path, piece: Piece, batch_bytes: int) -> Iterator[tuple[list[str], int]]:
        start = piece.start or 0
        parse = self._text_line if piece.format == "txt" else self._json_line
        texts: list[str] = []
        pending = 0
        # progress in the file's own bytes: the compressed ones for gzip and zstd
        compressed = piece.format in COMPRESSED_FORMATS
        with open(path, "rb", buffering=1 << 20) as raw, open_lines(raw, piece.format) as f:
            offset = start
            if start > 0:  # the line begun before `start` belongs to the previous piece
                f.seek(start - 1)
                offset = start - 1 + len(f.readline())
            reported = offset  # bytes of the lines this piece owns, so the pieces' bytes sum to the file's
            line_number = 1 if start == 0 else None  # counted from the file's start only when cheap
            for line in f:
                if piece.stop is not None and offset >= piece.stop:
                    break
                if line.strip():
                    text = parse(line, path, offset, line_number)
                    if text is not None:
                        texts.append(text)
                        pending += len(line)
                offset += len(line)
                if line_number is not None:
                    line_number += 1
                if pending >= batch_bytes:
                    position = raw.tell() if compressed else offset
                    yield texts, position - reported
                    texts, pending, reported = [], 0, position
            end = raw.tell() if compressed else offset
            if texts or end > reported:
                yield texts, max(0, end - reported)

    def _where(self, path: Path, offset: int, line_number: int | None) -> str:
        if line_number is None:
            line_number = line_number_at(path, offset)
        return f"{path}:{line_number}"

    def _json_line(self, line: bytes, path: Path, offset: int, line_number: int | None) -> str | None:
        try:
            record = json.loads(line)
        except ValueError as err:
            raise UserError(f"{self._where(path, offset, line_number)}: not a JSON line ({err}); {self.hint}") from None
        if not isinstance(record, dict):
            raise UserError(f"{self._where(path, offset, line_number)}: a JSON {type(record).__name__}, not an object "
                            f"with a \"{self.fields.text}\" field; {self.hint}")
        if self.fields.text not in record:
            raise UserError(f"{self._where(path, offset, line_number)}: has no \"{self.fields.text}\" field "
                            f"(its fields: {', '.join(map(str, record)) or 'none'}); set the text field "
                            f"(config key text.text_field) or {self.hint}")
        text = record[self.fields.text]
        if text is not None and not isinstance(text, str):
            raise UserError(f"{self._where(path, offset, line_number)}: field \"{self.fields.text}\" holds a "
                            f"{type(text).__name__}, not a string{self._record_id(record)}; {self.hint}")
        return self._keep(text, record.get(self.fields.title) if self.fields.title else None)

    def _record_id(self, record: dict) -> str:
        if self.fields.id and self.fields.id in record:
            return f" (record {self.fields.id}={record[self.fields.id]!r})"
        return ""

    def _text_line(self, line: bytes, path: Path, offset: int, line_number: int | None) -> str | None:
        return self._keep(decode_utf8(line, path, offset), None)

    def _whole_text_file(self, path: Path) -> tuple[list[str], int]:
        data = path.read_bytes()
        text = self._keep(decode_utf8(data, path, 0), None)
        return ([text] if text is not None else []), len(data)

    # -- Parquet --------------------------------------------------------------------------------
    def _parquet_batches(self, path: Path, piece: Piece, batch_bytes: int) -> Iterator[tuple[list[str], int]]:
        parquet = open_parquet(path)
        columns = self._parquet_columns(parquet, path)
        metadata = parquet.metadata
        start = piece.start or 0
        stop = metadata.num_row_groups if piece.stop is None else piece.stop
        for group in range(start, stop):
            row_group = metadata.row_group(group)
            if row_group.num_rows == 0:
                continue
            row_bytes = max(1, row_group.total_byte_size // row_group.num_rows)
            compressed = row_group_compressed_bytes(row_group)
            rows_read = 0
            for record_batch in parquet.iter_batches(batch_size=max(1, batch_bytes // row_bytes),
                                                     row_groups=[group], columns=columns, use_threads=False):
                texts_column = record_batch.column(self.fields.text)
                titles = (record_batch.column(self.fields.title).to_pylist()
                          if self.fields.title else [None] * record_batch.num_rows)
                texts = []
                for text, title in zip(texts_column.to_pylist(), titles):
                    kept = self._keep(text, title)
                    if kept is not None:
                        texts.append(kept)
                # progress in the file's compressed bytes, in proportion to the rows read
                before = compressed * rows_read // row_group.num_rows
                rows_read += record_batch.num_rows
                yield texts, compressed * rows_read // row_group.num_rows - before

    def _parquet_columns(self, parquet, path: Path) -> list[str]:
        import pyarrow as pa

        schema = parquet.schema_arrow
        for name in self.fields.columns():
            if name not in schema.names:
                key = {self.fields.text: "text_field", self.fields.title: "title_field",
                       self.fields.id: "id_field"}[name]
                raise UserError(f"{path}: has no column \"{name}\" (config key text.{key}); its columns: "
                                f"{', '.join(schema.names)}")
        for name in filter(None, (self.fields.text, self.fields.title)):
            kind = schema.field(name).type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
                    or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
                raise UserError(f"{path}: column \"{name}\" holds {kind}, not strings; name a string column "
                                "as the text/title field")
        return [name for name in (self.fields.text, self.fields.title) if name]


def row_group_compressed_bytes(row_group) -> int:
    return sum(row_group.column(c).total_compressed_size for c in range(row_group.num_columns))


def parquet_range_bytes(path: Path, start: int, stop: int | None) -> int:
    metadata = open_parquet(path).metadata
    stop = metadata.num_row_groups if stop is None else stop
    return sum(row_group_compressed_bytes(metadata.row_group(g)) for g in range(start, stop))


def open_lines(raw: IO[bytes], fmt: str) -> IO[bytes]:
    """A binary file object over the decompressed lines of the open file `raw` (itself, seekable,
    for the plain formats)."""
    if fmt == "jsonl.gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if fmt == "jsonl.zst":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
    return contextlib.nullcontext(raw)


def decode_utf8(data: bytes, path: Path, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte offset {offset + err.start}); save it as UTF-8") from None


def line_number_at(path: Path, offset: int) -> int:
    """1-based number of the line that starts at byte `offset` of an uncompressed file."""
    newlines = 0
    with open(path, "rb") as f:
        remaining = offset
        while remaining > 0:
            block = f.read(min(remaining, 1 << 20))
            if not block:
                break
            newlines += block.count(b"\n")
            remaining -= len(block)
    return newlines + 1


def pieces_from_manifest(part: dict[str, Any]) -> list[Piece]:
    return [Piece.from_dict(p) for p in part["pieces"]]
