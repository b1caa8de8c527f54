"""Find a corpus by path, in ``$SPD_EXT_DATA_DIR``, in the cache, or by downloading it."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from spd_ext.errors import MissingFileError, UsageError
from spd_ext.utils.files import atomic_path


@dataclass(frozen=True)
class KnownCorpus:
    filename: str
    url: str


KNOWN_CORPORA = {
    "tinyshakespeare": KnownCorpus(
        "tinyshakespeare.txt",
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"),
}


def cache_dir() -> Path:
    """Where downloads and token caches go (``$SPD_EXT_CACHE_DIR`` or ~/.cache/spd_ext)."""
    return Path(os.environ.get("SPD_EXT_CACHE_DIR") or Path.home() / ".cache" / "spd_ext")


def data_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    dirs = [Path(data_dir)] if data_dir else []
    if os.environ.get("SPD_EXT_DATA_DIR"):
        dirs.append(Path(os.environ["SPD_EXT_DATA_DIR"]))
    return [*dirs, cache_dir() / "data"]


def find_data_file(filename: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    for d in data_dirs(data_dir):
        if (d / filename).is_file():
            return d / filename
    return None


def resolve_corpus(name_or_path: str | os.PathLike, data_dir: str | os.PathLike | None = None,
                   download: bool = True) -> Path:
    """The corpus file: an existing path, or a known name found locally or downloaded.

    Raises FileNotFoundError naming every place looked at and how to fix it.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    known = KNOWN_CORPORA.get(str(name_or_path))
    if known is None:
        raise MissingFileError(f"corpus {str(name_or_path)!r} is neither a file nor a known "
                                f"name ({', '.join(KNOWN_CORPORA)})")
    found = find_data_file(known.filename, data_dir)
    if found is not None:
        return found
    looked = ", ".join(str(d) for d in data_dirs(data_dir))
    if not download:
        raise MissingFileError(f"{known.filename} not found in {looked}; set SPD_EXT_DATA_DIR "
                                "to the folder holding it")
    target = cache_dir() / "data" / known.filename
    try:
        with atomic_path(target) as tmp, urllib.request.urlopen(known.url, timeout=30) as got:
            tmp.write_bytes(got.read())
    except (urllib.error.URLError, OSError) as exc:
        raise MissingFileError(
            f"{known.filename} is not in {looked} and downloading {known.url} failed ({exc}); "
            "when offline, put the file in a folder and set SPD_EXT_DATA_DIR to it") from None
    return target


def read_corpus(path: str | os.PathLike, loader: str = "plain") -> str:
    """The corpus text: read directly, or through Hugging Face ``datasets`` ("text" builder:
    one example per line, cached in the datasets cache) with ``loader="datasets"``."""
    if loader == "plain":
        try:
            return Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"corpus {path} is not UTF-8 text (byte {exc.start}); pass a "
                             "plain-text file") from None
    if loader != "datasets":
        raise UsageError(f"unknown loader {loader!r}; use 'plain' or 'datasets'")
    try:
        import datasets
    except ImportError:
        raise ImportError("loader='datasets' needs Hugging Face datasets: pip install "
                          "'spd_ext[hf]'") from None
    lines = datasets.load_dataset("text", data_files=str(path), split="train",
                                  keep_linebreaks=True)
    return "".join(lines["text"])
