"""Detection with class prompts of any length (no TensorFlow).

A class list becomes the prompt "person. bicycle. car" (glipjax.data.prompts). When
it does not fit the text length it is split into chunks that each fit
(prompts.chunk_classes), one forward pass per chunk, and each image's detections of
all chunks are merged: phrase labels become the classes' ids, and the best
`max_detections` by score are kept (no NMS across chunks, as the reference does for
LVIS). Every chunk is padded to the same number of phrase slots, so one compiled
forward serves them all.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
import transformers

from glipjax.data.prompts import chunk_classes, class_prompt, positive_map
from glipjax.data.tokenizer import NUM_SPECIAL_TOKENS, encode
from glipjax.models.glip import GLIPConfig, detect
from glipjax.models.postprocess import Detections

# model_fn(params, images (B, H, W, 3), input_ids (B, L), attention_mask (B, L)) -> GLIP outputs
ModelFn = Callable[[Any, jax.Array, jax.Array, jax.Array], dict[str, Any]]
# forward(params, images, input_ids, attention_mask, positive_map (P, L), phrase_mask (P,), image_sizes (B, 2))
Forward = Callable[..., Detections]
# Per image: boxes (D, 4) xyxy in input pixels, scores (D,), class ids (D,), best first.
ImageDetections = tuple[np.ndarray, np.ndarray, np.ndarray]


def max_phrases(text_len: int) -> int:
    """The most classes a class prompt of text_len tokens can hold: each class takes at
    least one token plus one for the separator, and [CLS]/[SEP] take two."""
    return (text_len - NUM_SPECIAL_TOKENS + 1) // 2


@dataclasses.dataclass(frozen=True)
class PromptChunk:
    """One encoded chunk of a class prompt, padded to a fixed number of phrases."""

    caption: str
    input_ids: np.ndarray  # (L,) int32
    attention_mask: np.ndarray  # (L,) int32
    positive_map: np.ndarray  # (P, L) float32, rows past the chunk's classes zero
    phrase_mask: np.ndarray  # (P,) bool
    category_ids: np.ndarray  # (P,) int64, the class id of each phrase (0 for padding)


def build_prompt_chunks(
    names: Sequence[str],
    category_ids: Sequence[int],
    tokenizer: transformers.PreTrainedTokenizerBase,
    text_len: int,
    budget: int | None = None,
    num_phrases: int | None = None,
) -> list[PromptChunk]:
    """Splits the class prompt of `names` into chunks that fit `budget` tokens (default
    text_len) and hold at most num_phrases classes (default: as many as the longest
    chunk), each encoded to text_len tokens with its positive map padded to
    num_phrases rows, so every chunk has the same shapes. Chunks keep the order of
    `names` and cover each class once."""
    if not names:
        raise ValueError("the class list is empty")
    if len(names) != len(category_ids):
        raise ValueError(f"{len(names)} names but {len(category_ids)} category ids")
    budget = text_len if budget is None else budget
    if budget > text_len:
        raise ValueError(f"budget ({budget}) cannot exceed text_len ({text_len})")
    if num_phrases is not None and num_phrases < 1:
        raise ValueError(f"num_phrases must be at least 1, got {num_phrases}")
    runs = chunk_classes(names, tokenizer, budget)
    if num_phrases is None:
        num_phrases = max(len(run) for run in runs)
    runs = [run[i : i + num_phrases] for run in runs for i in range(0, len(run), num_phrases)]
    chunks = []
    for indices in runs:
        caption, spans = class_prompt([names[i] for i in indices])
        ids, mask, encoding = encode(tokenizer, caption, text_len)
        pmap, mapped = positive_map(encoding, [[span] for span in spans], text_len)
        full_map = np.zeros((num_phrases, text_len), np.float32)
        full_map[: len(indices)] = pmap
        phrase_mask = np.zeros(num_phrases, bool)
        phrase_mask[: len(indices)] = mapped
        ids_of = np.zeros(num_phrases, np.int64)
        ids_of[: len(indices)] = [category_ids[i] for i in indices]
        chunks.append(PromptChunk(caption, ids, mask, full_map, phrase_mask, ids_of))
    return chunks


@functools.lru_cache(maxsize=8)
def apply_fn(model: nn.Module) -> ModelFn:
    """model.apply as a ModelFn; one function object per (equal) model, so
    make_forward reuses its compiled versions."""
    return lambda params, *inputs: model.apply({"params": params}, *inputs)


@functools.lru_cache(maxsize=8)
def make_forward(model_fn: ModelFn, config_glip: GLIPConfig) -> Forward:
    """The jitted forward pass plus post-processing; cached, so passing the same
    model_fn again reuses its compiled versions."""

    def forward(params, images, input_ids, attention_mask, pmap, phrase_mask, image_sizes):
        outputs = model_fn(params, images, input_ids, attention_mask)
        return detect(config_glip, outputs, pmap, phrase_mask, image_sizes, images.shape[1:3])

    return jax.jit(forward)


def merge_detections(per_chunk: Sequence[ImageDetections], max_detections: int) -> ImageDetections:
    """One image's detections of several chunks: the best max_detections by score
    (ties keep chunk order)."""
    boxes, scores, labels = (np.concatenate(x) for x in zip(*per_chunk))
    order = np.argsort(-scores, kind="stable")[:max_detections]
    return boxes[order], scores[order], labels[order]


def detect_chunked(
    forward: Forward,
    params: Any,
    images: np.ndarray,
    image_sizes: np.ndarray,
    chunks: Sequence[PromptChunk],
    max_detections: int,
) -> list[ImageDetections]:
    """Runs every chunk on the batch and merges per image: (boxes (D, 4) in input
    pixels, scores (D,), category ids (D,)), the best max_detections by score."""
    if not chunks:
        raise ValueError("no prompt chunks")
    batch = images.shape[0]
    parts: list[list[ImageDetections]] = [[] for _ in range(batch)]
    for chunk in chunks:
        ids = np.broadcast_to(chunk.input_ids, (batch, chunk.input_ids.shape[0]))
        mask = np.broadcast_to(chunk.attention_mask, ids.shape)
        dets = jax.device_get(forward(params, images, ids, mask, chunk.positive_map, chunk.phrase_mask, image_sizes))
        boxes, scores, labels, valid = (np.asarray(x) for x in dets)
        for b in range(batch):
            keep = valid[b]
            parts[b].append((boxes[b][keep], scores[b][keep], chunk.category_ids[labels[b][keep] - 1]))
    return [merge_detections(per_chunk, max_detections) for per_chunk in parts]
