"""Tokenizers: characters of a corpus, or GPT-2 BPE through tiktoken (offline-capable)."""

from __future__ import annotations

import hashlib
import os
from typing import Protocol

from spd_ext.data.corpus import find_data_file
from spd_ext.errors import MissingFileError, UsageError

GPT2_RANKS_FILE = "gpt2.tiktoken"


class Tokenizer(Protocol):
    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def state(self) -> dict: ...


class CharTokenizer:
    """One token per distinct character of the corpus it was built from (sorted)."""

    name = "char"

    def __init__(self, chars: str) -> None:
        self.chars = "".join(sorted(set(chars)))
        self.vocab_size = len(self.chars)
        self._index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(text)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._index[c] for c in text]
        except KeyError as exc:
            raise UsageError(f"character {exc.args[0]!r} is not in this tokenizer's vocabulary "
                             f"of {self.vocab_size} characters") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def state(self) -> dict:
        return {"name": self.name, "chars": self.chars}


class GPT2Tokenizer:
    """GPT-2 BPE via tiktoken; loads the ranks from ``gpt2.tiktoken`` when it cannot download."""

    name = "gpt2"
    vocab_size = 50257
    eot = 50256

    def __init__(self, data_dir: str | os.PathLike | None = None) -> None:
        try:
            import tiktoken
        except ImportError:
            raise ImportError("the GPT-2 tokenizer needs tiktoken: pip install 'spd_ext[hf]'") \
                from None
        local = find_data_file(GPT2_RANKS_FILE, data_dir)
        if local is not None:
            from tiktoken.load import load_tiktoken_bpe
            from tiktoken_ext.openai_public import r50k_pat_str

            self._enc = tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str,
                                          mergeable_ranks=load_tiktoken_bpe(str(local)),
                                          special_tokens={"<|endoftext|>": self.eot})
        else:
            try:
                self._enc = tiktoken.get_encoding("gpt2")
            except Exception as exc:  # tiktoken raises several kinds when offline
                raise MissingFileError(
                    f"tiktoken could not download the GPT-2 encoding ({exc}); put "
                    f"{GPT2_RANKS_FILE} in a folder and set SPD_EXT_DATA_DIR to it") from None

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids)

    def state(self) -> dict:
        return {"name": self.name}


def tokenizer_identity(tokenizer: Tokenizer) -> str:
    """What a model's token ids mean, in one string: equal for two tokenizers exactly when
    they map text to the same ids (a char tokenizer built from another corpus differs)."""
    state = tokenizer.state()
    if "chars" not in state:
        return str(state["name"])
    digest = hashlib.sha256(state["chars"].encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{state['name']} ({tokenizer.vocab_size} characters, {digest})"


def get_tokenizer(name: str, text: str | None = None,
                  state: dict | None = None) -> CharTokenizer | GPT2Tokenizer:
    """``char`` (needs the corpus ``text`` or a saved ``state``) or ``gpt2``."""
    if name == "char":
        if state is not None:
            return CharTokenizer(state["chars"])
        if text is None:
            raise UsageError("the char tokenizer is built from a corpus: pass its text")
        return CharTokenizer.from_text(text)
    if name == "gpt2":
        return GPT2Tokenizer()
    raise UsageError(f"unknown tokenizer {name!r}; use 'char' or 'gpt2'")
