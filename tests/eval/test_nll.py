"""moejax.eval / tools/evaluate.py: NLL equals an unpadded one-by-one reference and transformers."""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tests.conftest import load_tool, tiny_config
from moejax import eval as ev
from moejax import model as lm
from moejax.train import tokenizer as tok_lib
evaluate_tool = load_tool("evaluate")

CFG = tiny_config()
VARIABLES = lm.init(jax.random.key(0), CFG)
BYTES = tok_lib.get("bytes")


REF_LEN = 48  # the reference runs every record alone in one row of this length


def _reference_nll(ids: np.ndarray) -> float:
  """Summed NLL of ids[1:] from a forward pass of the record alone and a NumPy log-softmax."""
  row = np.zeros((1, REF_LEN), np.int32)
  row[0, :ids.size] = ids
  logits, _ = lm.apply(VARIABLES, row, CFG)
  z = np.asarray(logits, np.float64)[0, :ids.size - 1]
  logp = z - z.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  return float(-logp[np.arange(ids.size - 1), ids[1:]].sum())


@settings(max_examples=6, deadline=None)
@given(lengths=st.lists(st.integers(2, 40), min_size=1, max_size=5),
       batch_size=st.sampled_from([1, 3]), seed=st.integers(0, 99))
def test_batched_padded_scores_equal_one_by_one_reference(lengths, batch_size, seed):
  rng = np.random.default_rng(seed)
  records = [ev.Record(rng.integers(0, 258, n).astype(np.int32)) for n in lengths]
  s = ev.score(CFG, VARIABLES, records, batch_size)
  want = np.array([_reference_nll(r.ids) for r in records])
  np.testing.assert_allclose(s.nll_R, want, rtol=2e-5, atol=1e-5)
  assert s.tokens == sum(n - 1 for n in lengths) and s.bits_per_byte is None
  assert s.mean_nll == pytest.approx(want.sum() / s.tokens, rel=2e-5)


def _write(path, rows) -> str:
  with open(path, "w") as f:
    for r in rows:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  return str(path)


def test_text_records_use_the_tokenizer_rules_and_count_text_bytes(tmp_path):
  texts = ["In the beginning", "é and ü: two-byte letters"]
  recs = ev.read_jsonl(_write(tmp_path / "t.jsonl", [{"text": t} for t in texts] + [""]),
                       BYTES, 258)
  assert [r.ids.tolist() for r in recs] == [BYTES.encode_document(t).tolist() for t in texts]
  s = ev.score(CFG, VARIABLES, recs)
  n_bytes = sum(len(t.encode()) for t in texts)
  assert s.text_bytes == n_bytes
  assert s.bits_per_byte == pytest.approx(s.nll_R.sum() / math.log(2) / n_bytes)


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 1 is not JSON"),
    ('["text"]', "exactly one of 'text' or 'tokens'"),
    ('{"text": "a", "tokens": [1, 2]}', "exactly one of 'text' or 'tokens'"),
    ('{"text": 3}', "'text' is a int"),
    ('{"tokens": [1, "2"]}', "list of integer ids"),
    ('{"tokens": [1, 258]}', "must lie in [0, 258)"),
    ('{"tokens": [5]}', "gives 1 token(s)"),
])
def test_bad_records_are_refused_by_line(tmp_path, line, message):
  with pytest.raises(ValueError, match="line 1") as e:
    ev.read_jsonl(_write(tmp_path / "bad.jsonl", [line]), BYTES, 258)
  assert message in str(e.value)


def test_mixed_and_empty_files_are_refused(tmp_path):
  with pytest.raises(ValueError, match="line 2 mixes 'text' and 'tokens'"):
    ev.read_jsonl(_write(tmp_path / "m.jsonl", [{"text": "ab"}, {"tokens": [1, 2]}]), BYTES, 258)
  with pytest.raises(ValueError, match="holds no records"):
    ev.read_jsonl(_write(tmp_path / "e.jsonl", ["", "  "]), BYTES, 258)


# --------------------------------------------------------------------------- converted models

