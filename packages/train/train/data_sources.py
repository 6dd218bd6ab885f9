"""Where documents come from, and the token cache they are tokenized into once.

``dataset`` strings (see :func:`open_source`):

* ``""``, ``"default"`` or ``"shakespeare"``: the bundled corpus, ``assets/shakespeare.jsonl.gz``:
  Shakespeare's plays and poems (public domain, Project Gutenberg's texts), one document per
  scene, sonnet or poem, 934 documents, 5.4 MB of text (``tools/corpus/make_shakespeare.py``).
* ``"templates"``: ``assets/templates.txt``, 320 KB of generated template stories as one
  document; tests use it where a tiny, byte-predictable corpus is the point.
* a local ``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` file (the text formats may be
  gzipped: ``.jsonl.gz``), or a folder of them (searched recursively, read in sorted path
  order). A ``.txt`` file is ONE document; the other formats hold one document per record, in
  the ``text_column`` field.
* anything else: a Hugging Face hub dataset, ``name`` (``--dataset-config``, ``--dataset-split``
  choose its configuration and split).

All formats are read with Hugging Face ``datasets`` (its ``text``/``json``/``parquet`` builders
for local files), so local and hub data go through the same code.

The token cache is one flat binary file per (documents, tokenizer, text column): every
document's tokens followed by one EOS, as uint16 (uint32 for vocabularies over 65536).
It is written to a temporary name and renamed into place, and a lock file lets the first of
several ranks starting together tokenize while the others wait, then memory-map it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .tokenizer import Tokenizer, tokenizer_fingerprint

try:  # POSIX advisory locks; elsewhere the atomic rename alone keeps the cache correct
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
CACHE_FORMAT = 2  # bump when the cache layout or the document joining rule changes
ENCODE_CHUNK = 256  # documents per tokenizer call (lets HF tokenizers use their threads)
PROGRESS_EVERY_S = 5.0  # seconds between progress lines while tokenizing
# A prepared dataset this large is tokenized by Dataset.map in worker processes (fewer: one pass,
# as starting the workers would cost more than it saves); at most this many workers.
PARALLEL_MIN_DOCUMENTS = 20_000
MAX_TOKENIZE_WORKERS = 16


ASSETS = Path(__file__).resolve().parent / "assets"
# dataset names that mean a bundled file
BUNDLED = {"": "shakespeare.jsonl.gz", "default": "shakespeare.jsonl.gz", "shakespeare": "shakespeare.jsonl.gz",
           "templates": "templates.txt"}


def default_corpus_path() -> Path:
    """The bundled default corpus: Shakespeare, one JSON record per document, gzipped."""
    return ASSETS / BUNDLED["default"]


def templates_corpus_path() -> Path:
    """The bundled template stories (``tools/corpus/make_templates.py``), one ``.txt`` document."""
    return ASSETS / BUNDLED["templates"]


def file_format(path: Path) -> str:
    """The suffix that names a file's format, looking through a ``.gz``: ``a.jsonl.gz`` -> ``.jsonl``."""
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


def default_cache_dir() -> Path:
    """``$MESHTRON_CACHE`` or ``~/.cache/meshtron``; tokens go to its ``tokens/`` subfolder."""
    return Path(os.environ.get("MESHTRON_CACHE", Path.home() / ".cache" / "meshtron")) / "tokens"


