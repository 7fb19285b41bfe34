"""Tokenizers: UTF-8 bytes (the default) or a Hugging Face `tokenizers` file.

`data.tokenizer` selects one:

- "bytes": ids 0..255 are the UTF-8 bytes, 256 = BOS, 257 = EOS (vocab 258).
- a directory holding `tokenizer.json` (a Hugging Face checkpoint, or what
  `tools/train_tokenizer.py` writes), or the path of a `tokenizer.json`.

Every tokenizer answers the same questions: `encode` (text -> ids, no special
tokens), `encode_document` (the tokenizer's own rules for one text: the
post-processor of a `tokenizer.json`, e.g. Llama's BOS; BOS + bytes + EOS for
bytes), `decode`, and `token_bytes()`, the number of UTF-8 bytes of text each
id stands for (0 for special tokens). Bits per byte divides by those bytes, so
runs with different tokenizers compare on the same text.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from collections.abc import Iterable
from typing import Any

import numpy as np

BYTES = "bytes"
BYTE_BOS_ID = 256
BYTE_EOS_ID = 257
BYTE_VOCAB_SIZE = 258

ALLOWED = ("'bytes', a directory holding tokenizer.json (a Hugging Face checkpoint or "
           "tools/train_tokenizer.py output), or the path of a tokenizer.json")


class Tokenizer:
  """Interface: ids are int32 NumPy arrays."""

  name: str
  vocab_size: int
  bos_id: int | None
  eos_id: int | None

  def encode(self, text: str) -> np.ndarray:
    raise NotImplementedError

  def encode_document(self, text: str) -> np.ndarray:
    raise NotImplementedError

  def decode(self, ids: Any) -> str:
    raise NotImplementedError

  def token_bytes(self) -> np.ndarray:
    raise NotImplementedError

  def encode_prompt(self, text: str) -> np.ndarray:
    """`encode_document` ids without a final EOS: a text to be continued (BOS and such as
    the rules add stay)."""
    ids = self.encode_document(text)
    if ids.size and self.eos_id is not None and int(ids[-1]) == self.eos_id:
      ids = ids[:-1]
    return ids.astype(np.int32)

  def document_separator(self, ids: np.ndarray) -> np.ndarray:
    """`encode_document` ids ending in EOS (appended if the rules do not add it).

    Packed training data needs a marker between documents; a tokenizer without
    an EOS token packs documents back to back.
    """
    if self.eos_id is None or (ids.size and int(ids[-1]) == self.eos_id):
      return ids
    return np.append(ids, np.int32(self.eos_id)).astype(np.int32)


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes plus BOS (256) and EOS (257)."""

  name = BYTES
  vocab_size = BYTE_VOCAB_SIZE
  bos_id = BYTE_BOS_ID
  eos_id = BYTE_EOS_ID

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def encode_document(self, text: str) -> np.ndarray:
    ids = np.empty(len(text.encode("utf-8")) + 2, np.int32)
    ids[0], ids[-1] = BYTE_BOS_ID, BYTE_EOS_ID
    ids[1:-1] = self.encode(text)
    return ids

  def decode(self, ids: Any) -> str:
    """Drops BOS/EOS (and any id >= 256); bad UTF-8 becomes U+FFFD."""
    arr = np.asarray(ids).reshape(-1).astype(np.int64)
    return arr[(arr >= 0) & (arr < 256)].astype(np.uint8).tobytes().decode("utf-8", "replace")

  def token_bytes(self) -> np.ndarray:
    n = np.ones(BYTE_VOCAB_SIZE, np.int32)
    n[256:] = 0
    return n


@functools.lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
  """The GPT-2 ByteLevel alphabet: printable character -> the byte it stands for."""
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
  chars, extra = {}, 0
  for b in range(256):
    if b in keep:
      chars[chr(b)] = b
    else:
      chars[chr(256 + extra)] = b
      extra += 1
  return chars


