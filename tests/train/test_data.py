"""Tests for moejax.train.data: tokens, packing, split, grain iterator, errors."""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax.train import data as D


def _windows_LMData(n: int, seq_len: int = 3, n_val: int = 5) -> D.LMData:
    """LMData whose window i is filled with the value i, so rows identify themselves."""
    train = np.repeat(np.arange(n, dtype=np.uint16)[:, None], seq_len + 1, axis=1)
    val = np.repeat(np.arange(1000, 1000 + n_val, dtype=np.uint16)[:, None], seq_len + 1, axis=1)
    return D.LMData(
        train_windows=train,
        val_windows=val,
        train_domains=np.zeros(n, np.int32),
        val_domains=np.arange(n_val, dtype=np.int32) % 2,
        domains=["a", "b"],
    )


def _ids(batch: dict[str, np.ndarray]) -> list[int]:
    return batch["inputs"][:, 0].tolist()


# --------------------------------------------------------------------------- tokens


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_encode_decode_roundtrip(text: str) -> None:
    ids = D.encode(text)
    assert ids.dtype == np.uint16
    assert ids[0] == D.BOS_ID and ids[-1] == D.EOS_ID
    assert ids.size == len(text.encode("utf-8")) + 2
    assert ids[1:-1].max(initial=0) < 256
    assert D.decode(ids) == text
    assert D.decode(list(ids)) == text


def test_decode_invalid_utf8_replaces() -> None:
    assert D.decode([D.BOS_ID, 0xFF, ord("a"), D.EOS_ID]) == "\ufffda"


def test_vocab_constants() -> None:
    assert (D.BOS_ID, D.EOS_ID, D.VOCAB_SIZE) == (256, 257, 258)


def test_bits_per_byte() -> None:
    assert D.bits_per_byte(math.log(2.0)) == pytest.approx(1.0)
    assert D.bits_per_byte(2.0) == pytest.approx(2.0 / math.log(2.0))


# --------------------------------------------------------------------------- packing


