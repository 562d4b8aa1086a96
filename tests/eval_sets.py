"""Tiny evaluation sets in the real file formats, written from the shapes generator:
COCO-format detection, LVIS (federated fields, images found through coco_url) and
MDETR grounding (one record per caption, boxes with character spans)."""

from __future__ import annotations

import json
import pathlib

from PIL import Image

from glipjax.data import shapes


def _samples(seed: int, count: int, image_size: int) -> list[shapes.Sample]:
    return [shapes.generate(seed, "validation", i, image_size=image_size, max_objects=3) for i in range(count)]


def _xywh(box: tuple[float, float, float, float]) -> list[float]:
    x0, y0, x1, y1 = box  # pixel edges
    return [x0, y0, x1 - x0, y1 - y0]


def write_coco_set(folder: pathlib.Path, seed: int, count: int, image_size: int = 64) -> pathlib.Path:
    """`count` PNG images and annotations.json (every category that appears, listed
    out of id order) in `folder`; image ids are 100 * seed + index. Returns the JSON."""
    folder.mkdir(parents=True)
    images, annotations, used = [], [], set()
    for i, sample in enumerate(_samples(seed, count, image_size)):
        Image.fromarray(sample.image).save(folder / f"{i}.png")
        images.append({"id": 100 * seed + i, "file_name": f"{i}.png", "width": image_size, "height": image_size})
        for obj in sample.objects:
            box = _xywh(obj.box)
            annotations.append({"id": len(annotations) + 1, "image_id": 100 * seed + i, "category_id": obj.category.id,
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
            used.add(obj.category)
    categories = [{"id": c.id, "name": c.name} for c in sorted(used, key=lambda c: -c.id)]
    path = folder / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def write_lvis_set(folder: pathlib.Path, seed: int, count: int, image_size: int = 64) -> pathlib.Path:
    """An LVIS-format set: images under folder/images/val2017 named by coco_url, the
    colour-shape categories with frequencies r/c/f by id, and two absent categories
    per image listed as negatives. Returns the JSON."""
    (folder / "images" / "val2017").mkdir(parents=True)
    images, annotations = [], []
    for i, sample in enumerate(_samples(seed, count, image_size)):
        Image.fromarray(sample.image).save(folder / "images" / "val2017" / f"{i}.png")
        present = {o.category.id for o in sample.objects}
        images.append({"id": i + 1, "coco_url": f"http://images.example/val2017/{i}.png", "width": image_size,
                       "height": image_size, "not_exhaustive_category_ids": [],
                       "neg_category_ids": [c.id for c in shapes.CATEGORIES if c.id not in present][:2]})
        for obj in sample.objects:
            box = _xywh(obj.box)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": obj.category.id,
                                "bbox": box, "area": box[2] * box[3]})
    categories = [{"id": c.id, "name": c.name.replace(" ", "_"), "frequency": "rcf"[c.id % 3]}
                  for c in shapes.CATEGORIES]
    path = folder / "lvis_val.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def write_mdetr_set(folder: pathlib.Path, seed: int, count: int, image_size: int = 64) -> pathlib.Path:
    """An MDETR-format grounding set: each image with its caption, each object a box
    bound to its mention's character span. Returns the JSON."""
    folder.mkdir(parents=True)
    images, annotations = [], []
    for i, sample in enumerate(_samples(seed, count, image_size)):
        Image.fromarray(sample.image).save(folder / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": image_size, "height": image_size,
                       "caption": sample.caption, "dataset_name": "flickr",
                       "tokens_positive_eval": [[list(o.span)] for o in sample.objects]})
        for obj in sample.objects:
            box = _xywh(obj.box)
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": 1, "bbox": box,
                                "area": box[2] * box[3], "iscrowd": 0, "tokens_positive": [list(obj.span)]})
    path = folder / "final_flickr_separateGT_val.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "object"}]}))
    return path
