"""Text prompts and positive maps: detection data as grounding, the fixed class prompt,
negative captions for grounding data, and box-to-token maps.

Follows the reference (microsoft/GLIP od_to_grounding.py, caption.py,
modulated_coco.py create_positive_map; see glip-reference.md sections 1 to 3).
Character spans are half-open [start, end) offsets into the caption's Python str. A
box's spans are a sequence of [start, end] pairs (list or (k, 2) array). All
randomness comes from the np.random.Generator passed in, so equal seeds give equal
prompts. Plain Python and numpy (no TensorFlow); text may be str or UTF-8 bytes, so
tf.numpy_function can call everything here.
"""

from __future__ import annotations

import re
import weakref
from typing import Sequence

import numpy as np
import transformers

from glipjax.data.tokenizer import MAX_LEN, NUM_SPECIAL_TOKENS, as_text, count_tokens

SEPARATOR = ". "
MAX_NEGATIVES = 85  # RANDOM_SAMPLE_NEG of the pretraining configs
FULL_NEGATIVE_PROB = 0.5  # CONTROL_PROB[2]: probability of the full negative count
MAX_NEGATIVE_CAPTIONS = 20  # PACK_RANDOM_CAPTION_NUMBER
NO_NEGATIVE_CAPTION_PROB = 0.4  # NO_RANDOM_PACK_PROBABILITY
FULL_NEGATIVE_CAPTION_PROB = 0.5  # RANDOM_PACK_PROB
_NORM_EPS = 1e-6  # create_positive_map divides each row by (its sum + 1e-6)

Spans = Sequence[Sequence[int]]  # one box's [start, end] pairs


def clean_name(name: str | bytes) -> str:
    """A class name as prompt text: "(...)" removed (greedily, as the reference does),
    "_" -> " ", runs of spaces collapsed, ends stripped. "bow_(weapon)" -> "bow"."""
    name = re.sub(r"\(.*\)", "", as_text(name)).replace("_", " ")
    return re.sub(r" {2,}", " ", name).strip()


def _clean_names(names: Sequence[str | bytes]) -> list[str]:
    if len(names) == 0:
        raise ValueError("the class list is empty")
    cleaned = [clean_name(n) for n in names]
    empty = [as_text(n) for n, c in zip(names, cleaned) if not c]
    if empty:
        raise ValueError(f"class names with no text after cleaning: {empty[:5]}")
    return cleaned


def class_prompt(names: Sequence[str | bytes], separator: str = SEPARATOR) -> tuple[str, list[tuple[int, int]]]:
    """The fixed full-class prompt "person. bicycle. car" (no trailing separator) and
    each class's (start, end) character span, in the order of `names`."""
    caption, spans = "", []
    for i, name in enumerate(_clean_names(names)):
        if i:
            caption += separator
        spans.append((len(caption), len(caption) + len(name)))
        caption += name
    return caption, spans


class _ClassTable:
    """Cleaned class names and their token counts with and without the separator."""

    def __init__(self, tokenizer: transformers.PreTrainedTokenizerBase, names: Sequence[str], separator: str):
        self.names = _clean_names(names)
        self.with_separator = np.asarray(count_tokens(tokenizer, [n + separator for n in self.names]))
        self.bare = np.asarray(count_tokens(tokenizer, self.names))


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TABLES_PER_TOKENIZER = 16


def _class_table(
    tokenizer: transformers.PreTrainedTokenizerBase, names: Sequence[str | bytes], separator: str
) -> _ClassTable:
    """Memoised per tokenizer: the pipeline calls with the same class list per record."""
    tables = _TABLES.setdefault(tokenizer, {})
    key = (tuple(as_text(n) for n in names), separator)
    table = tables.get(key)
    if table is None:
        if len(tables) >= _TABLES_PER_TOKENIZER:
            tables.clear()
        table = tables[key] = _ClassTable(tokenizer, key[0], separator)
    return table