hf_models = pytest.importorskip("tests.interop.hf_models")
torch = hf_models.torch


def _hf_nll(model, ids: list[int]) -> float:
  """transformers' summed loss with labels=ids (its mean times the predicted tokens)."""
  with torch.no_grad():
    out = model(torch.tensor([ids]), labels=torch.tensor([ids]))
  return float(out.loss) * (len(ids) - 1)


def test_converted_mixtral_scores_what_transformers_scores(tmp_path):
  from moejax import interop  # noqa: PLC0415

  model = hf_models.make_model("mixtral", num_local_experts=4, num_experts_per_tok=2)
  hf_dir, run_dir = str(tmp_path / "hf"), str(tmp_path / "run")
  model.save_pretrained(hf_dir)
  interop.from_hf(hf_dir, run_dir)
  rng = np.random.default_rng(1)
  seqs = [rng.integers(0, hf_models.VOCAB, n).tolist() for n in (9, 23, 2, 17)]
  data, out = _write(tmp_path / "ids.jsonl", [{"tokens": s} for s in seqs]), tmp_path / "o.json"
  assert evaluate_tool.main(["--run", run_dir, "--data", data, "--json", str(out),
                             "--batch-size", "3"]) == 0
  got = json.loads(out.read_text())
  want = [_hf_nll(model, s) for s in seqs]
  assert got["tokens"] == sum(len(s) - 1 for s in seqs) and "bits_per_byte" not in got
  assert got["mean_nll"] == pytest.approx(sum(want) / got["tokens"], rel=1e-5)


def test_checkpoint_tokenizer_travels_and_text_scores_match_transformers(tmp_path):
  from moejax import interop  # noqa: PLC0415

  hf_dir, run_dir, back = (str(tmp_path / n) for n in ("hf", "run", "back"))
  corpus = ["the quick brown fox jumps over the lazy dog " * 3, "and the dog sleeps " * 4]
  tok = tok_lib.train_bpe(corpus * 5, hf_models.VOCAB, hf_dir)
  assert tok.vocab_size <= hf_models.VOCAB
  model = hf_models.make_model("qwen3_moe", num_experts=4, num_experts_per_tok=2,
                               moe_intermediate_size=16, norm_topk_prob=True)
  model.save_pretrained(hf_dir)
  interop.from_hf(hf_dir, run_dir)
  from moejax.init.sources import run_config  # noqa: PLC0415
  cfg = run_config(run_dir)
  assert cfg.data.tokenizer == os.path.join(run_dir, "tokenizer")
  assert os.path.exists(os.path.join(run_dir, "tokenizer", "tokenizer.json"))

  texts = ["the lazy fox", "a dog jumps over the brown dog"]
  data, out = _write(tmp_path / "t.jsonl", [{"text": t} for t in texts]), tmp_path / "o.json"
  assert evaluate_tool.main(["--run", run_dir, "--data", data, "--json", str(out)]) == 0
  got = json.loads(out.read_text())
  hf_tok = hf_models.transformers.AutoTokenizer.from_pretrained(hf_dir)
  ids = [hf_tok(t)["input_ids"] for t in texts]
  assert all(i[0] == tok.bos_id and i[-1] == tok.eos_id for i in ids)
  want = [_hf_nll(model, i) for i in ids]
  assert got["tokens"] == sum(len(i) - 1 for i in ids)
  assert got["mean_nll"] == pytest.approx(sum(want) / got["tokens"], rel=1e-5)
  n_bytes = sum(len(t.encode()) for t in texts)
  assert got["bits_per_byte"] == pytest.approx(sum(want) / math.log(2) / n_bytes, rel=1e-5)

  interop.to_hf(run_dir, back)  # the tokenizer goes back out with the weights
  again = hf_models.transformers.AutoTokenizer.from_pretrained(back)
  assert [again(t)["input_ids"] for t in texts] == ids


def test_cli_errors_name_the_argument(tmp_path, capsys):
  assert evaluate_tool.main(["--run", str(tmp_path / "none"), "--data", "x.jsonl"]) == 2
  assert "--run" in capsys.readouterr().err
