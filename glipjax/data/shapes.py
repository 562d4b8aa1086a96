"""The bundled "shapes" dataset: synthetic images of coloured shapes with detection
boxes and grounded captions, generated locally with numpy and PIL.

Every record is a pure function of (seed, split, index, image_size, max_objects):
its random generator is seeded from (seed, split, index) alone, so records do not
depend on each other or on the order in which they are made.

What a record holds and the rules that make its annotations true:
- 1..max_objects objects, each a distinct colour-shape pair drawn in a random
  z-order over a low-saturation textured background (gradient, stripes, checks or
  smooth noise). Later objects may cover earlier ones, but every object keeps at
  least MIN_VISIBLE_FRACTION of its pixels and MIN_VISIBLE_EXTENT of its longer
  box side visible, and two objects of the same colour never touch (their boxes
  stay SAME_COLOR_GAP pixels apart); placements that break this are resampled.
- Sizes: "small" objects span SIZES["small"] of the image side, "large" ones
  SIZES["large"]; the gap between the ranges keeps the size word true.
- Boxes: absolute pixel xyxy (x0, y0, x1, y1) in pixel-edge coordinates (pixel
  column i covers [i, i + 1)), tight around the object's visible pixels.
- Captions mention every object exactly once. Each mention's phrase is
  "[size ]colour shape"; its character span (start, end) covers that phrase
  (without the article). Relations are stated only between two objects mentioned
  one after the other and only when they hold: "A left of B" means A's box lies
  entirely left of B's box (A.x1 <= B.x0); "above" means A.y1 <= B.y0. Objects are
  listed in the order they are mentioned.
- Splits "train", "validation" and "captions" use only the base colour-shape pairs;
  "novel" images contain at least one of NOVEL_PAIRS, which never occur elsewhere.
  The "captions" split is caption-only: its builder drops the boxes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 205, 30),
    "purple": (135, 55, 185),
    "orange": (245, 130, 20),
}
# Object extent (diameter of the shape's circumscribing circle) as a fraction of the
# image side, per size word.
SIZES: dict[str, tuple[float, float]] = {"small": (0.12, 0.17), "large": (0.30, 0.40)}
LARGE_PROBABILITY = 0.4
NOVEL_PAIRS = (
    ("green", "star"),
    ("red", "triangle"),
    ("blue", "hexagon"),
    ("yellow", "diamond"),
    ("purple", "circle"),
    ("orange", "square"),
)
SPLITS = ("train", "validation", "captions", "novel")
SPLITS_WITH_BOXES = ("train", "validation", "novel")
BACKGROUNDS = ("gradient", "striped", "checkered", "noisy")
RELATIONS = ("left of", "right of", "above", "below")
MIN_VISIBLE_FRACTION = 0.6
MIN_VISIBLE_EXTENT = 0.85
SAME_COLOR_GAP = 2  # pixels between the full boxes of two objects of one colour
MAX_OBJECTS = 6
MIN_IMAGE_SIZE = 64
MAX_INDEX = 10_000_000  # records per split

_SUPERSAMPLE = 4
_PLACEMENT_TRIES = 30
_COLOR_JITTER = 12
_PIXEL_NOISE = 3.0
_RELATION_WORDS = {
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above",),
    "below": ("below", "under"),
}
_LIST_PREFIXES = ("", "", "there is ", "a picture of ", "an image with ")


@dataclasses.dataclass(frozen=True)
class Category:
    """One detection category: a colour-shape pair such as "red circle"."""

    id: int
    name: str
    color: str
    shape: str
    novel: bool


# Fixed id table over all colour x shape pairs (ids start at 1, COCO style).
CATEGORIES: tuple[Category, ...] = tuple(
    Category(
        id=1 + ci * len(SHAPES) + si,
        name=f"{color} {shape}",
        color=color,
        shape=shape,
        novel=(color, shape) in NOVEL_PAIRS,
    )
    for ci, color in enumerate(COLORS)
    for si, shape in enumerate(SHAPES)
)
CATEGORY_BY_NAME: dict[str, Category] = {c.name: c for c in CATEGORIES}
CATEGORY_BY_ID: dict[int, Category] = {c.id: c for c in CATEGORIES}
BASE_CATEGORIES: tuple[Category, ...] = tuple(c for c in CATEGORIES if not c.novel)
NOVEL_CATEGORIES: tuple[Category, ...] = tuple(c for c in CATEGORIES if c.novel)


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One drawn object: its category, size word, visible box and caption span."""

    category: Category
    size: str
    box: tuple[float, float, float, float]
    span: tuple[int, int]
    visible_fraction: float


@dataclasses.dataclass(frozen=True)
class Sample:
    """One generated image with its caption and objects (in order of mention)."""

    image: np.ndarray
    image_id: int
    caption: str
    objects: tuple[ShapeObject, ...]
    background: str