@dataclass
class Source:
    """A reopenable stream of documents.

    ``records(epoch)`` returns a fresh iterator of records (dicts); ``fingerprint`` changes
    whenever the documents may have changed, and keys the token cache.
    """

    description: str
    fingerprint: str
    text_column: str
    records: Callable[[int], Iterable[dict[str, Any]]]

    def texts(self, epoch: int = 0, records: Iterable[dict[str, Any]] | None = None) -> Iterator[str]:
        """The documents' texts: of ``records`` when given (a stream the caller holds), else of epoch ``epoch``."""
        for record in self._checked_records(self.records(epoch) if records is None else records):
            if self.text_column not in record:
                raise ValueError(
                    f"{self.description}: records have no column {self.text_column!r} (columns: "
                    f"{sorted(record)}); pass --text-column with the name of the text field")
            yield record[self.text_column]


    def _checked_records(self, records: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The records, with a read or parse failure (pyarrow's and ``datasets``' are ValueErrors)
        reported as a ValueError naming this source."""
        records = iter(records)
        while True:
            try:
                record = next(records)
            except StopIteration:
                return
            except (ValueError, OSError) as err:
                raise ValueError(f"--dataset {self.description} cannot be read: {err}") from None
            yield record


def open_source(dataset: str, text_column: str = "text", streaming: bool = False, hub_config: str = "",
                split: str = "train") -> Source:
    """Resolve a ``dataset`` string (module docstring) into a :class:`Source`.

    ``streaming``: records come as a ``datasets.IterableDataset`` (with ``state_dict``), read
    lazily; otherwise hub data is downloaded and prepared first. ``hub_config`` and ``split``
    choose a hub dataset's configuration and split (local files have one split).
    """
    local = check_local_dataset(dataset)
    if local is not None:
        return _local_source(*local, text_column)
    return _hub_source(dataset, hub_config, split, text_column, streaming)


def check_local_dataset(dataset: str) -> tuple[str, list[Path]] | None:
    """(label, files) of a bundled or local dataset (after checking the files' types), or None
    for a hub name. Reads no data, so the trainer runs it before any collective.

    A missing path is a ValueError when the string looks like a path (a known suffix,
    ``.``/``/``/``~`` in front, ``/`` at the end); anything else is taken as a hub name.
    """
    if dataset in BUNDLED:
        return f"bundled {BUNDLED[dataset]}", [ASSETS / BUNDLED[dataset]]
    path = Path(dataset).expanduser()
    if path.exists():
        return str(path), _local_files(path.resolve())
    if file_format(Path(dataset)) in LOCAL_BUILDERS or dataset.startswith((".", "/", "~")) or dataset.endswith("/"):
        raise ValueError(f"--dataset {dataset!r} looks like a local path but {path} does not exist")
    return None


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        if file_format(path) not in LOCAL_BUILDERS:
            raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(LOCAL_BUILDERS)} "
                             f"(optionally gzipped: .jsonl.gz)")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and file_format(p) in LOCAL_BUILDERS)
    if not files:
        raise ValueError(f"--dataset folder {path} holds no {'/'.join(sorted(LOCAL_BUILDERS))} files")
    return files


def _local_source(label: str, files: list[Path], text_column: str) -> Source:
    files = [f.resolve() for f in files]
    # Path, size and mtime: cheap to read, and any edit or replacement of a file changes them.
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    fingerprint = hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]
    column = "text" if all(file_format(f) == ".txt" for f in files) else text_column

    def records(epoch: int) -> Iterable[dict[str, Any]]:
        import datasets

        parts = [_read_file(datasets, f, column) for f in files]
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)  # a stream either way

    return Source(f"{label} ({len(files)} file{'s' * (len(files) > 1)})", "local-" + fingerprint, column, records)


def _read_file(datasets, path: Path, column: str):
    """One local file as a streamed dataset with the single string column ``column``.

    Keeping only the text column lets files with different extra columns be concatenated.
    """
    if file_format(path) == ".txt":  # the whole file is one document, in column "text"
        part = datasets.load_dataset("text", data_files=[str(path)], split="train", streaming=True,
                                     sample_by="document")
        return part if column == "text" else part.rename_column("text", column)
    part = datasets.load_dataset(LOCAL_BUILDERS[file_format(path)], data_files=[str(path)], split="train",
                                 streaming=True)
    if part.column_names is not None and column not in part.column_names:
        raise ValueError(f"{path}: no column {column!r} (columns: {part.column_names}); pass --text-column with "
                         f"the name of the text field")
    return part.select_columns([column])


def _hub_source(name: str, hub_config: str, split: str, text_column: str, streaming: bool) -> Source:
    import datasets

    label = f"hub:{name}" + (f" ({hub_config})" if hub_config else "") + f" [{split}]"
    try:
        ds = datasets.load_dataset(name, hub_config or None, split=split, streaming=streaming)
    except Exception as error:  # offline, unknown name or split, no access: say what to do instead
        raise ValueError(
            f"could not load the Hugging Face hub dataset {name!r} (config {hub_config or 'default'!r}, split "
            f"{split!r}): {type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}. "
            f"Check --dataset-config and --dataset-split; if the hub is unreachable (no network, HF_HUB_OFFLINE=1), "
            f"pass a local .txt/.jsonl/.json/.parquet file or folder, or 'default' for the bundled corpus") from None
    if ds.column_names is not None and text_column not in ds.column_names:
        raise ValueError(f"{label} has no column {text_column!r} (columns: {ds.column_names}); pass "
                         f"--text-column with the name of its text field")
    key = f"{name}|{hub_config}|{split}"
    if streaming:
        # a copy per read: the caller may load a position into it (load_state_dict), the original stays at the start
        return Source(f"{label} (streaming)", f"hub-stream-{key}", text_column, lambda epoch: copy.deepcopy(ds))
    # a prepared Dataset carries a fingerprint of its Arrow files
    return Source(label, f"hub-{key}-{getattr(ds, '_fingerprint', 'unknown')}", text_column, lambda epoch: ds)


# ---------------------------------------------------------------------------------------
# token cache


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every token id: half the disk for vocabularies up to 65536."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def encode_documents(tokenizer: Tokenizer, texts: Iterable[str]) -> Iterator[list[int]]:
    """Tokens of each document followed by EOS, batched through ``encode_batch`` when the tokenizer has it."""
    encode_batch = getattr(tokenizer, "encode_batch", None)
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == ENCODE_CHUNK:
            yield from _encode_chunk(tokenizer, encode_batch, chunk)
            chunk = []
    yield from _encode_chunk(tokenizer, encode_batch, chunk)


def _encode_chunk(tokenizer: Tokenizer, encode_batch, chunk: list[str]) -> Iterator[list[int]]:
    encoded = encode_batch(chunk) if encode_batch and chunk else [tokenizer.encode(t) for t in chunk]
    for ids in encoded:
        yield list(ids) + [tokenizer.eos_id]


def encoded_documents(source: Source, tokenizer: Tokenizer) -> Iterator[list[int]]:
    """Each document's tokens + EOS, in order.

    A prepared (map-style) ``datasets.Dataset`` of at least ``PARALLEL_MIN_DOCUMENTS`` documents,
    as a hub dataset is once downloaded, is tokenized by ``Dataset.map`` in ``num_proc`` worker
    processes (its own progress bar), which also spreads the Python work per document over the
    cores. Streams and local files are read in one pass, where ``encode_batch`` still spreads each
    chunk of documents over the tokenizers library's threads.
    """
    records = source.records(0)
    workers = min(os.cpu_count() or 1, MAX_TOKENIZE_WORKERS)
    if not hasattr(records, "map") or hasattr(records, "state_dict") or len(records) < PARALLEL_MIN_DOCUMENTS:
        yield from encode_documents(tokenizer, source.texts(0, records))
        return
    encoded = records.map(_encode_rows, batched=True, batch_size=ENCODE_CHUNK, num_proc=workers,
                          remove_columns=records.column_names, desc=f"tokenizing with {workers} processes",
                          fn_kwargs={"tokenizer": tokenizer, "column": source.text_column})
    for row in encoded:
        yield row["ids"]


def _encode_rows(rows: dict[str, list], tokenizer: Tokenizer, column: str) -> dict[str, list[list[int]]]:
    """``Dataset.map`` worker: a batch of records -> their token lists, EOS appended."""
    return {"ids": list(encode_documents(tokenizer, rows[column]))}


def load_token_cache(source: Source, tokenizer: Tokenizer, cache_dir: Path | None = None,
                     report: Callable[[str], None] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """The source's tokens as a read-only memory map of shape ``[n_tokens]``, and the cache's
    metadata (``n_documents``, ``n_tokens``, ``sha256`` of the tokens, ...).

    Tokenizes once; later calls (and other ranks) only map the file. The hash identifies the
    token sequence itself, so a copied or touched dataset (new cache key) still matches it.
    The process that tokenizes tells ``report`` how far it got every few seconds.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    key_fields = {"format": CACHE_FORMAT, "source": source.fingerprint, "column": source.text_column,
                  "tokenizer": tokenizer_fingerprint(tokenizer)}
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:20]  # names the files
    meta_path, bin_path = cache_dir / f"{key}.json", cache_dir / f"{key}.bin"
    if not meta_path.exists():
        with _file_lock(cache_dir / f"{key}.lock"):
            if not meta_path.exists():  # nobody finished it while we waited for the lock
                _write_cache(source, tokenizer, bin_path, meta_path, key_fields, report or (lambda line: None))
    meta = json.loads(meta_path.read_text())
    dtype = np.dtype(meta["dtype"])
    if bin_path.stat().st_size != meta["n_tokens"] * dtype.itemsize:
        raise RuntimeError(f"token cache {bin_path} is truncated: delete {meta_path} and {bin_path} to rebuild it")
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(meta["n_tokens"],)), meta


