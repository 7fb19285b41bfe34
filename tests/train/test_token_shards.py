"""Token shards (moejax.train.token_shards): the same windows, domains and batches as in memory."""

from __future__ import annotations

import json
import pathlib
import pickle
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moejax.train import data as D
from moejax.train import token_shards as TS
from moejax.train import tokenizer as tok_lib
from tests.conftest import tiny_config

WORDS = ("the", "grain", "of", "mustard", "seed", "expert", "router", "token", "ünïcode", "’", "\n")


def _text(rng: np.random.Generator, n_words: int) -> str:
  return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n_words))


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> str:
  """A byte-level BPE with vocab 300 trained on a few KB of text."""
  rng = np.random.default_rng(0)
  out = tmp_path_factory.mktemp("bpe")
  tok_lib.train_bpe([_text(rng, 60) for _ in range(80)], 300, out)
  return str(out)


def _write_jsonl(path: pathlib.Path, texts: list[str], domains: list[str]) -> pathlib.Path:
  path.write_text("".join(json.dumps({"text": t, "src": d}) + "\n" for t, d in zip(texts, domains)),
                  encoding="utf-8")
  return path


def _shards(src: str, out: pathlib.Path, tokenizer: str, shard_tokens: int, **fields) -> dict:
  docs = D.iter_documents(src, **fields)
  return TS.write_shards(docs, tok_lib.get(tokenizer), out, shard_tokens)


def _same(mem: D.LMData, sh: D.LMData) -> None:
  assert isinstance(sh.train_windows, TS.TokenWindows)
  assert sh.domains == mem.domains
  for name in ("train_windows", "val_windows", "train_domains", "val_domains"):
    a, b = getattr(mem, name), getattr(sh, name)
    assert b.shape == a.shape and b.dtype == a.dtype and len(b) == len(a), name
    np.testing.assert_array_equal(np.asarray(b), a, err_msg=name)
  np.testing.assert_array_equal(sh.token_bytes_V, mem.token_bytes_V)


def _outcome(fn):
  try:
    return fn(), None
  except ValueError as e:
    return None, str(e)


# --------------------------------------------------------------------------- equality


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=14),
    domain_ids=st.lists(st.integers(0, 2), min_size=14, max_size=14),
    seq_len=st.integers(1, 24),
    val_fraction=st.sampled_from([0.1, 0.3, 0.5]),
    seed=st.integers(0, 3),
    shard_tokens=st.integers(1, 50),
    use_bpe=st.booleans(),
)
def test_shards_equal_pack(bpe, lengths, domain_ids, seq_len, val_fraction, seed, shard_tokens,
                           use_bpe) -> None:
  rng = np.random.default_rng(len(lengths) * 1000 + seed)
  texts = [_text(rng, n) for n in lengths]
  domains = [f"d{domain_ids[i]}" for i in range(len(texts))]
  tokenizer = bpe if use_bpe else "bytes"
  with tempfile.TemporaryDirectory() as tmp:
    src = str(_write_jsonl(pathlib.Path(tmp) / "c.jsonl", texts, domains))
    _shards(src, pathlib.Path(tmp) / "sh", tokenizer, shard_tokens, domain_field="src")
    args = (seq_len, val_fraction, seed, tokenizer)
    mem, mem_err = _outcome(lambda: D.make_data(src, *args, domain_field="src"))
    sh, sh_err = _outcome(lambda: D.make_data(str(pathlib.Path(tmp) / "sh"), *args))
    assert sh_err == mem_err  # the same message when the corpus is too small
    if mem is not None:
      _same(mem, sh)
      idx = rng.integers(-len(mem.train_windows), len(mem.train_windows), 5)
      np.testing.assert_array_equal(sh.train_windows[idx, :-1], mem.train_windows[idx, :-1])
      np.testing.assert_array_equal(sh.train_domains[idx], mem.train_domains[idx])