def image_id(split: str, index: int) -> int:
    """A positive id that is unique across splits: (split number + 1) * MAX_INDEX + index."""
    return (SPLITS.index(split) + 1) * MAX_INDEX + index


def relation_holds(box_a: Sequence[float], box_b: Sequence[float], relation: str) -> bool:
    """Whether "A <relation> B" holds for xyxy boxes (strict: no shared pixel row or
    column in the relation's direction)."""
    ax0, ay0, ax1, ay1 = box_a
    bx0, by0, bx1, by1 = box_b
    if relation == "left of":
        return ax1 <= bx0
    if relation == "right of":
        return bx1 <= ax0
    if relation == "above":
        return ay1 <= by0
    if relation == "below":
        return by1 <= ay0
    raise ValueError(f"Unknown relation {relation!r}; choose one of {RELATIONS}.")


def check_params(seed: int, image_size: int, max_objects: int) -> None:
    """Raises ValueError for generator parameters outside their valid ranges."""
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}.")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}.")
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be in [1, {MAX_OBJECTS}], got {max_objects}.")


def generate(
    seed: int, split: str, index: int, *, image_size: int = 128, max_objects: int = MAX_OBJECTS
) -> Sample:
    """Generates record `index` of `split` (deterministic in all arguments)."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {SPLITS}.")
    if not 0 <= index < MAX_INDEX:
        raise ValueError(f"index must be in [0, {MAX_INDEX}), got {index}.")
    check_params(seed, image_size, max_objects)
    rng = np.random.default_rng([seed, SPLITS.index(split), index])

    background, canvas = _background(rng, image_size)
    drawn = _place_objects(rng, _choose_categories(rng, split, max_objects), image_size)
    for obj in drawn:  # drawn is in z-order: later objects cover earlier ones
        color = np.asarray(COLORS[obj.category.color], np.float32)
        color = color + rng.uniform(-_COLOR_JITTER, _COLOR_JITTER, 3).astype(np.float32)
        y0, x0 = obj.offset
        ph, pw = obj.alpha.shape
        region = canvas[y0 : y0 + ph, x0 : x0 + pw]
        a = obj.alpha[..., None]
        region[...] = region * (1.0 - a) + color * a
    canvas += rng.normal(0.0, _PIXEL_NOISE, canvas.shape).astype(np.float32)
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)

    caption, mentions = _caption(rng, drawn, background)
    objects = tuple(
        ShapeObject(
            category=drawn[k].category,
            size=drawn[k].size,
            box=drawn[k].box,
            span=span,
            visible_fraction=drawn[k].visible_fraction,
        )
        for k, span in mentions
    )
    return Sample(image, image_id(split, index), caption, objects, background)


# ---------------------------------------------------------------------------------
# Backgrounds


def _grey_tint(rng: np.random.Generator, level: float) -> np.ndarray:
    """A low-saturation colour: a grey level plus a small per-channel tint."""
    return np.float32(level) + rng.uniform(-10, 10, 3).astype(np.float32)


def _background(rng: np.random.Generator, size: int) -> tuple[str, np.ndarray]:
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    g1 = rng.uniform(45, 210)
    g2 = g1 + rng.choice([-1, 1]) * rng.uniform(35, 70)
    if not 40 <= g2 <= 215:
        g2 = g1 - (g2 - g1)
    c1, c2 = _grey_tint(rng, g1), _grey_tint(rng, g2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    proj = xx * np.cos(theta) + yy * np.sin(theta)
    if kind == "gradient":
        t = (proj - proj.min()) / (proj.max() - proj.min())
    elif kind == "striped":
        period = rng.uniform(6, 16)
        t = ((proj / period) % 1.0 < 0.5).astype(np.float32)
    elif kind == "checkered":
        cell = int(rng.integers(6, 17))
        t = ((xx // cell + yy // cell) % 2).astype(np.float32)
    else:  # noisy: smooth value noise
        cells = int(rng.integers(4, 9))
        coarse = (rng.uniform(0, 255, (cells, cells))).astype(np.uint8)
        smooth = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
        t = np.asarray(smooth, np.float32) / 255.0
    canvas = c1 * (1.0 - t[..., None]) + c2 * t[..., None]
    return kind, canvas.astype(np.float32)


# ---------------------------------------------------------------------------------
# Objects and placement


@dataclasses.dataclass
class _Drawn:
    category: Category
    size: str
    alpha: np.ndarray  # (ph, pw) coverage in [0, 1]
    mask: np.ndarray  # alpha >= 0.5
    full_box: tuple[int, int, int, int]  # tight box of `mask` in patch coordinates
    offset: tuple[int, int] = (0, 0)  # (y, x) of the patch in the image
    z: int = 0
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    visible_fraction: float = 1.0


def _choose_categories(rng: np.random.Generator, split: str, max_objects: int) -> list[Category]:
    """Distinct categories for one image; for "novel" the first one is novel."""
    n = int(rng.integers(1, max_objects + 1))
    if split != "novel":
        picks = rng.choice(len(BASE_CATEGORIES), n, replace=False)
        return [BASE_CATEGORIES[i] for i in picks]
    first = NOVEL_CATEGORIES[rng.integers(len(NOVEL_CATEGORIES))]
    rest = [c for c in CATEGORIES if c is not first]
    picks = rng.choice(len(rest), n - 1, replace=False)
    return [first] + [rest[i] for i in picks]


def _polygon(shape: str, r: float, rot: float) -> list[tuple[float, float]]:
    """Unit polygon of `shape` scaled to circumradius `r`, rotated by `rot`, centred at 0."""
    if shape == "square":
        pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif shape == "diamond":
        pts = [(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a) + 0.25) for a in np.radians([-90, 30, 150])]
    elif shape == "hexagon":
        pts = [(math.cos(a), math.sin(a)) for a in np.radians(np.arange(6) * 60 + 30)]
    elif shape == "star":
        pts = [
            ((1.0 if k % 2 == 0 else 0.45) * math.cos(a), (1.0 if k % 2 == 0 else 0.45) * math.sin(a))
            for k, a in enumerate(np.radians(np.arange(10) * 36 - 90))
        ]
        pts = [(x, y + 0.1) for x, y in pts]
    else:
        raise ValueError(f"Unknown shape {shape!r}.")
    c, s = math.cos(rot), math.sin(rot)
    return [(r * (x * c - y * s), r * (x * s + y * c)) for x, y in pts]


def _render(rng: np.random.Generator, category: Category, size: str, image_size: int) -> _Drawn:
    """Rasterises one object into its own antialiased coverage patch."""
    lo, hi = SIZES[size]
    extent = rng.uniform(lo, hi) * image_size
    side = int(math.ceil(1.2 * extent)) + 2
    ss = _SUPERSAMPLE
    centre = (side / 2 + rng.uniform(-0.5, 0.5)) * ss, (side / 2 + rng.uniform(-0.5, 0.5)) * ss
    r = extent / 2 * ss
    big = Image.new("L", (side * ss, side * ss), 0)
    draw = ImageDraw.Draw(big)
    if category.shape == "circle":
        draw.ellipse([centre[0] - r, centre[1] - r, centre[0] + r, centre[1] + r], fill=255)
    else:
        max_rot = {"hexagon": 30.0, "star": 15.0, "triangle": 15.0}.get(category.shape, 10.0)
        rot = math.radians(rng.uniform(-max_rot, max_rot))
        pts = [(centre[0] + x, centre[1] + y) for x, y in _polygon(category.shape, r, rot)]
        draw.polygon(pts, fill=255)
    alpha = np.asarray(big.resize((side, side), Image.BOX), np.float32) / 255.0
    mask = alpha >= 0.5
    return _Drawn(category, size, alpha, mask, _tight_box(mask))


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _visibility_ok(objs: list[_Drawn], image_size: int) -> bool:
    """Computes visible boxes for `objs` (in place) and checks the visibility rules."""
    owner = np.full((image_size, image_size), -1, np.int16)
    for k, obj in sorted(enumerate(objs), key=lambda t: t[1].z):
        y0, x0 = obj.offset
        ph, pw = obj.mask.shape
        owner[y0 : y0 + ph, x0 : x0 + pw][obj.mask] = k
    for k, obj in enumerate(objs):
        y0, x0 = obj.offset
        ph, pw = obj.mask.shape
        visible = (owner[y0 : y0 + ph, x0 : x0 + pw] == k) & obj.mask
        fraction = float(visible.sum()) / float(obj.mask.sum())
        if fraction < MIN_VISIBLE_FRACTION:
            return False
        bx0, by0, bx1, by1 = _tight_box(visible)
        fx0, fy0, fx1, fy1 = obj.full_box
        if max(bx1 - bx0, by1 - by0) < MIN_VISIBLE_EXTENT * max(fx1 - fx0, fy1 - fy0):
            return False
        obj.box = (float(x0 + bx0), float(y0 + by0), float(x0 + bx1), float(y0 + by1))
        obj.visible_fraction = fraction
    return True


def _try_positions(rng: np.random.Generator, obj: _Drawn, placed: list[_Drawn], image_size: int) -> bool:
    """Tries random positions for `obj` until the visibility rules hold for all."""
    limit = image_size - obj.mask.shape[0]
    same_color = [o for o in placed if o.category.color == obj.category.color]
    for _ in range(_PLACEMENT_TRIES):
        obj.offset = (int(rng.integers(0, limit + 1)), int(rng.integers(0, limit + 1)))
        if any(_boxes_near(_image_box(obj), _image_box(o), SAME_COLOR_GAP) for o in same_color):
            continue
        if _visibility_ok(placed + [obj], image_size):
            return True
    return False


def _image_box(obj: _Drawn) -> tuple[int, int, int, int]:
    """The tight box of the object's full mask in image coordinates."""
    y0, x0 = obj.offset
    bx0, by0, bx1, by1 = obj.full_box
    return x0 + bx0, y0 + by0, x0 + bx1, y0 + by1