def chunk_classes(
    names: Sequence[str | bytes],
    tokenizer: transformers.PreTrainedTokenizerBase,
    max_len: int = MAX_LEN,
    separator: str = SEPARATOR,
) -> list[list[int]]:
    """Splits the class list into consecutive runs whose `class_prompt` fits max_len
    tokens with [CLS]/[SEP]; each run is as long as fits. Returns class indices.
    Raises ValueError for a class whose name alone does not fit."""
    table = _class_table(tokenizer, names, separator)
    budget = max_len - NUM_SPECIAL_TOKENS
    chunks: list[list[int]] = []
    current: list[int] = []
    used = 0  # tokens of the current run's names, each followed by the separator
    for i in range(len(table.names)):
        if table.bare[i] > budget:
            raise ValueError(f"class {table.names[i]!r} alone needs {table.bare[i]} tokens, over {budget}")
        if current and used + table.bare[i] > budget:
            chunks.append(current)
            current, used = [], 0
        current.append(i)
        used += table.with_separator[i]
    chunks.append(current)
    return chunks


def detection_to_grounding(
    labels: Sequence[int] | np.ndarray,
    class_names: Sequence[str | bytes],
    rng: np.random.Generator,
    tokenizer: transformers.PreTrainedTokenizerBase,
    max_len: int = MAX_LEN,
    separator: str = SEPARATOR,
    max_negatives: int = MAX_NEGATIVES,
    full_negative_prob: float = FULL_NEGATIVE_PROB,
) -> tuple[str, list[list[list[int]]], np.ndarray]:
    """A detection record's training prompt, as the reference builds it.

    labels: each box's class as an index into class_names. Returns the caption, each
    box's spans ([[start, end]] naming its class; [] for a dropped box) and `keep`, a
    bool mask of the boxes whose class made it into the caption.

    The reference's steps (budget = max_len - 2 tokens, a class costing the tokens of
    "name" + separator):
    1. the image's classes, shuffled, kept while their running cost fits the budget;
       boxes of the classes cut off are dropped (keep False);
    2. a negative count: max_negatives (capped at the number of classes) with
       probability full_negative_prob, otherwise uniform in [1, that cap]; that many
       distinct classes are drawn from the whole list and the image's classes removed
       from them afterwards (so fewer may remain);
    3. negatives kept in turn while the budget left after the positives stays > 0
       (none when the positives overflowed);
    4. positives and negatives shuffled together and joined by the separator, with no
       trailing separator.
    Unlike the reference, "__background__" is never a negative, max_negatives=0 means
    no negatives (the reference still draws one), and the classes cut off in step 1 are
    excluded from the negatives too (the reference leaves no budget for negatives in
    that case anyway).
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a np.random.Generator, got {type(rng).__name__}")
    table = _class_table(tokenizer, class_names, separator)
    num_classes = len(table.names)
    labels = np.asarray(labels, np.int64).reshape(-1)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    budget = max_len - NUM_SPECIAL_TOKENS

    present = np.unique(labels)
    positives: list[int] = []
    used = 0  # includes the class that overflowed, as the reference counts it
    for c in rng.permutation(present):
        used += table.with_separator[c]
        if used > budget:
            break
        positives.append(int(c))
    keep = np.isin(labels, positives)

    full = min(max_negatives, num_classes)
    if full <= 0:
        count = 0
    elif rng.random() < full_negative_prob:
        count = full
    else:
        count = int(rng.integers(1, full + 1))
    sampled = rng.choice(num_classes, size=count, replace=False)
    left = budget - used
    negatives: list[int] = []
    for c in sampled[~np.isin(sampled, present)]:
        left -= table.with_separator[c]
        if left <= 0:
            break
        negatives.append(int(c))

    order = [int(c) for c in rng.permutation(np.asarray(negatives + positives, np.int64))]
    caption, spans = class_prompt([table.names[c] for c in order], separator) if order else ("", [])
    span_of = {c: [list(span)] for c, span in zip(order, spans)}
    box_spans = [span_of[int(c)] if k else [] for c, k in zip(labels, keep)]
    return caption, box_spans, keep


def add_caption_negatives(
    caption: str | bytes,
    spans: Sequence[Spans],
    other_captions: Sequence[str | bytes],
    rng: np.random.Generator,
    tokenizer: transformers.PreTrainedTokenizerBase,
    max_len: int = MAX_LEN,
    no_negative_prob: float = NO_NEGATIVE_CAPTION_PROB,
    max_captions: int = MAX_NEGATIVE_CAPTIONS,
    full_prob: float = FULL_NEGATIVE_CAPTION_PROB,
) -> tuple[str, list[list[list[int]]]]:
    """Packs other captions around a grounding / pseudo-label caption as negatives
    (reference caption.py pack_caption).

    The number of negatives: 0 with probability no_negative_prob, else max_captions
    with probability full_prob, else uniform in [0, max_captions - 1]; they are drawn
    with replacement from the non-empty `other_captions`. A negative is kept (in random
    order) while its token length with [CLS]/[SEP] is below what max_len leaves after
    the caption's own length and the negatives kept before it. The caption and its
    negatives are then shuffled together (the caption's place is random, as in the
    reference) and each gets a "." unless it ends with one, then " ". Returns the new
    caption and `spans` shifted to the caption's place. With no negatives drawn the
    input comes back unchanged.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a np.random.Generator, got {type(rng).__name__}")
    caption = as_text(caption)
    pool = [t for t in (as_text(c).strip() for c in other_captions) if t]
    if rng.random() < no_negative_prob:
        count = 0
    elif rng.random() < full_prob:
        count = max_captions
    else:
        count = int(rng.integers(0, max(max_captions, 1)))
    if count == 0 or not pool:
        return caption, [[[int(s), int(e)] for s, e in box] for box in spans]

    drawn = [pool[i] for i in rng.integers(0, len(pool), size=count)]
    lengths = [n + NUM_SPECIAL_TOKENS for n in count_tokens(tokenizer, [caption] + drawn)]
    left = max_len - lengths[0]
    parts = [caption]
    for i in rng.permutation(count):
        if lengths[1 + i] < left:
            parts.append(drawn[i])
            left -= lengths[1 + i]
    packed, offset = "", 0
    for i in rng.permutation(len(parts)):
        if i == 0:
            offset = len(packed)
        packed += parts[i] + ("" if parts[i].endswith(".") else ".") + " "
    return packed, [[[int(s) + offset, int(e) + offset] for s, e in box] for box in spans]