def test_documents_and_windows_cross_shards(tmp_path: pathlib.Path) -> None:
  """Small shards: documents start mid-shard and span several; windows span shards and docs."""
  rng = np.random.default_rng(1)
  texts = [_text(rng, int(n)) for n in rng.integers(1, 30, 40)]
  src = _write_jsonl(tmp_path / "c.jsonl", texts, [f"d{i % 3}" for i in range(40)])
  m = _shards(str(src), tmp_path / "sh", "bytes", 37, domain_field="src")
  assert len(m["shards"]) == -(-m["tokens"] // 37) > 10
  assert all(s["num_tokens"] == 37 for s in m["shards"][:-1])
  assert any(s["num_documents"] == 0 for s in m["shards"])  # a shard inside one document
  corpus = TS.open_shards(tmp_path / "sh")
  assert corpus.num_documents == 40 and corpus.num_tokens == m["tokens"]
  assert np.any(corpus.doc_start_D % 37 != 0)
  for seq_len in (1, 36, 37, 80):
    mem = D.make_data(str(src), seq_len, 0.2, 0, domain_field="src")
    sh = D.make_data(str(tmp_path / "sh"), seq_len, 0.2, 0)
    _same(mem, sh)
  # The corpus read back whole is every document's encoding, in order.
  tok = tok_lib.ByteTokenizer()
  want = np.concatenate(D.encode_documents(D.load_documents(str(src)), tok))
  np.testing.assert_array_equal(corpus.read(0, corpus.num_tokens), want)
  np.testing.assert_array_equal(corpus.read(30, 80), want[30:80])


def test_kjv_shards_equal_kjv(tmp_path: pathlib.Path) -> None:
  m = _shards("", tmp_path / "kjv", "bytes", 1 << 20)
  assert m["documents"] == 1189 and len(m["shards"]) == 4 and len(m["domains"]) == 66
  _same(D.make_data("", 128, 0.02, 0), D.make_data(str(tmp_path / "kjv"), 128, 0.02, 0))


# --------------------------------------------------------------------------- iteration


@pytest.fixture(scope="module")
def pair(tmp_path_factory, bpe) -> tuple[D.LMData, D.LMData]:
  """(in memory, shards) of one small BPE corpus with many small shards."""
  tmp = tmp_path_factory.mktemp("pair")
  rng = np.random.default_rng(2)
  texts = [_text(rng, int(n)) for n in rng.integers(5, 80, 60)]
  src = _write_jsonl(tmp / "c.jsonl", texts, [f"d{i % 4}" for i in range(60)])
  _shards(str(src), tmp / "sh", bpe, 101, domain_field="src")
  return (D.make_data(str(src), 15, 0.2, 0, bpe, domain_field="src"),
          D.make_data(str(tmp / "sh"), 15, 0.2, 0, bpe))


def _assert_batches_equal(a: list[dict], b: list[dict]) -> None:
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      assert x[k].dtype == y[k].dtype
      np.testing.assert_array_equal(x[k], y[k])


def test_train_iterator_equals_in_memory(pair) -> None:
  mem, sh = pair
  n_batches = 3 * len(mem.train_windows) // 8 + 2  # over several epochs
  it_m, it_s = mem.train_iterator(8, seed=5), sh.train_iterator(8, seed=5)
  _assert_batches_equal([next(it_m) for _ in range(n_batches)], [next(it_s) for _ in range(n_batches)])
  for shard in range(2):  # per-host shards (data.shards) too
    a, b = mem.train_iterator(4, 1, shard, 2), sh.train_iterator(4, 1, shard, 2)
    _assert_batches_equal([next(a) for _ in range(10)], [next(b) for _ in range(10)])
  _assert_batches_equal(mem.val_batches(4, 3), sh.val_batches(4, 3))
  assert sh.text_bytes(next(it_s)["targets"]) > 0


@pytest.mark.parametrize("k", [0, 7, 23])
def test_train_iterator_over_shards_resumes_exactly(pair, k: int) -> None:
  _, sh = pair
  it = sh.train_iterator(8, seed=3)
  for _ in range(k):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(6)]
  fresh = sh.train_iterator(8, seed=3)
  next(fresh)
  fresh.set_state(state)
  _assert_batches_equal(want, [next(fresh) for _ in range(6)])
  many = D.ShardBatches(sh, 4, 3, [0, 1], 2)
  for _ in range(k):
    next(many)
  state = many.get_state()
  want = [next(many) for _ in range(3)]
  again = D.ShardBatches(sh, 4, 3, [0, 1], 2)
  again.set_state(state)
  _assert_batches_equal(want, [next(again) for _ in range(3)])