def _boxes_near(a: tuple[int, ...], b: tuple[int, ...], gap: int) -> bool:
    """Whether boxes a and b overlap or come closer than `gap` pixels."""
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def _place_objects(rng: np.random.Generator, categories: list[Category], image_size: int) -> list[_Drawn]:
    """Places objects one by one at random positions and z-orders, resampling any
    placement that hides too much of some object; an object that cannot be placed
    large is tried small, then dropped. The first object (the novel one in the
    "novel" split) always fits. Returns the placed objects in z-order."""
    zs = rng.permutation(len(categories))
    placed: list[_Drawn] = []
    for category, z in zip(categories, zs):
        first = "large" if rng.uniform() < LARGE_PROBABILITY else "small"
        for size in dict.fromkeys([first, "small"]):
            obj = _render(rng, category, size, image_size)
            obj.z = int(z)
            if _try_positions(rng, obj, placed, image_size):
                placed.append(obj)
                break
    _visibility_ok(placed, image_size)  # boxes of the final arrangement
    return sorted(placed, key=lambda o: o.z)


# ---------------------------------------------------------------------------------
# Captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class _CaptionWriter:
    """Appends text pieces and records the character span of each object phrase."""

    def __init__(self) -> None:
        self.text = ""
        self.spans: list[tuple[int, tuple[int, int]]] = []

    def add(self, piece: str) -> None:
        self.text += piece

    def add_phrase(self, k: int, phrase: str) -> None:
        self.spans.append((k, (len(self.text), len(self.text) + len(phrase))))
        self.text += phrase