def _pack_reference(docs: list[D.Document], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Slow pack: a per-token list of (token, doc) and a loop over windows."""
    domains = sorted({d.domain for d in docs})
    tokens: list[int] = []
    owner: list[int] = []
    for i, doc in enumerate(docs):
        toks = [D.BOS_ID] + list(doc.text.encode("utf-8")) + [D.EOS_ID]
        tokens += toks
        owner += [i] * len(toks)
    windows, dom = [], []
    start = 0
    while start + seq_len + 1 <= len(tokens):
        windows.append(tokens[start : start + seq_len + 1])
        dom.append(domains.index(docs[owner[start]].domain))
        start += seq_len + 1
    return np.array(windows, dtype=np.uint16).reshape(-1, seq_len + 1), np.array(dom, dtype=np.int32)


@settings(max_examples=60, deadline=None)
@given(
    texts=st.lists(st.text(max_size=40), min_size=1, max_size=12),
    domain_ids=st.lists(st.integers(0, 3), min_size=12, max_size=12),
    seq_len=st.integers(1, 17),
)
def test_pack_matches_reference(texts: list[str], domain_ids: list[int], seq_len: int) -> None:
    docs = [D.Document(t, f"dom{domain_ids[i]}") for i, t in enumerate(texts)]
    want_w, want_d = _pack_reference(docs, seq_len)
    if want_w.shape[0] == 0:
        with pytest.raises(ValueError, match="train.seq_len"):
            D.pack(docs, seq_len)
        return
    got_w, got_d = D.pack(docs, seq_len)
    assert got_w.dtype == np.uint16 and got_d.dtype == np.int32
    np.testing.assert_array_equal(got_w, want_w)
    np.testing.assert_array_equal(got_d, want_d)


def test_pack_handwritten_case() -> None:
    docs = [D.Document("ab", "y"), D.Document("c", "x")]  # sorted domains: ["x", "y"]
    # tokens: BOS a b EOS | BOS c EOS -> 7 tokens
    w, d = D.pack(docs, 2)  # windows of 3; window 1 starts on doc 0's EOS
    np.testing.assert_array_equal(w, [[256, 97, 98], [257, 256, 99]])
    np.testing.assert_array_equal(d, [1, 1])
    w, d = D.pack(docs, 1)  # windows of 2; the final EOS is dropped
    np.testing.assert_array_equal(w, [[256, 97], [98, 257], [256, 99]])
    np.testing.assert_array_equal(d, [1, 1, 0])


def test_pack_error_names_seq_len_and_token_count() -> None:
    with pytest.raises(ValueError, match=r"train\.seq_len=10.*\b5 tokens"):
        D.pack([D.Document("abc", "a")], 10)
    with pytest.raises(ValueError, match=r"train\.seq_len"):
        D.pack([D.Document("abc", "a")], 0)


# --------------------------------------------------------------------------- split


def _marker_dir(tmp_path: pathlib.Path, n: int) -> pathlib.Path:
    """n one-document files; file i is character chr(0x21 + i) repeated 100..700 times."""
    rng = np.random.default_rng(0)
    for i in range(n):
        (tmp_path / f"f{i:02d}.txt").write_text(chr(0x21 + i) * int(rng.integers(100, 700)))
    return tmp_path


def test_train_and_val_never_share_a_document(tmp_path: pathlib.Path) -> None:
    d = _marker_dir(tmp_path, 60)
    for seed in range(3):
        data = D.make_data(str(d), seq_len=16, val_fraction=0.2, seed=seed)
        train_bytes = set(np.unique(data.train_windows).tolist()) - {D.BOS_ID, D.EOS_ID}
        val_bytes = set(np.unique(data.val_windows).tolist()) - {D.BOS_ID, D.EOS_ID}
        assert train_bytes and val_bytes
        assert not train_bytes & val_bytes
        assert len(train_bytes | val_bytes) >= 58  # only a dropped tail may miss a doc
        # Domain indices are relative to the shared, sorted domain list.
        assert data.domains == sorted(f"f{i:02d}" for i in range(60))
        for windows, doms in ((data.train_windows, data.train_domains), (data.val_windows, data.val_domains)):
            for w, dom in zip(windows, doms):
                if w[0] < 256:
                    assert w[0] == 0x21 + dom


def test_split_is_deterministic_and_by_seed() -> None:
    docs = [D.Document(f"doc {i}", "x") for i in range(100)]
    tr1, va1 = D.split_documents(docs, 0.1, seed=0)
    tr2, va2 = D.split_documents(docs, 0.1, seed=0)
    _, va3 = D.split_documents(docs, 0.1, seed=1)
    assert (tr1, va1) == (tr2, va2)
    assert va1 != va3
    assert len(va1) == 10 and len(tr1) == 90
    assert sorted(d.text for d in tr1 + va1) == sorted(d.text for d in docs)
    # Corpus order is kept within each side.
    assert [docs.index(d) for d in va1] == sorted(docs.index(d) for d in va1)


def test_split_mask_is_the_split_rule() -> None:
    docs = [D.Document(f"doc {i}", "x") for i in range(37)]
    for seed in range(3):
        is_val = D.split_mask(37, 0.2, seed)
        assert is_val.dtype == bool and is_val.sum() == 7
        train, val = D.split_documents(docs, 0.2, seed)
        assert val == [d for d, v in zip(docs, is_val) if v]
        assert train == [d for d, v in zip(docs, is_val) if not v]


def test_split_keeps_one_document_each_side() -> None:
    docs = [D.Document("a", "x"), D.Document("b", "x"), D.Document("c", "x")]
    for frac in (1e-6, 0.999):
        tr, va = D.split_documents(docs, frac, seed=0)
        assert len(tr) >= 1 and len(va) >= 1


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.1, 1.5, float("nan"), "0.1", None])
def test_split_bad_val_fraction(frac: object) -> None:
    docs = [D.Document("a", "x"), D.Document("b", "x")]
    with pytest.raises(ValueError, match=r"data\.val_fraction"):
        D.split_documents(docs, frac, seed=0)  # type: ignore[arg-type]


def test_split_needs_two_documents() -> None:
    with pytest.raises(ValueError, match=r"data\.val_fraction"):
        D.split_documents([D.Document("a", "x")], 0.5, seed=0)


# --------------------------------------------------------------------------- loading


def test_load_documents_directory(tmp_path: pathlib.Path) -> None:
    (tmp_path / "b.txt").write_text("Para one.\r\nline two.\n\n \n\nPara two ’.\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("only paragraph", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("\n\n  \n", encoding="utf-8")
    big = "\n\n".join(f"paragraph {i} " + "x" * 300 for i in range(40))  # ~12.7 KB
    (tmp_path / "c.txt").write_text(big, encoding="utf-8")

    docs = D.load_documents(str(tmp_path))
    by_domain: dict[str, list[str]] = {}
    for doc in docs:
        by_domain.setdefault(doc.domain, []).append(doc.text)
    assert set(by_domain) == {"a", "b", "c"}
    assert [d.domain for d in docs][0] == "b"  # sorted by path: b.txt, c.txt, sub/a.txt
    assert [d.domain for d in docs][-1] == "a"
    assert by_domain["b"] == ["Para one.\nline two.\n\nPara two ’."]
    assert by_domain["a"] == ["only paragraph"]
    # The big file becomes several blocks of whole paragraphs, in order, nothing lost.
    blocks = by_domain["c"]
    assert len(blocks) >= 2
    assert all(len(b.encode()) >= D.TEXT_BLOCK_BYTES for b in blocks[:-1])
    assert len(blocks[-1].encode()) >= D.TEXT_BLOCK_BYTES // 2  # a shorter tail joins the previous block
    assert "\n\n".join(blocks) == big
    # A single file works too.
    assert D.load_documents(str(tmp_path / "sub" / "a.txt")) == [D.Document("only paragraph", "a")]


def test_load_documents_errors(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match=r"data\.path=.*does not exist.*allowed"):
        D.load_documents(str(tmp_path / "missing"))
    (tmp_path / "x.md").write_text("hi")
    with pytest.raises(ValueError, match=r"data\.path=.*no \.txt or \.jsonl files.*allowed"):
        D.load_documents(str(tmp_path))
    with pytest.raises(ValueError, match=r"data\.path=.*not a \.txt file or a \.jsonl file.*allowed"):
        D.load_documents(str(tmp_path / "x.md"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "latin1.txt").write_bytes("caf\xe9 ol\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"data\.path=.*not valid UTF-8"):
        D.load_documents(str(bad))
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "e.txt").write_text("\n\n")
    with pytest.raises(ValueError, match=r"data\.path=.*no text"):
        D.load_documents(str(blank))


def _jsonl(path: pathlib.Path, lines: list[str]) -> pathlib.Path:
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    return path


def test_load_jsonl(tmp_path: pathlib.Path) -> None:
    f = _jsonl(tmp_path / "news.jsonl", [
        "\ufeff" + json.dumps({"text": "first ’ doc", "id": 1}),
        "",
        "   ",
        json.dumps({"text": "line one\r\n\n\nline two", "source": "wiki"}),
        json.dumps({"text": ""}),  # an empty text is a document too
        json.dumps({"text": "third", "source": "web"}) + "\r",
    ])
    docs = D.load_documents(str(f))
    assert docs == [
        D.Document("first ’ doc", "news"),
        D.Document("line one\r\n\n\nline two", "news"),  # the text exactly as given
        D.Document("", "news"),
        D.Document("third", "news"),
    ]
    by_field = D.load_documents(str(f), domain_field="source")
    assert [d.domain for d in by_field] == ["news", "wiki", "news", "web"]
    # Another text field; records without the domain field fall back to the file stem.
    g = _jsonl(tmp_path / "g.jsonl", [json.dumps({"body": "a", "lang": "en"}), json.dumps({"body": "b"})])
    assert D.load_documents(str(g), text_field="body", domain_field="lang") == [
        D.Document("a", "en"), D.Document("b", "g")]
    assert list(D.iter_documents(str(g), text_field="body")) == D.load_documents(str(g), "body")


def test_load_jsonl_empty_text_domain_is_an_error(tmp_path: pathlib.Path) -> None:
    f = _jsonl(tmp_path / "x.jsonl", [json.dumps({"text": "a", "source": ""})])
    with pytest.raises(ValueError, match=r"data\.domain_field='source'.*x\.jsonl' line 1.*non-empty string"):
        D.load_documents(str(f), domain_field="source")


def test_load_directory_of_txt_and_jsonl(tmp_path: pathlib.Path) -> None:
    (tmp_path / "b.txt").write_text("para b", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    _jsonl(tmp_path / "sub" / "a.jsonl", [json.dumps({"text": "rec 1"}), json.dumps({"text": "rec 2"})])
    _jsonl(tmp_path / "c.JSONL", [json.dumps({"text": "upper"})])
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    (tmp_path / "data.json").write_text("[]", encoding="utf-8")  # .json is not .jsonl
    docs = D.load_documents(str(tmp_path))
    # sorted by path: b.txt, c.JSONL, sub/a.jsonl
    assert docs == [D.Document("para b", "b"), D.Document("upper", "c"),
                    D.Document("rec 1", "a"), D.Document("rec 2", "a")]
    assert list(D.iter_documents(str(tmp_path))) == docs
    data = D.make_data(str(tmp_path), seq_len=3, val_fraction=0.25, seed=0)
    assert data.domains == ["a", "b", "c"]


@pytest.mark.parametrize("line,match", [
    ('{"text": "ok"', r"data\.path=.*bad\.jsonl' line 3 is not valid JSON \(.*column.*"
                      r"allowed: one JSON object per line"),
    ('["text"]', r"data\.path=.*bad\.jsonl' line 3 is a JSON array, not an object; allowed"),
    ('"just a string"', r"line 3 is a JSON string, not an object"),
    ("42", r"line 3 is a JSON number, not an object"),
    ('{"body": "x", "id": 3}', r"data\.text_field='text': .*bad\.jsonl' line 3 \(data\.path=.*\) "
                               r"has no field 'text' \(its fields: 'body', 'id'\); allowed"),
    ('{"text": 7}', r"data\.text_field='text': .*line 3 .*holds a JSON number in 'text'; allowed: a string"),
    ('{"text": null}', r"data\.text_field='text': .*line 3 .*holds a JSON null"),
    ('{"text": {"a": 1}}', r"line 3 .*holds a JSON object"),
    ('{"text": "\\ud800"}', r"data\.text_field='text': .*line 3 .*lone surrogate.*"
                             r"allowed: text that encodes as UTF-8"),
    ('{"text": "x", "dom": 5}', r"data\.domain_field='dom': .*line 3 .*holds 5 in 'dom'; "
                                r"allowed: a non-empty string"),
])
def test_load_jsonl_errors(tmp_path: pathlib.Path, line: str, match: str) -> None:
    f = _jsonl(tmp_path / "bad.jsonl", [json.dumps({"text": "fine"}), "", line, json.dumps({"text": "after"})])
    with pytest.raises(ValueError, match=match):
        D.load_documents(str(f), domain_field="dom")
    stream = D.iter_documents(str(tmp_path), domain_field="dom")
    assert next(stream) == D.Document("fine", "bad")  # streamed: line 1 comes before line 3 is read
    with pytest.raises(ValueError, match=match):
        next(stream)


def test_load_jsonl_bad_utf8_and_blank(tmp_path: pathlib.Path) -> None:
    f = tmp_path / "latin.jsonl"
    f.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"data\.path=.*latin\.jsonl' line 2 is not valid UTF-8.*allowed"):
        D.load_documents(str(f))
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "e.jsonl").write_text("\n  \n\n")
    with pytest.raises(ValueError, match=r"data\.path=.*contains no text.*allowed"):
        D.load_documents(str(blank))
    with pytest.raises(ValueError, match=r"data\.path=.*contains no text"):
        list(D.iter_documents(str(blank)))


@pytest.mark.parametrize("text_field,domain_field,key", [("", "", "text_field"), (3, "", "text_field"),
                                                         ("text", None, "domain_field")])
def test_load_bad_field_names(tmp_path: pathlib.Path, text_field: object, domain_field: object,
                              key: str) -> None:
    f = _jsonl(tmp_path / "a.jsonl", [json.dumps({"text": "a"})])
    with pytest.raises(ValueError, match=rf"data\.{key}=.*not allowed"):
        D.load_documents(str(f), text_field, domain_field)  # type: ignore[arg-type]


def test_make_data_jsonl_text_field_is_part_of_the_cache_key(tmp_path: pathlib.Path) -> None:
    f = _jsonl(tmp_path / "a.jsonl", [json.dumps({"text": "t" * 50, "alt": "a" * 50}) for _ in range(4)])
    t = D.make_data(str(f), 7, 0.25, 0)
    a = D.make_data(str(f), 7, 0.25, 0, text_field="alt")
    assert set(np.unique(t.train_windows).tolist()) == {ord("t"), D.BOS_ID, D.EOS_ID}
    assert set(np.unique(a.train_windows).tolist()) == {ord("a"), D.BOS_ID, D.EOS_ID}


def test_config_text_field() -> None:
    from moejax.config import ConfigError, default_config

    cfg = default_config()
    assert (cfg.data.text_field, cfg.data.domain_field) == ("text", "")
    D.check_config(cfg)
    cfg.data.text_field = ""
    with pytest.raises(ConfigError, match=r"data\.text_field=''"):
        D.check_config(cfg)


def test_kjv_loads() -> None:
    docs = D.load_documents(None)
    assert docs == D.load_documents("")
    assert len(docs) == 1189
    domains = list(dict.fromkeys(d.domain for d in docs))
    assert len(domains) == 66
    assert domains[0] == "Genesis" and domains[-1] == "Revelation"
    assert domains[domains.index("Malachi") + 1] == "Matthew"
    assert docs[0].text.startswith("In the beginning God created the heaven and the earth.\nAnd the earth")
    assert docs[-1].text.endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    assert sum(d.domain == "Psalms" for d in docs) == 150


def test_make_data_kjv() -> None:
    data = D.make_data(None, seq_len=128, val_fraction=0.02, seed=0)
    assert data.train_windows.shape[1] == 129 and data.val_windows.shape[1] == 129
    assert data.train_windows.dtype == np.uint16 and data.train_domains.dtype == np.int32
    assert len(data.domains) == 66 and data.domains == sorted(data.domains)
    assert data.train_windows.shape[0] > 30 * data.val_windows.shape[0] > 0
    assert data.train_domains.shape == data.train_windows.shape[:1]
    assert 0 <= data.val_domains.min() and data.val_domains.max() < 66
    assert D.make_data("", 128, 0.02, 0).train_windows.shape == data.train_windows.shape


def test_make_data_val_too_small(tmp_path: pathlib.Path) -> None:
    for i in range(20):
        (tmp_path / f"{i}.txt").write_text("y" * (100 if i else 5))
    # Every seed gives one short validation document: it cannot fill a 50-token window.
    bad_seed = next(
        s for s in range(100)
        if len(D.split_documents(D.load_documents(str(tmp_path)), 0.01, s)[1][0].text) == 5
    )
    with pytest.raises(ValueError, match=r"data\.val_fraction"):
        D.make_data(str(tmp_path), seq_len=50, val_fraction=0.01, seed=bad_seed)


# --------------------------------------------------------------------------- iteration


def test_train_iterator_batches_and_epochs() -> None:
    data = _windows_LMData(12, seq_len=3)
    it = data.train_iterator(batch_size=4, seed=0)
    batches = [next(it) for _ in range(6)]  # two epochs of 12 windows
    b = batches[0]
    assert set(b) == {"inputs", "targets"}
    assert b["inputs"].shape == (4, 3) and b["inputs"].dtype == np.int32
    assert b["targets"].shape == (4, 3) and b["targets"].dtype == np.int32
    np.testing.assert_array_equal(b["inputs"], b["targets"])  # rows are constant here
    epoch0 = sum((_ids(x) for x in batches[:3]), [])
    epoch1 = sum((_ids(x) for x in batches[3:]), [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert epoch0 != epoch1  # reshuffled
    assert epoch0 != list(range(12))  # shuffled at all


def test_train_iterator_inputs_targets_shift() -> None:
    data = _windows_LMData(4, seq_len=3)
    data.train_windows = np.arange(16, dtype=np.uint16).reshape(4, 4)
    b = next(data.train_iterator(batch_size=4, seed=0))
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    np.testing.assert_array_equal(b["targets"][:, -1] - b["inputs"][:, -1], 1)


def test_train_iterator_determinism() -> None:
    data = _windows_LMData(50)
    a = [_ids(next(it)) for it in [data.train_iterator(8, seed=3)] for _ in range(20)]
    it_b = data.train_iterator(8, seed=3)
    b = [_ids(next(it_b)) for _ in range(20)]
    it_c = data.train_iterator(8, seed=4)
    c = [_ids(next(it_c)) for _ in range(20)]
    assert a == b
    assert a != c


@pytest.mark.parametrize("k,n", [(0, 5), (3, 10), (7, 4)])
def test_train_iterator_state_roundtrip(k: int, n: int) -> None:
    data = _windows_LMData(23)  # 23 windows, batch 5: batches cross epoch boundaries
    it = data.train_iterator(5, seed=1)
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(n)]
    restored = data.train_iterator(5, seed=1)
    next(restored)  # a used iterator must be reset by set_state, too
    restored.set_state(state)
    got = [next(restored) for _ in range(n)]
    for w, g in zip(want, got):
        np.testing.assert_array_equal(w["inputs"], g["inputs"])
        np.testing.assert_array_equal(w["targets"], g["targets"])


def test_train_iterator_shards_disjoint_and_cover() -> None:
    n = 37
    data = _windows_LMData(n)
    per_shard = []
    for shard in range(2):
        it = data.train_iterator(1, seed=0, shard_index=shard, shard_count=2)
        size = (n - shard + 1) // 2  # shard 0: 19, shard 1: 18
        per_shard.append([_ids(next(it))[0] for _ in range(size)])
        assert len(set(per_shard[-1])) == size  # one full epoch of this shard
    assert not set(per_shard[0]) & set(per_shard[1])
    assert sorted(per_shard[0] + per_shard[1]) == list(range(n))


def test_train_iterator_errors() -> None:
    data = _windows_LMData(4)
    with pytest.raises(ValueError, match=r"train\.batch_size"):
        data.train_iterator(0, seed=0)
    with pytest.raises(ValueError, match=r"shard_index"):
        data.train_iterator(2, seed=0, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match=r"shard_count"):
        data.train_iterator(2, seed=0, shard_index=4, shard_count=5)
    with pytest.raises(ValueError, match=r"seed"):
        data.train_iterator(2, seed=-1)


def test_val_batches() -> None:
    data = _windows_LMData(4, n_val=11)
    batches = data.val_batches(batch_size=4, num_batches=2)
    assert len(batches) == 2
    assert set(batches[0]) == {"inputs", "targets", "domain"}
    assert _ids(batches[0]) == [1000, 1001, 1002, 1003] and _ids(batches[1]) == [1004, 1005, 1006, 1007]
    assert batches[0]["domain"].dtype == np.int32 and batches[0]["domain"].tolist() == [0, 1, 0, 1]
    assert batches[0]["inputs"].dtype == np.int32 and batches[0]["inputs"].shape == (4, 3)
    # Fewer windows than asked: as many full batches as fit; same result every call.
    many = data.val_batches(batch_size=4, num_batches=10)
    assert len(many) == 2
    np.testing.assert_array_equal(many[1]["inputs"], data.val_batches(4, 2)[1]["inputs"])
    with pytest.raises(ValueError, match=r"train\.batch_size"):
        data.val_batches(batch_size=12, num_batches=1)
    with pytest.raises(ValueError, match=r"train\.eval_batches"):
        data.val_batches(batch_size=2, num_batches=0)
