"""spd_ext.data: corpus resolution, tokenizers, token caches, deterministic batches."""

from __future__ import annotations

import os

import pytest
import torch

from spd_ext.data import CharTokenizer, GPT2Tokenizer, TokenDataset, get_tokenizer, resolve_corpus
from spd_ext.data.corpus import KNOWN_CORPORA

needs_shared_data = pytest.mark.skipif(
    not os.environ.get("SPD_EXT_DATA_DIR"), reason="SPD_EXT_DATA_DIR (../shared/data) not set")


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty cache and no network: downloads must fail with a helpful message."""
    monkeypatch.setenv("SPD_EXT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SPD_EXT_DATA_DIR", raising=False)
    monkeypatch.setitem(KNOWN_CORPORA, "tinyshakespeare",
                        KNOWN_CORPORA["tinyshakespeare"].__class__(
                            "tinyshakespeare.txt", "http://127.0.0.1:9/unreachable.txt"))
    return tmp_path


def test_missing_corpus_explains_the_fix(offline_cache) -> None:
    with pytest.raises(FileNotFoundError, match="set SPD_EXT_DATA_DIR"):
        resolve_corpus("tinyshakespeare")
    with pytest.raises(FileNotFoundError, match="neither a file nor a known name"):
        resolve_corpus("no/such/file.txt")
    assert not list((offline_cache / "cache").rglob("*.part*"))  # no partial download left


def test_corpus_by_path_and_data_dir(tmp_path, monkeypatch) -> None:
    text = tmp_path / "tiny.txt"
    text.write_text("hello world\n" * 50)
    assert resolve_corpus(text) == text
    (tmp_path / "tinyshakespeare.txt").write_text("to be or not to be\n" * 40)
    monkeypatch.setenv("SPD_EXT_DATA_DIR", str(tmp_path))
    assert resolve_corpus("tinyshakespeare") == tmp_path / "tinyshakespeare.txt"


def test_char_tokenizer_round_trip_and_unknown_characters() -> None:
    tok = CharTokenizer.from_text("banana bread")
    assert tok.vocab_size == len(set("banana bread"))
    assert tok.decode(tok.encode("bread nab")) == "bread nab"
    with pytest.raises(ValueError, match="'z' is not in"):
        tok.encode("zebra")
    assert get_tokenizer("char", state=tok.state()).encode("ab") == tok.encode("ab")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("sentencepiece")


@needs_shared_data
def test_gpt2_tokenizer_loads_offline_from_the_rank_file() -> None:
    pytest.importorskip("tiktoken")
    tok = GPT2Tokenizer()
    ids = tok.encode("Hello world, to be or not to be.")
    assert ids[:2] == [15496, 995]  # GPT-2's ids for "Hello" and " world"
    assert tok.decode(ids) == "Hello world, to be or not to be."


def test_dataset_cache_split_and_deterministic_batches(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SPD_EXT_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(chr(97 + (i * 7) % 26) for i in range(5000)))
    data = TokenDataset(corpus, "char", val_fraction=0.2)
    assert len(data.split("val")) == 1000 and len(data.split("train")) == 4000
    assert data.cache_path.is_file()
    again = TokenDataset(corpus, "char", val_fraction=0.2)  # served from the cache
    assert again.cache_path == data.cache_path
    sample = data.sampler(4, 16, seed=3)
    x, y = sample("train", 5)
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(sample("train", 5)[0], x)  # same (seed, step), same batch
    assert not torch.equal(sample("train", 6)[0], x)
    assert not torch.equal(data.sampler(4, 16, seed=4)("train", 5)[0], x)
    with pytest.raises(ValueError, match="unknown split"):
        data.split("test")
    with pytest.raises(ValueError, match="too few"):
        data.batch("val", 2, 2000, torch.Generator())
    with pytest.raises(ValueError, match="val_fraction"):
        TokenDataset(corpus, "char", val_fraction=1.5)


def test_hugging_face_datasets_loader_reads_the_same_text(tmp_path, monkeypatch) -> None:
    pytest.importorskip("datasets")
    monkeypatch.setenv("SPD_EXT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("First line.\n\nThird line, after a blank one.\nlast without newline")
    plain = TokenDataset(corpus, "char", val_fraction=0.2)
    via_hf = TokenDataset(corpus, "char", val_fraction=0.2, loader="datasets")
    assert via_hf.cache_path == plain.cache_path  # same text, same tokens
    assert (via_hf.split("train") == plain.split("train")).all()
    with pytest.raises(ValueError, match="unknown loader"):
        TokenDataset(corpus, "char", loader="arrow")