def _caption(
    rng: np.random.Generator, objs: list[_Drawn], background: str
) -> tuple[str, list[tuple[int, tuple[int, int]]]]:
    """A caption that mentions every object once; returns it with (object, span) pairs
    in order of mention."""
    phrases = [
        (f"{o.size} " if rng.uniform() < 0.5 else "") + o.category.name for o in objs
    ]
    order = [int(k) for k in rng.permutation(len(objs))]
    # Chunks: (a,) alone or (a, relation, b) with the relation true of their boxes.
    chunks: list[tuple] = []
    i = 0
    while i < len(order):
        a = order[i]
        if i + 1 < len(order) and rng.uniform() < 0.8:
            b = order[i + 1]
            holding = [r for r in RELATIONS if relation_holds(objs[a].box, objs[b].box, r)]
            if holding:
                chunks.append((a, holding[rng.integers(len(holding))], b))
                i += 2
                continue
        chunks.append((a,))
        i += 1

    w = _CaptionWriter()

    def mention(k: int, definite: bool = False, capital: bool = False) -> None:
        art = "the" if definite else _article(phrases[k])
        w.add((art.capitalize() if capital else art) + " ")
        w.add_phrase(k, phrases[k])

    def relation(r: str) -> str:
        words = _RELATION_WORDS[r]
        return words[rng.integers(len(words))]

    if rng.uniform() < 0.6:  # one list: "there is a red circle left of a blue star and ..."
        prefix = _LIST_PREFIXES[rng.integers(len(_LIST_PREFIXES))]
        w.add(prefix)
        for n, chunk in enumerate(chunks):
            if n > 0:
                w.add(" and " if n == len(chunks) - 1 else ", ")
            mention(chunk[0])
            if len(chunk) == 3:
                w.add(f" {relation(chunk[1])} ")
                mention(chunk[2])
        if rng.uniform() < 0.3:
            w.add(f" on {_article(background)} {background} background")
    else:  # sentences: "The red circle is above the blue star. There is a green square."
        for n, chunk in enumerate(chunks):
            if n > 0:
                w.add(" ")
            if len(chunk) == 3:
                definite = rng.uniform() < 0.5
                mention(chunk[0], definite=definite, capital=True)
                w.add(f" {'is ' if definite else ''}{relation(chunk[1])} ")
                mention(chunk[2], definite=definite)
            elif rng.uniform() < 0.5:
                w.add("There is ")
                mention(chunk[0])
            else:
                mention(chunk[0], capital=True)
            w.add(".")
    return w.text, w.spans
