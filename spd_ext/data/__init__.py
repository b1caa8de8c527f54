"""Text corpora, tokenizers, token datasets and data-parallel (non-IID) sharding."""

from spd_ext.data.corpus import resolve_corpus
from spd_ext.data.dataset import TokenDataset
from spd_ext.data.sharding import CORRUPTIONS, SHARDINGS, Corruption, ShardedSampler
from spd_ext.data.tokenizers import CharTokenizer, GPT2Tokenizer, Tokenizer, get_tokenizer

__all__ = ["CORRUPTIONS", "SHARDINGS", "CharTokenizer", "Corruption", "GPT2Tokenizer",
           "ShardedSampler", "TokenDataset", "Tokenizer", "get_tokenizer", "resolve_corpus"]
