"""tools/generate.py: prompts in, continuations (JSON) and routing traces out, bad input named."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import load_tool

hf_models = pytest.importorskip("tests.interop.hf_models")

from moejax import interop  # noqa: E402

generate = load_tool("generate")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("gen")
  model = hf_models.make_model("mixtral", num_local_experts=4, num_experts_per_tok=2,
                               max_position_embeddings=40)
  model.save_pretrained(root / "hf")
  interop.from_hf(str(root / "hf"), str(root / "run"))
  return str(root / "run")


def _run(args, tmp_path) -> list[dict]:
  out = tmp_path / "out.json"
  assert generate.main([*args, "--json", str(out)]) == 0
  return json.loads(out.read_text())


def test_token_and_text_prompts_give_json_rows(run_dir, tmp_path):
  rows = _run(["--run", run_dir, "--prompt-tokens", "5,6,7", "--greedy", "--stop-tokens",
               "none", "--max-new-tokens", "6"], tmp_path)
  assert len(rows) == 1 and rows[0]["prompt_tokens"] == [5, 6, 7]
  assert len(rows[0]["tokens"]) == 6 and rows[0]["stopped"] is False
  prompts = tmp_path / "p.jsonl"
  prompts.write_text('{"prompt": "In the"}\n\n{"tokens": [5, 6, 7]}\n')
  both = _run(["--run", run_dir, "--prompts", str(prompts), "--greedy", "--stop-tokens", "none",
               "--max-new-tokens", "6"], tmp_path)
  assert both[0]["prompt_tokens"] == [256, *b"In the"]  # the byte tokenizer's BOS, no EOS
  assert both[1] == rows[0]  # batching with another prompt changes nothing
  body = [t for t in rows[0]["tokens"] if t < 256]
  assert rows[0]["text"] == bytes(body).decode("utf-8", "replace")


def test_sampling_is_seeded_and_stop_tokens_default_to_the_checkpoints_eos(run_dir, tmp_path):
  base = ["--run", run_dir, "--prompt-tokens", "9,8", "--temperature", "2.0", "--top-p", "0.95",
          "--max-new-tokens", "12", "--stop-tokens", "none"]
  a = _run([*base, "--seed", "1"], tmp_path)
  assert a == _run([*base, "--seed", "1"], tmp_path)
  seeds = [_run([*base, "--seed", str(s)], tmp_path)[0]["tokens"] for s in range(2, 5)]
  assert any(s != a[0]["tokens"] for s in seeds)
  from moejax.train import tokenizer as tok_lib  # noqa: PLC0415
  assert generate.default_stop_tokens(run_dir, tok_lib.get("bytes")) == [2]  # Mixtral's eos


def test_trace_file_holds_the_generated_tokens_routing(run_dir, tmp_path):
  from moejax.inference import trace as trace_lib  # noqa: PLC0415
  path = tmp_path / "t.npz"
  rows = _run(["--run", run_dir, "--prompt-tokens", "5,6,7", "--greedy", "--stop-tokens",
               "none", "--max-new-tokens", "5", "--trace", str(path)], tmp_path)
  t = trace_lib.load(path)
  np.testing.assert_array_equal(t.token_ids_T, rows[0]["tokens"])
  np.testing.assert_array_equal(t.positions_T, np.arange(3, 8))
  assert t.experts_TxNxK.shape == (5, 2, 2) and (t.experts_TxNxK >= 0).all()
  assert (t.experts_TxNxK < 4).all()
  np.testing.assert_allclose(t.weights_TxNxK.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--prompt-tokens", ",".join(["5"] * 30), "--max-new-tokens", "20"],
     "maximum context of 40 tokens"),
    (["--prompt-tokens", "5", "--temperature", "0"], "--temperature 0.0 is not allowed"),
    (["--prompt-tokens", "5", "--top-p", "1.5"], "--top-p 1.5 is not allowed"),
    (["--prompt-tokens", "5", "--top-k", "-1"], "--top-k -1 is not allowed"),
    (["--prompt-tokens", "5,x"], "--prompt-tokens '5,x' must be comma-separated"),
    (["--prompt-tokens", "5", "--stop-tokens", "999"], "--stop-tokens"),
    (["--prompts", "EMPTY"], "holds no prompt"),
    (["--prompts", "BAD"], "line 1 must hold exactly one of 'prompt' or 'tokens'"),
])
def test_bad_arguments_are_refused_by_name(run_dir, tmp_path, capsys, args, message):
  (tmp_path / "EMPTY").write_text("\n")
  (tmp_path / "BAD").write_text('{"text": "x"}\n')
  args = [str(tmp_path / a) if a in ("EMPTY", "BAD") else a for a in args]
  if "--max-new-tokens" not in args:
    args += ["--max-new-tokens", "8"]
  assert generate.main(["--run", run_dir, *args]) == 2
  assert message in capsys.readouterr().err
