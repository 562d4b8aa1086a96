"""COCO-format detection JSON (COCO, Objects365 in COCO format, LVIS, a user's own
COCO-format dataset) -> the common record schema (glipjax.data.builders.common).

Inputs: `annotations`, the JSON file ({"images", "annotations", "categories"}), and
`images`, the directory the images' file names are relative to. An LVIS image has no
file_name: its file is found from its coco_url as images/<folder>/<name> (for example
images/val2017/000000000139.jpg), else images/<name>. LVIS's extra fields
(not_exhaustive_category_ids, neg_category_ids, synonyms, ...) are not part of the
records; evaluation reads them from the JSON.

Each image gives one record with caption "", its boxes converted from [x, y, w, h] to
"+1" xyxy, category = the class name and score 1. Crowd boxes (iscrowd) are dropped.
Metadata: class_names and category_ids, in category-id order.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any, Callable, Iterator

import numpy as np

from glipjax.data.builders import common


def read_coco_json(path: pathlib.Path) -> tuple[list[Any], list[Any], list[Any]]:
    """The images, annotations and categories lists of a COCO-style JSON file."""
    data = common.read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: a COCO-format file is a JSON object with an 'images' list.")
    annotations, categories = data.get("annotations", []), data.get("categories", [])
    if not isinstance(annotations, list) or not isinstance(categories, list):
        raise ValueError(f"{path}: 'annotations' and 'categories' must be lists.")
    return data["images"], annotations, categories


def read_categories(categories: list[Any], path: pathlib.Path) -> dict[int, str]:
    """{category id: name}, sorted by id."""
    table: dict[int, str] = {}
    for c in categories:
        if (
            not isinstance(c, dict)
            or isinstance(c.get("id"), bool)
            or not isinstance(c.get("id"), int)
            or not isinstance(c.get("name"), str)
        ):
            raise ValueError(f"{path}: every category needs an integer 'id' and a string 'name', got {c!r}.")
        if c["id"] in table:
            raise ValueError(f"{path}: category id {c['id']} appears twice.")
        table[c["id"]] = c["name"]
    return dict(sorted(table.items()))


def group_annotations(images: list[Any], annotations: list[Any], counter: common.DropCounter) -> list[list[dict]]:
    """The annotations of each image (by position in `images`, matched on the first
    image with that id); annotations of no listed image are counted as dropped."""
    position: dict[Any, int] = {}
    for i, image in enumerate(images):
        if isinstance(image, dict) and common.is_id(image.get("id")):
            position.setdefault(image["id"], i)
    groups: list[list[dict]] = [[] for _ in images]
    for ann in annotations:
        if not isinstance(ann, dict):
            counter.drop("boxes", "malformed")
        elif not common.is_id(ann.get("image_id")) or ann["image_id"] not in position:
            counter.drop("boxes", "unknown_image")
        else:
            groups[position[ann["image_id"]]].append(ann)
    return groups


def image_file(image: dict[str, Any], images_dir: pathlib.Path) -> pathlib.Path:
    """The file of a COCO/LVIS image entry: file_name, else the end of coco_url."""
    if "file_name" in image:
        return common.image_path(image["file_name"], images_dir)
    url = image.get("coco_url")
    if not isinstance(url, str) or not url.rstrip("/"):
        raise common.Reject("malformed_record")
    parts = url.rstrip("/").split("/")
    nested = images_dir / parts[-2] / parts[-1] if len(parts) > 1 else None
    return nested if nested is not None and nested.is_file() else images_dir / parts[-1]


def is_crowd(ann: dict[str, Any]) -> bool:
    """Whether an annotation is a crowd region (iscrowd set to anything but 0)."""
    return ann.get("iscrowd", 0) not in (0, False, None)


def iter_images(
    images: list[Any],
    groups: list[list[dict]],
    counter: common.DropCounter,
    build: Callable[[common.DropCounter, Any, list[dict]], dict[str, Any]],
) -> Iterator[dict[str, Any] | None]:
    """build(local_counter, image, annotations) per image entry through
    common.record_or_skip; an entry repeating an earlier image id is skipped."""
    seen: set[Any] = set()
    for image, anns in zip(images, groups):
        key = image.get("id") if isinstance(image, dict) else None
        if common.is_id(key):
            if key in seen:
                counter.drop("records", "duplicate_image_id")
                yield None
                continue
            seen.add(key)
        yield common.record_or_skip(counter, len(anns), functools.partial(build, image=image, anns=anns))


class CocoFormat(common.SourceBuilder):
    """COCO-format detection data (COCO, Objects365, LVIS or a user's own)."""

    name = "coco_format"
    KIND = "coco"

    def _records(self, counter: common.DropCounter, extra: dict[str, Any]) -> Iterator[dict[str, Any] | None]:
        path = self.paths["annotations"]
        images, annotations, categories = read_coco_json(path)
        names = read_categories(categories, path)
        extra.update(class_names=list(names.values()), category_ids=list(names))
        groups = group_annotations(images, annotations, counter)
        yield from iter_images(images, groups, counter, functools.partial(self._record, names=names))

    def _record(
        self, counter: common.DropCounter, image: Any, anns: list[dict], *, names: dict[int, str]
    ) -> dict[str, Any]:
        if not isinstance(image, dict):
            raise common.Reject("malformed_record")
        image_id = common.record_id(image.get("id"))
        checked = self.read_image(image_file(image, self.images_dir))
        common.note_size(counter, checked, image, ("width", "height"))

        def parse(ann: dict[str, Any]) -> tuple[np.ndarray, str, np.ndarray, float]:
            if is_crowd(ann):
                raise common.Reject("iscrowd")
            category = ann.get("category_id")
            if not isinstance(category, int) or isinstance(category, bool) or category not in names:
                raise common.Reject("unknown_category")
            box, clipped = common.clean_box(ann.get("bbox"), "xywh", checked.width, checked.height)
            counter.repaired["clipped"] += int(clipped)
            return box, names[category], np.zeros((0, 2), np.int32), 1.0

        boxes = common.collect_boxes(anns, parse, counter)
        return common.example(checked, image_id, "", boxes, counter)
