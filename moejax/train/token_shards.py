"""Pre-tokenized corpora: token shards written once, read lazily with random access.

A corpus larger than RAM cannot go through `data.pack`, which holds every
window in memory. `tools/tokenize_data.py` (`write_shards`) streams the
documents of any `data.path` through `data.encode_documents` once and writes
a directory that `data.path` then names; `open_shards` memory-maps it and
`ShardCorpus.windows` gives the windows `pack` would give for the same corpus,
split and seq_len, read on demand, so `LMData` and its grain iterator (whose
checkpointed state is a position, not the data) work unchanged.

Directory format (version 1):

- `manifest.json`, written last (a directory without it is incomplete):
  {"format": "moejax-token-shards", "version": 1,
   "tokenizer": {"name", "vocab_size", "fingerprint" ("bytes", or "sha256:" +
   the hex sha256 of tokenizer.json), "bos_id", "eos_id"},
   "dtype": "uint16" | "uint32" (`tokenizer.ids_dtype(vocab_size)`),
   "documents": D, "tokens": T, "domains": [sorted domain names],
   "source": {"data.path", "data.text_field", "data.domain_field"},
   "shards": [{"tokens", "doc_offsets", "doc_domains": file names,
               "num_tokens", "num_documents"}, ...]}
- per shard k, `NNNNN.tokens.npy`: dtype [n_k], the next n_k tokens of the
  corpus (each document's ids incl. its EOS separator, documents in corpus
  order, back to back); every shard but the last holds exactly
  `--shard-tokens`, so documents and windows cross shard boundaries.
- `NNNNN.doc_offsets.npy`: int64 [d_k], where each document that *starts* in
  shard k starts, as an offset into that shard's tokens (documents are
  contiguous: a document ends where the next one starts);
- `NNNNN.doc_domains.npy`: int32 [d_k], those documents' indices into
  "domains".

Reading holds O(number of documents) index arrays (document starts, lengths,
domains, runs of consecutive documents on each side of the split) and never
the token stream: a window is gathered from the memmaps when indexed.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import pathlib
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from moejax.train import data as data_lib
from moejax.train import tokenizer as tok_lib

FORMAT = "moejax-token-shards"
VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_SHARD_TOKENS = 1 << 26  # 128 MiB of uint16 ids per shard
_ENCODE_DOCS = 256  # documents per data.encode_documents call (HF tokenizers batch in Rust)
_ENCODE_BYTES = 1 << 22  # ... or fewer, once they hold this many bytes of text


def fingerprint(tok: tok_lib.Tokenizer) -> str:
  """'bytes' for the byte tokenizer, else 'sha256:' + the hex sha256 of its tokenizer.json."""
  if isinstance(tok, tok_lib.HFTokenizer):
    return "sha256:" + hashlib.sha256(pathlib.Path(tok.file).read_bytes()).hexdigest()
  if isinstance(tok, tok_lib.ByteTokenizer):
    return tok_lib.BYTES
  raise ValueError(f"data.tokenizer={getattr(tok, 'name', tok)!r} is a {type(tok).__name__}; "
                   "token shards know the byte tokenizer and tokenizer.json files")


def _tokenizer_record(tok: tok_lib.Tokenizer) -> dict[str, Any]:
  return {"name": tok.name, "vocab_size": int(tok.vocab_size), "fingerprint": fingerprint(tok),
          "bos_id": tok.bos_id, "eos_id": tok.eos_id}


def is_shards_dir(path: str | os.PathLike) -> bool:
  """Whether `path` is a directory holding manifest.json (a token-shards directory)."""
  p = pathlib.Path(path).expanduser()
  return p.is_dir() and (p / MANIFEST).is_file()


# --------------------------------------------------------------------------- writing


def _batches(docs: Iterable[data_lib.Document]) -> Iterator[list[data_lib.Document]]:
  batch: list[data_lib.Document] = []
  size = 0
  for doc in docs:
    batch.append(doc)
    size += len(doc.text)
    if len(batch) >= _ENCODE_DOCS or size >= _ENCODE_BYTES:
      yield batch
      batch, size = [], 0
  if batch:
    yield batch


def write_shards(docs: Iterable[data_lib.Document], tok: tok_lib.Tokenizer,
                 out_dir: str | os.PathLike, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                 source: dict[str, Any] | None = None) -> dict[str, Any]:
  """Tokenize `docs` (streamed) into shards under `out_dir`; returns the manifest.

  Holds at most one batch of documents and one shard of tokens (plus the
  document being split) in memory, and O(documents) offsets and domain ids.
  `out_dir` must be new or empty (ValueError naming --out); on an error the
  files written so far are removed. `source` is recorded in the manifest.
  """
  if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, (int, np.integer)) \
      or shard_tokens < 1:
    raise ValueError(f"--shard-tokens={shard_tokens!r} is not allowed; it must be a positive integer")
  out = pathlib.Path(out_dir).expanduser()
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise ValueError(f"--out={str(out_dir)!r} exists and is not an empty directory; allowed: a "
                     "new or empty directory (remove it or give another)")
  created = not out.exists()
  out.mkdir(parents=True, exist_ok=True)
  written: list[pathlib.Path] = []
  try:
    manifest = _write(docs, tok, out, int(shard_tokens), source or {}, written)
  except BaseException:
    for f in written:
      f.unlink(missing_ok=True)
    if created and not any(out.iterdir()):
      out.rmdir()
    raise
  return manifest


def _write(docs: Iterable[data_lib.Document], tok: tok_lib.Tokenizer, out: pathlib.Path,
           shard_tokens: int, source: dict[str, Any], written: list[pathlib.Path]
           ) -> dict[str, Any]:
  dtype = np.dtype(tok_lib.ids_dtype(tok.vocab_size))
  buffer: list[np.ndarray] = []  # tokens of the shard being filled
  buffered = 0
  shards: list[dict[str, Any]] = []
  offsets: list[array.array] = [array.array("q")]  # per shard: starts of its documents
  domain_ids: list[array.array] = [array.array("i")]  # per shard: first-seen domain ids
  first_seen: dict[str, int] = {}
  total_docs = total_tokens = 0

  def save(name: str, arr: np.ndarray) -> None:
    f = out / name
    written.append(f)
    np.save(f, arr)

  def flush(tokens_T: np.ndarray) -> None:
    name = f"{len(shards):05d}.tokens.npy"
    save(name, tokens_T)
    shards.append({"tokens": name, "num_tokens": int(tokens_T.size)})
    offsets.append(array.array("q"))
    domain_ids.append(array.array("i"))

  for batch in _batches(docs):
    for doc, ids in zip(batch, data_lib.encode_documents(batch, tok)):
      offsets[-1].append(buffered)
      domain_ids[-1].append(first_seen.setdefault(doc.domain, len(first_seen)))
      total_docs += 1
      total_tokens += ids.size
      buffer.append(ids.astype(dtype))
      buffered += ids.size
      if buffered >= shard_tokens:  # cut whole shards; the rest starts the next one
        cat = np.concatenate(buffer)
        start = 0
        while cat.size - start >= shard_tokens:
          flush(cat[start:start + shard_tokens])
          start += shard_tokens
        buffer, buffered = [cat[start:]], cat.size - start
  if not total_docs:
    raise ValueError("the corpus holds no documents; allowed: a data.path with text")
  if buffered or len(offsets[-1]):  # the last, shorter shard
    flush(np.concatenate(buffer) if buffer else np.zeros(0, dtype))
  offsets.pop()  # flush opened lists for a shard that never came
  domain_ids.pop()

  domains = sorted(first_seen)
  rank = {name: j for j, name in enumerate(domains)}
  remap = np.zeros(len(first_seen), np.int32)
  for name, i in first_seen.items():
    remap[i] = rank[name]
  for k, shard in enumerate(shards):
    stem = shard["tokens"].removesuffix(".tokens.npy")
    shard["doc_offsets"] = f"{stem}.doc_offsets.npy"
    shard["doc_domains"] = f"{stem}.doc_domains.npy"
    shard["num_documents"] = len(offsets[k])
    save(shard["doc_offsets"], np.frombuffer(offsets[k], np.int64).copy()
         if len(offsets[k]) else np.zeros(0, np.int64))
    ids = np.frombuffer(domain_ids[k], np.int32) if len(domain_ids[k]) else np.zeros(0, np.int32)
    save(shard["doc_domains"], remap[ids].astype(np.int32))
  manifest = {
      "format": FORMAT, "version": VERSION, "tokenizer": _tokenizer_record(tok),
      "dtype": dtype.name, "documents": total_docs, "tokens": total_tokens, "domains": domains,
      "source": source, "shards": shards,
  }
  tmp = out / (MANIFEST + ".tmp")
  written.append(tmp)
  tmp.write_text(json.dumps(manifest, indent=1) + "\n")
  written.append(out / MANIFEST)
  os.replace(tmp, out / MANIFEST)
  return manifest


# --------------------------------------------------------------------------- reading


class ShardCorpus:
  """An opened token-shards directory: memmapped shards plus per-document index arrays."""

  def __init__(self, path: str, manifest: dict[str, Any], tokens: list[np.ndarray],
               doc_start_D: np.ndarray, doc_domain_D: np.ndarray):
    self.path = path
    self.manifest = manifest
    self.dtype = np.dtype(manifest["dtype"])
    self.domains: list[str] = list(manifest["domains"])
    self._tokens = tokens  # per shard: memmap dtype [n_k]
    sizes = np.array([t.size for t in tokens], np.int64)
    self.shard_start_S1 = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    self.num_tokens = int(self.shard_start_S1[-1])
    self.doc_start_D = doc_start_D  # int64 [D]: first token of each document
    self.doc_len_D = np.diff(np.append(doc_start_D, self.num_tokens)).astype(np.int64)
    self.doc_domain_D = doc_domain_D  # int32 [D]
    self.num_documents = int(doc_start_D.size)

  def __reduce__(self) -> tuple:
    """Pickled as its path (worker processes map the files again; no tokens are copied)."""
    return open_shards, (self.path,)

  def check_tokenizer(self, tok: tok_lib.Tokenizer, name: str) -> None:
    """ValueError naming data.tokenizer and data.path unless `tok` wrote these shards."""
    want = self.manifest["tokenizer"]
    got = _tokenizer_record(tok)
    keys = ("fingerprint", "vocab_size", "bos_id", "eos_id")
    if any(want.get(k) != got[k] for k in keys):
      show = lambda r: ", ".join(f"{k} {r.get(k)!r}" for k in keys)  # noqa: E731
      raise ValueError(
          f"data.tokenizer={name!r} ({show(got)}) is not the tokenizer the shards in "
          f"data.path={self.path!r} were written with ({want.get('name')!r}: {show(want)}); "
          f"allowed: data.tokenizer={want.get('name')!r} (or the same tokenizer.json elsewhere), "
          "or write the shards again with tools/tokenize_data.py --tokenizer")

  def read(self, start: int, stop: int) -> np.ndarray:
    """Tokens [start, stop) of the whole corpus (a copy; may span shards)."""
    parts = []
    s = int(np.searchsorted(self.shard_start_S1, start, side="right")) - 1
    while start < stop:
      end = min(stop, int(self.shard_start_S1[s + 1]))
      base = int(self.shard_start_S1[s])
      parts.append(self._tokens[s][start - base:end - base])
      start = end
      s += 1
    if len(parts) == 1:
      return np.array(parts[0])
    return np.concatenate(parts) if parts else np.zeros(0, self.dtype)

  def windows(self, doc_ids_K: np.ndarray, seq_len: int
              ) -> tuple[TokenWindows, WindowDomains]:
    """The windows and domains `data.pack` gives for documents `doc_ids_K` (in corpus order)."""
    data_lib.check_seq_len(seq_len)
    doc_ids_K = np.asarray(doc_ids_K, np.int64)
    if doc_ids_K.size > 1 and np.any(np.diff(doc_ids_K) <= 0):
      raise ValueError("doc_ids_K must be increasing (documents in corpus order)")
    width = int(seq_len) + 1
    lengths_K = self.doc_len_D[doc_ids_K]
    doc_vend_K = np.cumsum(lengths_K)  # virtual end of each document
    total = int(doc_vend_K[-1]) if doc_vend_K.size else 0
    n = data_lib.num_windows(seq_len, total, int(doc_ids_K.size))
    windows = TokenWindows(self, doc_ids_K, lengths_K, doc_vend_K, n, width)
    domains = WindowDomains(self.doc_domain_D[doc_ids_K], doc_vend_K, n, width)
    return windows, domains


def _fail(path: str, what: str) -> ValueError:
  return ValueError(f"data.path={path!r} is a token-shards directory, but {what}; allowed: a "
                    "directory written by tools/tokenize_data.py (write it again)")


def _load_array(path: str, file: pathlib.Path, dtype: np.dtype, size: int | None,
                mmap: bool) -> np.ndarray:
  if not file.is_file():
    raise _fail(path, f"{file.name} is missing")
  try:
    arr = np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)
  except (ValueError, OSError) as e:
    raise _fail(path, f"{file.name} is not a readable .npy file ({e})") from None
  if arr.ndim != 1 or arr.dtype != dtype or (size is not None and arr.size != size):
    raise _fail(path, f"{file.name} holds {arr.dtype} {list(arr.shape)}, not {dtype} "
                f"[{'n' if size is None else size}]")
  return arr


def open_shards(path: str | os.PathLike) -> ShardCorpus:
  """Memory-map a token-shards directory and check it against its manifest.

  Raises ValueError naming data.path for an unknown format or version, a
  missing or malformed file, or counts that disagree with the manifest.
  """
  path = str(path)
  root = pathlib.Path(path).expanduser()
  try:
    manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise _fail(path, f"{MANIFEST} is not readable JSON ({e})") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    got = manifest.get("format") if isinstance(manifest, dict) else manifest
    raise _fail(path, f"{MANIFEST} has format {got!r}, not {FORMAT!r}")
  if manifest.get("version") != VERSION:
    raise _fail(path, f"{MANIFEST} has version {manifest.get('version')!r}; this moejax reads "
                f"version {VERSION}")
  missing = [k for k in ("tokenizer", "dtype", "documents", "tokens", "domains", "shards")
             if k not in manifest]
  if missing:
    raise _fail(path, f"{MANIFEST} lacks {missing}")
  if manifest["dtype"] not in ("uint16", "uint32"):
    raise _fail(path, f"{MANIFEST} has dtype {manifest['dtype']!r}, not 'uint16' or 'uint32'")
  dtype = np.dtype(manifest["dtype"])
  domains = manifest["domains"]
  if not isinstance(domains, list) or not all(isinstance(d, str) for d in domains):
    raise _fail(path, f"{MANIFEST} domains is not a list of strings")
  shards = manifest["shards"]
  keys = ("tokens", "doc_offsets", "doc_domains", "num_tokens", "num_documents")
  if not isinstance(shards, list) or not all(
      isinstance(s, dict) and all(k in s for k in keys) for s in shards):
    raise _fail(path, f"{MANIFEST} shards is not a list of objects with keys {list(keys)}")
  tokens: list[np.ndarray] = []
  starts: list[np.ndarray] = []
  doms: list[np.ndarray] = []
  base = 0
  for k, shard in enumerate(shards):
    n_tok, n_doc = int(shard["num_tokens"]), int(shard["num_documents"])
    if n_tok:
      tokens.append(_load_array(path, root / shard["tokens"], dtype, n_tok, mmap=True))
    else:  # numpy cannot map an empty array
      tokens.append(_load_array(path, root / shard["tokens"], dtype, 0, mmap=False))
    off = _load_array(path, root / shard["doc_offsets"], np.dtype(np.int64), n_doc, mmap=False)
    dom = _load_array(path, root / shard["doc_domains"], np.dtype(np.int32), n_doc, mmap=False)
    if n_doc and (off.min() < 0 or off.max() > n_tok or np.any(np.diff(off) < 0)):
      raise _fail(path, f"shard {k}'s document offsets are not increasing within [0, {n_tok}]")
    if n_doc and (dom.min() < 0 or dom.max() >= len(domains)):
      raise _fail(path, f"shard {k}'s domain ids are not within [0, {len(domains)})")
    starts.append(off + base)
    doms.append(dom)
    base += n_tok
  doc_start_D = np.concatenate(starts) if starts else np.zeros(0, np.int64)
  if base != manifest["tokens"] or doc_start_D.size != manifest["documents"]:
    raise _fail(path, f"its shards hold {base} tokens and {doc_start_D.size} documents, the "
                f"manifest says {manifest['tokens']} and {manifest['documents']}")
  if not doc_start_D.size or doc_start_D[0] != 0:
    raise _fail(path, "its first document does not start at token 0")
  doc_domain_D = np.concatenate(doms).astype(np.int32)
  for a in (doc_start_D, doc_domain_D):
    a.flags.writeable = False
  return ShardCorpus(path, manifest, tokens, doc_start_D, doc_domain_D)


# --------------------------------------------------------------------------- lazy views


class _LazyRows:
  """Row indexing shared by the lazy views: int, slice, int or bool array, and (rows, cols...)."""

  shape: tuple[int, ...]
  dtype: np.dtype

  def __len__(self) -> int:
    return self.shape[0]

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def __getitem__(self, key: Any) -> Any:
    if isinstance(key, tuple):
      if not key:
        return self[:]
      rows, rest = key[0], key[1:]
      out = self[rows]
      lead = np.ndim(out) - (self.ndim - 1)  # the axes the row index made
      return out[(slice(None),) * lead + rest] if rest else out
    n = self.shape[0]
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
      i = int(key) + (n if key < 0 else 0)
      if not 0 <= i < n:
        raise IndexError(f"index {int(key)} is out of range for {n} windows")
      return self._row(i)
    if isinstance(key, slice):
      start, stop, step = key.indices(n)
      if step == 1:
        return self._rows(start, max(start, stop))
      key = np.arange(start, stop, step)
    idx = np.asarray(key)
    if idx.dtype == bool:
      if idx.shape != (n,):
        raise IndexError(f"a boolean index needs shape ({n},), not {idx.shape}")
      idx = np.flatnonzero(idx)
    if not np.issubdtype(idx.dtype, np.integer) and idx.size:
      raise IndexError(f"index {key!r} is not allowed; allowed: an int, a slice, an integer or "
                       "boolean array, or a tuple of one of them and column indices")
    idx = idx.astype(np.int64)
    idx = np.where(idx < 0, idx + n, idx)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
      raise IndexError(f"index {key!r} is out of range for {n} windows")
    return self._take(idx)

  def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
    out = self[:]
    return out if dtype is None else out.astype(dtype)

  def __iter__(self) -> Iterator[Any]:
    for i in range(len(self)):
      yield self[i]

  def _row(self, i: int) -> Any:
    raise NotImplementedError

  def _rows(self, start: int, stop: int) -> np.ndarray:
    return self._take(np.arange(start, stop, dtype=np.int64))

  def _take(self, idx: np.ndarray) -> np.ndarray:
    raise NotImplementedError


class TokenWindows(_LazyRows):
  """Windows dtype [N, L + 1] of a virtual concatenation of documents, gathered on demand.

  The chosen documents, in corpus order and back to back, form a virtual
  token stream; window i is its tokens [i * (L + 1), (i + 1) * (L + 1)),
  exactly `data.pack`'s rows. Consecutive documents that are also adjacent
  in the corpus form one run, so most windows are one slice of one memmap.
  """

  def __init__(self, corpus: ShardCorpus, doc_ids_K: np.ndarray, lengths_K: np.ndarray,
               doc_vend_K: np.ndarray, n: int, width: int):
    self._corpus = corpus
    self._width = width
    self.shape = (n, width)
    self.dtype = corpus.dtype
    keep = lengths_K > 0  # empty documents add no tokens
    starts, lens, vend = corpus.doc_start_D[doc_ids_K[keep]], lengths_K[keep], doc_vend_K[keep]
    new_run = np.ones(starts.size, bool)
    new_run[1:] = starts[1:] != starts[:-1] + lens[:-1]
    first = np.flatnonzero(new_run)
    self._run_gstart_R = starts[first]  # int64 [R]: corpus offset of each run
    vstart = np.concatenate([[0], vend])  # virtual start of each kept document (+ total)
    self._run_vstart_R1 = np.append(vstart[first], vstart[-1]).astype(np.int64)

  def __repr__(self) -> str:
    return f"TokenWindows(shape={self.shape}, dtype={self.dtype}, path={self._corpus.path!r})"

  def _virtual(self, start: int, stop: int) -> np.ndarray:
    """Tokens [start, stop) of the virtual stream."""
    parts = []
    r = int(np.searchsorted(self._run_vstart_R1, start, side="right")) - 1
    while start < stop:
      end = min(stop, int(self._run_vstart_R1[r + 1]))
      g = int(self._run_gstart_R[r]) + start - int(self._run_vstart_R1[r])
      parts.append(self._corpus.read(g, g + end - start))
      start = end
      r += 1
    if len(parts) == 1:
      return parts[0]
    return np.concatenate(parts) if parts else np.zeros(0, self.dtype)

  def _row(self, i: int) -> np.ndarray:
    return self._virtual(i * self._width, (i + 1) * self._width)

  def _rows(self, start: int, stop: int) -> np.ndarray:
    return self._virtual(start * self._width, stop * self._width).reshape(-1, self._width)

  def _take(self, idx: np.ndarray) -> np.ndarray:
    out = np.empty(idx.shape + (self._width,), self.dtype)
    for pos, i in np.ndenumerate(idx):
      out[pos] = self._row(int(i))
    return out


class WindowDomains(_LazyRows):
  """int32 [N]: the domain of the document holding each window's first token (as `pack`)."""

  def __init__(self, doc_domain_K: np.ndarray, doc_vend_K: np.ndarray, n: int, width: int):
    self._doc_domain_K = doc_domain_K
    self._doc_vend_K = doc_vend_K
    self._width = width
    self.shape = (n,)
    self.dtype = np.dtype(np.int32)

  def __repr__(self) -> str:
    return f"WindowDomains(shape={self.shape})"

  def _take(self, idx: np.ndarray) -> np.ndarray:
    doc = np.searchsorted(self._doc_vend_K, idx * self._width, side="right")
    return self._doc_domain_K[doc].astype(np.int32)

  def _row(self, i: int) -> np.int32:
    return self._take(np.array(i, np.int64))[()]