def test_lazy_views_index_like_arrays(pair) -> None:
  mem, sh = pair
  a, b = mem.train_windows, sh.train_windows
  n = len(a)
  assert b.ndim == 2 and b.shape == a.shape and b.dtype == np.uint16
  for key in (0, n - 1, -1, -n, np.int64(3)):
    np.testing.assert_array_equal(b[key], a[key])
    assert sh.train_domains[key] == mem.train_domains[key]
  for key in (slice(None), slice(2, 9), slice(None, None, 3), slice(9, 2, -2), slice(5, 5),
              slice(-4, None), slice(n + 5, n + 9)):
    np.testing.assert_array_equal(b[key], a[key])
    np.testing.assert_array_equal(sh.train_domains[key], mem.train_domains[key])
  idx = np.array([[1, 0], [n - 1, 4]])
  mask = np.arange(n) % 3 == 0
  for key in (idx, [2, 2, 1], np.array([], np.int64), mask, (idx, slice(None, -1)), (3, 0),
              (3, slice(1, None)), (slice(1, 4), -1)):
    np.testing.assert_array_equal(b[key], a[key])
  np.testing.assert_array_equal(sh.train_domains[mask], mem.train_domains[mask])
  np.testing.assert_array_equal(np.asarray(b, np.int32), a.astype(np.int32))
  assert [r.tolist() for r in list(sh.val_windows)] == mem.val_windows.tolist()
  for bad in (n, -n - 1, [0, n]):
    with pytest.raises(IndexError, match="out of range"):
      b[bad]
  with pytest.raises(IndexError, match="allowed"):
    b[np.array([0.5])]
  with pytest.raises(IndexError, match="boolean index"):
    b[mask[:-1]]


def test_routing_rows_from_shards(pair, monkeypatch) -> None:
  """moejax.analysis.routing indexes windows[idx, :-1] and domains[idx]."""
  from moejax.analysis import routing

  mem, sh = pair
  cfg = tiny_config()
  rows = {}
  for name, data in (("mem", mem), ("sh", sh)):
    monkeypatch.setattr(D, "from_config", lambda cfg, data=data: data)
    rows[name] = routing._split_rows(cfg, "train", 2)
  for x, y in zip(rows["mem"], rows["sh"]):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_reader_holds_index_arrays_not_tokens(pair) -> None:
  _, sh = pair
  corpus = sh.train_windows._corpus
  assert all(isinstance(t, np.memmap) for t in corpus._tokens)
  owned = [v for obj in (corpus, sh.train_windows, sh.train_domains, sh.val_windows)
           for v in vars(obj).values() if isinstance(v, np.ndarray) and not isinstance(v, np.memmap)]
  assert max(v.size for v in owned) <= corpus.num_documents + 1 < corpus.num_tokens / 10
  blob = pickle.dumps(sh.train_windows)  # for worker processes: the path, not the tokens
  assert len(blob) < 4 * corpus.num_tokens
  np.testing.assert_array_equal(pickle.loads(blob)[:], sh.train_windows[:])


# --------------------------------------------------------------------------- errors