def _write_cache(source: Source, tokenizer: Tokenizer, bin_path: Path, meta_path: Path, key_fields: dict,
                 report: Callable[[str], None]) -> None:
    """Tokenize every document into ``bin_path`` (one pass, :func:`encoded_documents`), then write the
    metadata."""
    dtype = token_dtype(tokenizer.vocab_size)
    n_tokens = n_docs = 0
    digest = hashlib.sha256()
    start = last_report = time.monotonic()
    report(f"tokenizing {source.description} into {bin_path.parent} (once; later runs reuse it)")
    with _atomic_file(bin_path) as out:
        for ids in encoded_documents(source, tokenizer):
            chunk = np.asarray(ids, dtype=dtype).tobytes()
            out.write(chunk)
            digest.update(chunk)
            n_tokens += len(ids)
            n_docs += 1
            if time.monotonic() - last_report > PROGRESS_EVERY_S:
                last_report = time.monotonic()
                report(f"  tokenizing: {n_docs:,} documents, {n_tokens:,} tokens, {last_report - start:.0f} s")
    report(f"tokenized {n_docs:,} documents into {n_tokens:,} tokens in {time.monotonic() - start:.1f} s")
    meta = {**key_fields, "description": source.description, "dtype": dtype.name, "n_tokens": n_tokens,
            "n_documents": n_docs, "sha256": digest.hexdigest(), "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id}
    # the metadata file is written last: its presence means the token file is complete
    with _atomic_file(meta_path) as out:
        out.write(json.dumps(meta, indent=1).encode())


@contextlib.contextmanager
def _atomic_file(path: Path):
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive advisory lock held while the block runs (no-op where fcntl is missing)."""
    with open(path, "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)
