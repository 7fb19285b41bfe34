"""moejax.lm_eval / moejax.eval.harness: lm-eval's model interface on a converted run."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest

pytest.importorskip("lm_eval")
hf_models = pytest.importorskip("tests.interop.hf_models")

from lm_eval.api.instance import Instance  # noqa: E402

from moejax import interop  # noqa: E402
from moejax import lm_eval as entry  # noqa: E402
from moejax import model as lm  # noqa: E402
from moejax.eval.harness import MoejaxLM  # noqa: E402
from moejax.inference import decode  # noqa: E402
from tests.conftest import load_tool  # noqa: E402

evaluate_tool = load_tool("evaluate")
TEXTS = ["In the beginning God created the heaven and the earth.",
         "And the earth was without form, and void.",
         "And God said, Let there be light: and there was light."]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("harness")
  model = hf_models.make_model("mixtral", num_local_experts=4, num_experts_per_tok=2,
                               max_position_embeddings=128)
  model.save_pretrained(root / "hf")
  interop.from_hf(str(root / "hf"), str(root / "run"))
  return str(root / "run")


def _req(kind: str, args: tuple) -> Instance:
  return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_loglikelihood_equals_a_full_forward_of_context_plus_continuation(run_dir):
  m = MoejaxLM(run=run_dir, batch_size=2)
  reqs = [("In the", " beginning"), ("", "God"), ("And the earth ", "was")]
  out = m.loglikelihood([_req("loglikelihood", r) for r in reqs])
  for (ctx, cont), (ll, greedy) in zip(reqs, out):
    ctx, cont = ctx.rstrip(), ctx[len(ctx.rstrip()):] + cont  # whitespace moves over
    ids = [256, *ctx.encode()] if ctx else [256]
    tail = list(cont.encode())
    logits, _ = lm.apply(m.variables, np.asarray([ids + tail], np.int32), m.cfg)
    z = np.asarray(logits[0], np.float64)
    logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(
        -1, keepdims=True)
    pos = np.arange(len(ids) - 1, len(ids) + len(tail) - 1)
    assert ll == pytest.approx(logp[pos, tail].sum(), rel=1e-5, abs=1e-4)
    assert greedy == bool((z[pos].argmax(-1) == tail).all())


def test_rolling_windows_predict_every_token_once(run_dir):
  short = MoejaxLM(run=run_dir, max_length=16)
  full = MoejaxLM(run=run_dir)
  text = TEXTS[0] * 2
  (a,) = short.loglikelihood_rolling([_req("loglikelihood_rolling", (text,))])
  (b,) = full.loglikelihood_rolling([_req("loglikelihood_rolling", (text,))])
  assert np.isfinite(a) and a < 0 and a != pytest.approx(b, rel=1e-6)  # less context in 16s


def test_generate_until_cuts_at_until_and_matches_the_decoder(run_dir):
  m = MoejaxLM(run=run_dir)
  (text,) = m.generate_until([_req("generate_until", ("In the", {"max_gen_toks": 10}))])
  dec = decode.Decoder(m.cfg, m.variables, context=m.max_length)
  (g,), _ = dec.generate([[256, *b"In the"]], max_new_tokens=10, stop_tokens=[2])
  want = m.tok.decode(g.tokens[:-1] if g.stopped else g.tokens)
  assert text == want
  if len(want) > 2:
    cut = want[2]
    (t2,) = m.generate_until([_req("generate_until", ("In the", {"max_gen_toks": 10,
                                                                "until": [cut]}))])
    assert t2 == want[:want.index(cut)]
  with pytest.raises(ValueError, match="unsupported gen_kwargs"):
    m.generate_until([_req("generate_until", ("x", {"beams": 2}))])


MC = [("In the beginning God created the", ["heaven", "xyzzy"], 0),
      ("Let there be", ["qqq", "light"], 1), ("And God", ["said", "ran", "saw"], 0)]


def _tasks(tmp_path) -> str:
  data = tmp_path / "data"
  data.mkdir()
  with open(data / "ppl.jsonl", "w") as f:
    for t in TEXTS:
      f.write(json.dumps({"text": t}) + "\n")
  with open(data / "mc.jsonl", "w") as f:
    for q, choices, a in MC:
      f.write(json.dumps({"question": q, "choices": choices, "answer": a}) + "\n")
  tasks = tmp_path / "tasks"
  tasks.mkdir()
  common = f"dataset_path: json\ntest_split: test\n"
  (tasks / "ppl.yaml").write_text(
      "task: moejax_local_ppl\n" + common
      + f"dataset_kwargs:\n  data_files:\n    test: {data / 'ppl.jsonl'}\n"
      "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
      "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
      "  - metric: bits_per_byte\n")
  (tasks / "mc.yaml").write_text(
      "task: moejax_local_mc\n" + common
      + f"dataset_kwargs:\n  data_files:\n    test: {data / 'mc.jsonl'}\n"
      "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
      "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
      "metric_list:\n  - metric: acc\n")
  return str(tasks)


def test_cli_runs_local_tasks_and_rolling_bpb_equals_evaluate(run_dir, tmp_path, monkeypatch):
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  out = tmp_path / "out"
  rc = entry.main(["--model_args", f"run={run_dir}", "--tasks", "moejax_local_ppl,moejax_local_mc",
                   "--include_path", _tasks(tmp_path), "--batch_size", "2",
                   "--output_path", str(out)])
  assert rc == 0
  (path,) = glob.glob(os.path.join(out, "**", "results_*.json"), recursive=True)
  res = json.load(open(path))["results"]
  data = tmp_path / "data" / "ppl.jsonl"
  ev_out = tmp_path / "ev.json"
  assert evaluate_tool.main(["--run", run_dir, "--data", str(data), "--json", str(ev_out)]) == 0
  ev = json.load(open(ev_out))
  assert res["moejax_local_ppl"]["bits_per_byte,none"] == pytest.approx(ev["bits_per_byte"],
                                                                          rel=1e-5)
  m = MoejaxLM(run=run_dir)  # lm-eval scores context + " " + choice (target_delimiter)
  right = 0
  for q, choices, a in MC:
    lls = [ll for ll, _ in m.loglikelihood([_req("loglikelihood", (q, " " + c))
                                            for c in choices])]
    right += int(np.argmax(lls) == a)
  assert res["moejax_local_mc"]["acc,none"] == pytest.approx(right / len(MC))


def test_bad_model_args_are_named(run_dir, tmp_path):
  with pytest.raises(ValueError, match="run=RUN_DIR is required"):
    MoejaxLM()
  with pytest.raises(ValueError, match="is not a run directory"):
    MoejaxLM(run=str(tmp_path))
  with pytest.raises(ValueError, match="dispatch='capacity'"):
    MoejaxLM(run=run_dir, dispatch="capacity")
  with pytest.raises(ValueError, match="batch_size=0"):
    MoejaxLM(run=run_dir, batch_size=0)