def _special_token(special: Any) -> str | None:
  """A tokenizer_config.json special-token entry: a string or {"content": ...}."""
  if isinstance(special, dict):
    special = special.get("content")
  return special if isinstance(special, str) else None


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json` (BPE, Unigram, WordPiece...) via `tokenizers`."""

  def __init__(self, file: pathlib.Path, name: str):
    from tokenizers import Tokenizer as _Tok  # import only when used

    self.name = name
    self.file = file
    try:
      self._tok = _Tok.from_file(str(file))
    except Exception as e:  # the Rust error names the JSON problem
      raise ValueError(f"data.tokenizer={name!r}: {str(file)!r} is not a valid tokenizer.json "
                       f"({e}); allowed: {ALLOWED}") from None
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    self._json = json.loads(file.read_text(encoding="utf-8"))
    cfg_file = file.parent / "tokenizer_config.json"
    conf = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.exists() else {}
    self.bos_id = self._special_id(conf, "bos_token", name)
    self.eos_id = self._special_id(conf, "eos_token", name)

  def _special_id(self, conf: dict, key: str, name: str) -> int | None:
    token = _special_token(conf.get(key))
    if token is None:
      return None
    i = self._tok.token_to_id(token)
    if i is None:
      raise ValueError(f"data.tokenizer={name!r}: tokenizer_config.json {key}={token!r} is not "
                       "in the tokenizer's vocabulary")
    return int(i)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_document(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=True).ids, np.int32)

  def encode_batch(self, texts: list[str], special: bool) -> list[np.ndarray]:
    out = self._tok.encode_batch(texts, add_special_tokens=special)
    return [np.asarray(e.ids, np.int32) for e in out]

  def decode(self, ids: Any) -> str:
    arr = np.asarray(ids).reshape(-1).astype(np.int64)
    return self._tok.decode([int(i) for i in arr], skip_special_tokens=True)

  @functools.cache
  def token_bytes(self) -> np.ndarray:
    """Bytes per id: exact for byte-level BPE (GPT-2, Qwen, OLMoE, ours); for
    SentencePiece-style vocabularies '▁' counts as a space and <0xNN> as one byte."""
    special = {int(t["id"]) for t in self._json.get("added_tokens", []) if t.get("special")}
    decoder = json.dumps(self._json.get("decoder") or {})
    byte_level = '"ByteLevel"' in decoder
    table = _byte_level_decoder()
    n = np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      if i in special:
        continue
      tok = self._tok.id_to_token(i)
      if tok is None:
        continue
      if byte_level and all(c in table for c in tok):
        n[i] = len(tok)
      elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
        n[i] = 1
      else:
        n[i] = len(tok.replace("▁", " ").encode("utf-8"))
    return n


def _resolve(name: str) -> pathlib.Path:
  p = pathlib.Path(name).expanduser()
  if p.is_dir():
    f = p / "tokenizer.json"
    if not f.is_file():
      raise ValueError(f"data.tokenizer={name!r} is a directory without tokenizer.json; "
                       f"allowed: {ALLOWED}")
    return f
  if p.is_file():
    if p.name != "tokenizer.json" and p.suffix != ".json":
      raise ValueError(f"data.tokenizer={name!r} is not a .json file; allowed: {ALLOWED}")
    return p
  hint = ""
  if "/" in name and not name.startswith(("/", ".", "~")) and name.count("/") == 1:
    hint = (f" It looks like a Hugging Face hub name: moejax reads local files only; download "
            f"it first (huggingface-cli download {name} tokenizer.json tokenizer_config.json "
            f"--local-dir DIR) and pass DIR.")
  raise ValueError(f"data.tokenizer={name!r} does not exist; allowed: {ALLOWED}.{hint}")


@functools.lru_cache(maxsize=8)
def _load(name: str, mtime: float) -> Tokenizer:
  del mtime  # part of the cache key: an edited tokenizer.json is read again
  return HFTokenizer(_resolve(name), name)


def get(name: str | None) -> Tokenizer:
  """The tokenizer `data.tokenizer` names ('' or None also mean bytes)."""
  if not isinstance(name, (str, type(None))):
    raise ValueError(f"data.tokenizer={name!r} is a {type(name).__name__}; allowed: {ALLOWED}")
  if not name or name == BYTES:
    return ByteTokenizer()
  return _load(os.fspath(name), _resolve(name).stat().st_mtime)


BPE_BOS = "<|bos|>"
BPE_EOS = "<|eos|>"
BPE_MIN_VOCAB = 256 + 2 + 1  # the byte alphabet, BOS, EOS and at least one merge


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike,
              min_frequency: int = 2) -> HFTokenizer:
  """Train a byte-level BPE (GPT-2 style) and write `out_dir/tokenizer.json`.

  Ids 0 and 1 are BOS and EOS, then the 256 byte symbols, then merges; each
  text is encoded as BOS + tokens + EOS (like the byte tokenizer), and
  `tokenizer_config.json` names both so `transformers.AutoTokenizer` loads the
  directory too. Deterministic for the same texts and arguments.
  """
  from tokenizers import Tokenizer as _Tok, decoders, models, pre_tokenizers, processors, trainers

  if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < BPE_MIN_VOCAB:
    raise ValueError(f"vocab_size={vocab_size!r} is not allowed; it must be an integer >= "
                     f"{BPE_MIN_VOCAB} (256 bytes, BOS, EOS and at least one merge)")
  if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
    raise ValueError(f"min_frequency={min_frequency!r} is not allowed; it must be an integer >= 1")
  tok = _Tok(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[BPE_BOS, BPE_EOS],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  tok.post_processor = processors.TemplateProcessing(
      single=f"{BPE_BOS} $A {BPE_EOS}", special_tokens=[(BPE_BOS, 0), (BPE_EOS, 1)])
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  tok.save(str(out / "tokenizer.json"))
  (out / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BPE_BOS, "eos_token": BPE_EOS,
      "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False}, indent=1) + "\n")
  return HFTokenizer(out / "tokenizer.json", str(out))


def ids_dtype(vocab_size: int) -> type:
  """The smallest unsigned dtype holding every id (uint16 up to 65536 ids)."""
  return np.uint16 if vocab_size <= 1 << 16 else np.uint32