def _char_to_token(encoding, chars: Sequence[int], max_len: int) -> int | None:
    """The token (below max_len) holding the first of `chars` that is in one; None when
    none is (a negative position counts as a miss and ends the search)."""
    for char in chars:
        if char < 0:
            return None
        token = encoding.char_to_token(char)
        if token is not None and token < max_len:
            return token
    return None


def positive_map(encoding, box_spans: Sequence[Spans], max_len: int = MAX_LEN) -> tuple[np.ndarray, np.ndarray]:
    """Box-to-token map (reference create_positive_map) and which boxes map to a token.

    encoding: the tokenizers.Encoding from tokenizer.encode (or a transformers
    BatchEncoding of one text); anything with char_to_token. Each span [start, end)
    covers tokens first..last, where first is the token at start (retried at start+1,
    start+2 when that character is in no token, e.g. a space) and last the token at
    end-1 (retried at end-2, end-3); a span whose ends stay unmapped, e.g. past the
    truncated text, adds nothing. Rows are divided by (their sum + 1e-6) as in the
    reference, so a mapped row sums to 1 within 1e-6 * n. Returns float32
    [num_boxes, max_len] and bool [num_boxes], False for boxes with an all-zero row.
    """
    pmap = np.zeros((len(box_spans), max_len), np.float32)
    for row, spans in enumerate(box_spans):
        for start, end in np.asarray(spans, np.int64).reshape(-1, 2):
            if start < 0 or end <= start:
                raise ValueError(f"box {row}: span [{start}, {end}) is empty or negative")
            first = _char_to_token(encoding, (start, start + 1, start + 2), max_len)
            last = _char_to_token(encoding, (end - 1, end - 2, end - 3), max_len)
            if first is not None and last is not None:
                pmap[row, first : last + 1] = 1.0
    mapped = pmap.any(axis=1)
    return pmap / (pmap.sum(axis=1, keepdims=True) + np.float32(_NORM_EPS)), mapped


def binarize(pmap: np.ndarray) -> np.ndarray:
    """The 0/1 map the token loss reads: 1 where the positive map is nonzero."""
    return (np.asarray(pmap) > 0).astype(np.float32)
