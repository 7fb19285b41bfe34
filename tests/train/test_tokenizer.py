"""moejax.train.tokenizer: bytes, trained byte-level BPE, tokenizer.json files, their errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tests.conftest import load_tool, tiny_config
from moejax.checks import ConfigError
from moejax.train import data as data_lib
from moejax.train import tokenizer as T

CORPUS = ["In the beginning God created the heaven and the earth.",
          "And the earth was without form, and void; and darkness was upon the face of the deep.",
          "Ünïcödé: naïve café, 日本語, emoji 🙂 and tabs\tand\nnewlines."] * 4


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> T.HFTokenizer:
  return T.train_bpe(CORPUS, 300, tmp_path_factory.mktemp("bpe"))


@settings(max_examples=40, deadline=None)
@given(text=st.text())
def test_bytes_round_trip_and_byte_counts(text):
  tok = T.get("bytes")
  ids = tok.encode_document(text)
  assert ids[0] == T.BYTE_BOS_ID and ids[-1] == T.BYTE_EOS_ID
  assert ids[1:-1].tolist() == list(text.encode("utf-8"))
  assert tok.decode(ids) == text
  assert tok.token_bytes()[ids].sum() == len(text.encode("utf-8"))
  assert data_lib.encode(text).tolist() == ids.tolist()  # the data module's byte encoding


@settings(max_examples=40, deadline=None)
@given(text=st.text())
def test_bpe_round_trip_and_byte_counts(bpe, text):
  ids = bpe.encode_document(text)
  assert ids[0] == bpe.bos_id == 0 and ids[-1] == bpe.eos_id == 1
  assert bpe.decode(ids) == text
  # every byte of the text is counted exactly once, specials count none
  assert bpe.token_bytes()[ids].sum() == len(text.encode("utf-8"))
  assert (ids < bpe.vocab_size).all()


def test_bpe_compresses_and_is_deterministic(bpe, tmp_path):
  again = T.train_bpe(CORPUS, 300, tmp_path)
  assert (tmp_path / "tokenizer.json").read_text() == (bpe.file.parent / "tokenizer.json").read_text()
  text = CORPUS[0]
  assert bpe.vocab_size == 300 and len(again.encode(text)) < len(text.encode("utf-8")) / 2
  assert bpe.document_separator(bpe.encode_document(text))[-1] == bpe.eos_id
  assert bpe.document_separator(bpe.encode(text))[-1] == bpe.eos_id  # appended when missing


def test_transformers_loads_the_trained_directory_identically(bpe):
  transformers = pytest.importorskip("transformers")
  hf = transformers.AutoTokenizer.from_pretrained(str(bpe.file.parent))
  for text in CORPUS[:3]:
    assert hf(text)["input_ids"] == bpe.encode_document(text).tolist()
  assert (hf.bos_token_id, hf.eos_token_id) == (bpe.bos_id, bpe.eos_id)


def test_sentencepiece_style_vocab_counts_the_word_marker_as_a_space(tmp_path):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

  tok = Tokenizer(models.BPE(byte_fallback=True))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  tok.train_from_iterator(CORPUS[:2], trainers.BpeTrainer(
      vocab_size=120, special_tokens=["<s>"] + [f"<0x{b:02X}>" for b in range(256)],
      show_progress=False))
  tok.save(str(tmp_path / "tokenizer.json"))
  sp = T.get(str(tmp_path))
  ids = sp.encode("the earth")
  assert sp.token_bytes()[ids].sum() == len("▁the▁earth".replace("▁", " ").encode())
  assert sp.token_bytes()[tok.token_to_id("<s>")] == 0 and sp.bos_id is None


@pytest.mark.parametrize("make, message", [
    (lambda d: str(d / "missing"), "does not exist"),
    (lambda d: "org/model", "download it first"),
    (lambda d: str(d), "without tokenizer.json"),
    (lambda d: (d / "vocab.txt").write_text("x") and str(d / "vocab.txt"), "is not a .json file"),
    (lambda d: (d / "tokenizer.json").write_text("{}") and str(d), "not a valid tokenizer.json"),
])
def test_bad_tokenizer_paths_name_the_key(tmp_path, make, message):
  with pytest.raises(ValueError, match="data.tokenizer=") as e:
    T.get(make(tmp_path))
  assert message in str(e.value)


def test_special_tokens_must_exist(bpe, tmp_path):
  (tmp_path / "tokenizer.json").write_text((bpe.file.parent / "tokenizer.json").read_text())
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|nope|>"}))
  with pytest.raises(ValueError, match="bos_token='<|nope|>' is not in"):
    T.get(str(tmp_path))
  with pytest.raises(ValueError, match="vocab_size=258 is not allowed"):
    T.train_bpe(CORPUS, 258, tmp_path / "small")


def test_data_packs_with_a_tokenizer_and_counts_text_bytes(bpe, tmp_path):
  corpus = tmp_path / "c.txt"
  corpus.write_text("\n\n".join(CORPUS * 30))
  d = data_lib.make_data(str(corpus), 16, 0.2, 0, str(bpe.file.parent))
  assert d.train_windows.dtype == np.uint16 and int(d.train_windows.max()) < bpe.vocab_size
  batch = d.val_batches(2, 1)[0]
  want = sum(len(bpe.decode([t]).encode("utf-8")) for t in batch["targets"].ravel()
             if t not in (bpe.bos_id, bpe.eos_id))
  assert d.text_bytes(batch["targets"]) == want
  assert data_lib.bits_per_byte(math.log(2), 0.25) == pytest.approx(0.25)


def test_training_with_a_tokenizer_reports_bits_per_text_byte(bpe, tmp_path):
  from moejax.train import trainer  # noqa: PLC0415

  corpus = tmp_path / "c.txt"
  corpus.write_text("\n\n".join(CORPUS * 30))
  cfg = tiny_config()
  cfg.data.path, cfg.data.tokenizer, cfg.data.val_fraction = str(corpus), str(bpe.file.parent), 0.2
  cfg.train.steps, cfg.train.warmup_steps, cfg.train.eval_every, cfg.train.batch_size = 2, 1, 2, 2
  cfg.train.eval_batches = 1
  with pytest.raises(ConfigError, match="model.vocab_size=258 is invalid: must be >= the 300"):
    trainer.prepare(cfg)
  cfg.model.vocab_size = 304
  summary = trainer.train(cfg, str(tmp_path / "run"))
  data = data_lib.from_config(cfg)
  targets = data.val_batches(2, 1)[0]["targets"]
  per_byte = targets.size / data.text_bytes(targets)
  assert summary["final_val_bpb"] == pytest.approx(
      summary["final_val_loss"] * per_byte / math.log(2), rel=1e-6)
  assert per_byte < 0.8  # BPE tokens hold several bytes


def test_train_tokenizer_cli(tmp_path, capsys):
  (tmp_path / "c.txt").write_text("\n\n".join(CORPUS))
  tool = load_tool("train_tokenizer")
  assert tool.main(["--data", str(tmp_path / "c.txt"), "--vocab-size", "280",
                    "--out", str(tmp_path / "tok")]) == 0
  assert "vocab 280" in capsys.readouterr().out
  assert T.get(str(tmp_path / "tok")).vocab_size == 280