@pytest.fixture
def byte_shards(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  rng = np.random.default_rng(3)
  src = _write_jsonl(tmp_path / "c.jsonl", [_text(rng, 30) for _ in range(10)], ["x"] * 10)
  _shards(str(src), tmp_path / "sh", "bytes", 200)
  return src, tmp_path / "sh"


def test_tokenizer_must_match(byte_shards, bpe) -> None:
  _, sh = byte_shards
  with pytest.raises(ValueError, match=r"data\.tokenizer='.*bpe.*' \(fingerprint 'sha256:.*vocab_size 300"
                     r".*is not the tokenizer the shards in data\.path=.*were written with \('bytes'"):
    D.make_data(str(sh), 16, 0.2, 0, bpe)
  D.make_data(str(sh), 16, 0.2, 0, "bytes")


def test_tokenizer_fingerprint_not_name(tmp_path: pathlib.Path, bpe) -> None:
  """A copy of the same tokenizer.json elsewhere matches; an edited one does not."""
  import shutil

  src = _write_jsonl(tmp_path / "c.jsonl", ["some words here " * 20] * 6, ["x"] * 6)
  _shards(str(src), tmp_path / "sh", bpe, 1000)
  copy = tmp_path / "copy"
  shutil.copytree(bpe, copy)
  D.make_data(str(tmp_path / "sh"), 8, 0.2, 0, str(copy))
  spec = json.loads((copy / "tokenizer.json").read_text())
  spec["normalizer"] = {"type": "Lowercase"}
  (copy / "tokenizer.json").write_text(json.dumps(spec))
  D.clear_cache()
  with pytest.raises(ValueError, match=r"data\.tokenizer=.*copy.*data\.path="):
    D.make_data(str(tmp_path / "sh"), 8, 0.2, 0, str(copy))


def test_load_documents_refuses_shards(byte_shards) -> None:
  _, sh = byte_shards
  with pytest.raises(ValueError, match=r"data\.path=.* is a token-shards directory .*holds token ids"):
    D.load_documents(str(sh))


def _edit_manifest(sh: pathlib.Path, **changes) -> None:
  m = json.loads((sh / TS.MANIFEST).read_text())
  m.update(changes)
  (sh / TS.MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("change,match", [
    ({"format": "other"}, r"format 'other', not 'moejax-token-shards'"),
    ({"version": 99}, r"version 99; this moejax reads version 1"),
    ({"tokens": 5}, r"shards hold \d+ tokens and 10 documents, the manifest says 5 and 10"),
    ({"dtype": "float32"}, r"dtype 'float32'"),
    ({"shards": [{"tokens": "x"}]}, r"shards is not a list of objects"),
])
def test_corrupt_manifest(byte_shards, change: dict, match: str) -> None:
  _, sh = byte_shards
  _edit_manifest(sh, **change)
  with pytest.raises(ValueError, match=r"data\.path=.*token-shards directory, but .*" + match):
    D.make_data(str(sh), 8, 0.2, 0)


def test_corrupt_files(byte_shards) -> None:
  _, sh = byte_shards
  (sh / "00000.doc_domains.npy").unlink()
  with pytest.raises(ValueError, match=r"data\.path=.*00000\.doc_domains\.npy is missing.*tokenize_data"):
    TS.open_shards(sh)
  np.save(sh / "00000.doc_domains.npy", np.zeros(3, np.int64))
  with pytest.raises(ValueError, match=r"00000\.doc_domains\.npy holds int64 \[3\], not int32"):
    TS.open_shards(sh)
  (sh / TS.MANIFEST).write_text("{not json")
  with pytest.raises(ValueError, match=r"manifest\.json is not readable JSON"):
    TS.open_shards(sh)


def test_too_small_for_seq_len(byte_shards) -> None:
  src, sh = byte_shards
  for seq_len in (5000, 0):
    with pytest.raises(ValueError, match=r"train\.seq_len") as mem:
      D.make_data(str(src), seq_len, 0.2, 0)
    with pytest.raises(ValueError, match=r"train\.seq_len") as shd:
      D.make_data(str(sh), seq_len, 0.2, 0)
    assert str(mem.value) == str(shd.value)


def test_write_shards_streams_and_cleans_up(tmp_path: pathlib.Path) -> None:
  out = tmp_path / "sh"

  def docs():
    for i in range(700):
      if i == 600:  # documents 0..511 were encoded and written before this one was read
        assert len(list(out.glob("*.tokens.npy"))) >= 512 * 12 // 100
      yield D.Document(f"document {i:03d}", "d")

  m = TS.write_shards(docs(), tok_lib.ByteTokenizer(), out, 100)
  assert m["documents"] == 700 and m["tokens"] == 700 * 14

  def bad():
    yield D.Document("fine", "d")
    raise ValueError("data.path='x': broken at line 2")

  with pytest.raises(ValueError, match="broken at line 2"):
    TS.write_shards(bad(), tok_lib.ByteTokenizer(), tmp_path / "new", 2)
  assert not (tmp_path / "new").exists()  # nothing half-written is left
  with pytest.raises(ValueError, match=r"--out=.*is not an empty directory"):
    TS.write_shards(iter([D.Document("a", "d")]), tok_lib.ByteTokenizer(), out)
  with pytest.raises(ValueError, match=r"--shard-tokens=0 is not allowed"):
    TS.write_shards(iter([D.Document("a", "d")]), tok_lib.ByteTokenizer(), tmp_path / "z", 0)


# --------------------------------------------------------------------------- training


def test_trainer_runs_on_shards(tmp_path: pathlib.Path) -> None:
  from moejax.train import trainer

  rng = np.random.default_rng(4)
  src = _write_jsonl(tmp_path / "c.jsonl", [_text(rng, 80) for _ in range(40)],
                     [f"d{i % 2}" for i in range(40)])
  _shards(str(src), tmp_path / "sh", "bytes", 1000)
  cfg = tiny_config()
  cfg.data.path = str(tmp_path / "sh")
  cfg.data.val_fraction = 0.1
  cfg.moe.enabled = False  # the data path is under test: the smallest model compiles fastest
  cfg.model.num_layers = 1
  cfg.train.steps = 2
  cfg.train.warmup_steps = 1
  cfg.train.log_every = 1
  cfg.train.eval_every = 2
  cfg.train.eval_batches = 1
  cfg.train.checkpoint_every = 2
  summary = trainer.train(cfg, str(tmp_path / "run"))
  assert summary["steps"] == 2 and np.isfinite(summary["final_val_loss"])
