"""Detection with class prompts of any length (no TensorFlow).

A class list becomes the prompt "person. bicycle. car" (glipjax.data.prompts). When
it does not fit the text length it is split into chunks that each fit
(prompts.chunk_classes). A batch of images is encoded once and each chunk's text once
(not once per image); the head runs per chunk, and each image's detections of all
chunks are merged: phrase labels become the classes' ids, and the best
`max_detections` by score are kept (no NMS across chunks, as the reference does for
LVIS). Every chunk is padded to the same number of phrase slots, so one compiled
forward serves them all.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import transformers

from glipjax.data.prompts import chunk_classes, class_prompt, positive_map
from glipjax.data.tokenizer import NUM_SPECIAL_TOKENS, encode
from glipjax.models.glip import GLIP, GLIPConfig, detect
from glipjax.models.postprocess import Detections

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


# forward(params, images (B, H, W, 3), image_sizes (B, 2), chunks) -> per chunk, the
# batch's Detections as numpy arrays
Forward = Callable[[Any, np.ndarray, np.ndarray, Sequence[PromptChunk]], list[Detections]]


@dataclasses.dataclass(frozen=True)
class SplitForward:
    """A Forward from three jitted parts of the model (one device): the images are
    encoded once and each chunk's text once, for the whole batch; the head runs per
    chunk."""

    images: Callable[..., list[jax.Array]]  # (params, images) -> FPN pyramid
    text: Callable[..., jax.Array]  # (params, input_ids (1, L), attention_mask (1, L)) -> (1, L, D)
    # (params, pyramid, text, attention_mask (1, L), positive_map (P, L), phrase_mask (P,),
    #  image_sizes (B, 2), padded_hw) -> Detections
    detect: Callable[..., Detections]

    def __call__(self, params: Any, images: np.ndarray, image_sizes: np.ndarray,
                 chunks: Sequence[PromptChunk]) -> list[Detections]:
        pyramid = self.images(params, images)
        out = []
        for chunk in chunks:
            mask = chunk.attention_mask[None]
            text = self.text(params, chunk.input_ids[None], mask)
            dets = self.detect(params, pyramid, text, mask, chunk.positive_map, chunk.phrase_mask, image_sizes,
                               padded_hw=tuple(images.shape[1:3]))
            out.append(Detections(*(np.asarray(x) for x in jax.device_get(dets))))
        return out


@functools.lru_cache(maxsize=8)
def make_forward(model: GLIP, config: GLIPConfig | None = None) -> SplitForward:
    """The Forward of `model`, post-processing as `config` says (default: the model's
    own config); cached, so the same (or an equal) model reuses its compiled parts."""
    config = config or model.config

    def images(params, images):
        return model.apply({"params": params}, images, method=GLIP.encode_images)[1]

    def text(params, input_ids, attention_mask):
        return model.apply({"params": params}, input_ids, attention_mask, method=GLIP.encode_text)

    def detect_(params, pyramid, text, attention_mask, pmap, phrase_mask, image_sizes, padded_hw):
        batch = pyramid[0].shape[0]
        text = jnp.broadcast_to(text, (batch,) + text.shape[1:])
        mask = jnp.broadcast_to(attention_mask, (batch, attention_mask.shape[1]))
        outputs = model.apply({"params": params}, pyramid, text, mask, method=GLIP.fuse)
        return detect(config, outputs, pmap, phrase_mask, image_sizes, padded_hw)

    return SplitForward(jax.jit(images), jax.jit(text), jax.jit(detect_, static_argnames="padded_hw"))


def whole_forward(call: Callable[..., Any]) -> Forward:
    """A Forward from a function of the whole model, call(params, images, input_ids
    (B, L), attention_mask (B, L), positive_map, phrase_mask, image_sizes) -> (boxes,
    scores, labels, valid), such as a jax.export one: every chunk's text is repeated
    for each image."""

    def forward(params: Any, images: np.ndarray, image_sizes: np.ndarray,
                chunks: Sequence[PromptChunk]) -> list[Detections]:
        batch = images.shape[0]
        out = []
        for chunk in chunks:
            ids = np.broadcast_to(chunk.input_ids, (batch, chunk.input_ids.shape[0]))
            mask = np.broadcast_to(chunk.attention_mask, ids.shape)
            dets = call(params, images, ids, mask, chunk.positive_map, chunk.phrase_mask, image_sizes)
            out.append(Detections(*(np.asarray(x) for x in jax.device_get(dets))))
        return out

    return forward


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
    for chunk, dets in zip(chunks, forward(params, images, image_sizes, chunks)):
        for b in range(batch):
            keep = dets.valid[b]
            parts[b].append((dets.boxes[b][keep], dets.scores[b][keep], chunk.category_ids[dets.labels[b][keep] - 1]))
    return [merge_detections(per_chunk, max_detections) for per_chunk in parts]
