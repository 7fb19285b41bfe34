"""tools/tokenize_data.py: the CLI that writes token shards, its output and its errors."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from moejax.train import data as D
from moejax.train import token_shards as TS
from moejax.train import tokenizer as tok_lib

_ROOT = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("tokenize_data", _ROOT / "tools" / "tokenize_data.py")
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)


@pytest.fixture
def corpus(tmp_path: pathlib.Path) -> pathlib.Path:
  """A directory with a .jsonl (domains in "src") and a .txt file."""
  root = tmp_path / "corpus"
  (root / "sub").mkdir(parents=True)
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "délta", "\n"]
  lines = [json.dumps({"body": " ".join(rng.choice(words, 40)), "src": f"s{i % 3}"}) for i in range(30)]
  (root / "sub" / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
  (root / "b.txt").write_text("\n\n".join(" ".join(rng.choice(words, 30)) for _ in range(20)),
                              encoding="utf-8")
  return root


def test_cli_writes_shards_equal_to_in_memory(corpus: pathlib.Path, tmp_path: pathlib.Path,
                                              capsys) -> None:
  out = tmp_path / "sh"
  rc = tool.main(["--data", str(corpus), "--tokenizer", "bytes", "--out", str(out),
                  "--shard-tokens", "500", "--text-field", "body", "--domain-field", "src"])
  assert rc == 0
  lines = capsys.readouterr().out.splitlines()
  m = json.loads((out / "manifest.json").read_text())
  assert lines[0].startswith(f"wrote {out}: {m['documents']} documents, {m['tokens']} tokens "
                             f"(uint16) in {len(m['shards'])} shards, ")
  assert lines[0].endswith(" s")
  assert lines[1] == f"train with: --config.data.path={out} --config.data.tokenizer=bytes"
  assert m["format"] == "moejax-token-shards" and m["version"] == 1
  assert m["tokenizer"] == {"name": "bytes", "vocab_size": 258, "fingerprint": "bytes",
                            "bos_id": 256, "eos_id": 257}
  assert m["dtype"] == "uint16" and m["documents"] == 31  # 30 records + one block of b.txt
  assert m["domains"] == ["b", "s0", "s1", "s2"]
  assert m["source"] == {"data.path": str(corpus), "data.text_field": "body",
                         "data.domain_field": "src"}
  assert len(m["shards"]) == -(-m["tokens"] // 500)
  assert sorted(p.name for p in out.iterdir()) == sorted(
      ["manifest.json"] + [s[k] for s in m["shards"] for k in ("tokens", "doc_offsets", "doc_domains")])
  mem = D.make_data(str(corpus), 31, 0.1, 2, text_field="body", domain_field="src")
  sh = D.make_data(str(out), 31, 0.1, 2)
  np.testing.assert_array_equal(np.asarray(sh.train_windows), mem.train_windows)
  np.testing.assert_array_equal(np.asarray(sh.val_domains), mem.val_domains)


def test_cli_with_a_bpe_tokenizer(corpus: pathlib.Path, tmp_path: pathlib.Path, capsys) -> None:
  texts = [d.text for d in D.load_documents(str(corpus), "body")]
  tok = tok_lib.train_bpe(texts, 300, tmp_path / "bpe")  # the small corpus stops below 300
  out = tmp_path / "sh"
  assert tool.main(["--data", str(corpus), "--tokenizer", str(tmp_path / "bpe"), "--out", str(out),
                    "--text-field", "body"]) == 0
  assert " in 1 shard, " in capsys.readouterr().out
  m = json.loads((out / "manifest.json").read_text())
  assert m["tokenizer"]["vocab_size"] == tok.vocab_size > 258
  assert m["tokenizer"]["fingerprint"].startswith("sha256:")
  mem = D.make_data(str(corpus), 20, 0.2, 0, str(tmp_path / "bpe"), text_field="body")
  sh = D.make_data(str(out), 20, 0.2, 0, str(tmp_path / "bpe"))
  np.testing.assert_array_equal(np.asarray(sh.train_windows), mem.train_windows)
  np.testing.assert_array_equal(np.asarray(sh.train_domains), mem.train_domains)


@pytest.mark.parametrize("args,match", [
    (["--shard-tokens", "0"], r"--shard-tokens=0 is not allowed; it must be a positive integer"),
    (["--tokenizer", "/nonexistent/tok"], r"data\.tokenizer='/nonexistent/tok' does not exist"),
    (["--data", "/nonexistent/corpus"], r"data\.path='/nonexistent/corpus' does not exist; allowed"),
    (["--text-field", "missing"],
     r"data\.text_field='missing': .*a\.jsonl' line 1 .*has no field 'missing'"),
])
def test_cli_errors(corpus: pathlib.Path, tmp_path: pathlib.Path, capsys, args: list[str],
                    match: str) -> None:
  out = tmp_path / "sh"
  base = {"--data": str(corpus), "--tokenizer": "bytes", "--out": str(out), "--text-field": "body"}
  for k, v in zip(args[::2], args[1::2]):
    base[k] = v
  rc = tool.main([x for kv in base.items() for x in kv])
  err = capsys.readouterr().err
  assert rc == 2 and err.startswith("error: ")
  assert re.search(match, err), err
  assert not out.exists()  # nothing half-written is left


def test_cli_bad_jsonl_line_and_existing_out(tmp_path: pathlib.Path, capsys) -> None:
  src = tmp_path / "c.jsonl"
  src.write_text('{"text": "a"}\n\n{"text": "b"\n', encoding="utf-8")
  out = tmp_path / "sh"
  assert tool.main(["--data", str(src), "--tokenizer", "bytes", "--out", str(out)]) == 2
  assert "c.jsonl' line 3 is not valid JSON" in capsys.readouterr().err
  assert not out.exists()
  src.write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
  assert tool.main(["--data", str(src), "--tokenizer", "bytes", "--out", str(out)]) == 0
  capsys.readouterr()
  assert tool.main(["--data", str(src), "--tokenizer", "bytes", "--out", str(out)]) == 2
  assert re.search(r"error: --out=.*exists and is not an empty directory", capsys.readouterr().err)
  assert TS.open_shards(out).num_documents == 2  # the first result is intact
  assert tool.main(["--data", str(out), "--tokenizer", "bytes", "--out", str(tmp_path / "o2")]) == 2
  assert "is a token-shards directory" in capsys.readouterr().err


def test_cli_as_a_script(tmp_path: pathlib.Path) -> None:
  src = tmp_path / "t.txt"
  src.write_text("one paragraph\n\nanother one\n", encoding="utf-8")
  out = tmp_path / "sh"
  proc = subprocess.run([sys.executable, str(_ROOT / "tools" / "tokenize_data.py"), "--data", str(src),
                         "--tokenizer", "bytes", "--out", str(out)],
                        capture_output=True, text=True, cwd=_ROOT, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith(f"wrote {out}: 1 document, 28 tokens (uint16) in 1 shard, ")
