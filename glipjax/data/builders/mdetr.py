"""MDETR-format grounding JSON (GoldG's final_mixed_train_no_coco.json, Flickr30k
entities' final_flickr_separateGT_*.json, ...) -> the common record schema
(glipjax.data.builders.common).

Inputs: `annotations`, a COCO-style JSON file whose images carry "caption" (and
"dataset_name", "tokens_positive_eval", "sentence_id", "original_img_id", which the
records do not need) and whose annotations carry "bbox" [x, y, w, h] and
"tokens_positive" [[start, end], ...], character spans into the caption; `images`, the
directory of the images' file names.

Each image entry (one caption of one image) gives one record: its caption, its boxes
in the "+1" xyxy convention with category "" and score 1, each with its valid spans. A
box with no valid span is dropped; crowd boxes are dropped; a blank caption skips the
record.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from glipjax.data.builders import coco, common


class MdetrGrounding(common.SourceBuilder):
    """MDETR-format grounding data (GoldG, Flickr30k entities)."""

    name = "mdetr_grounding"
    KIND = "mdetr"

    def _records(self, counter: common.DropCounter, extra: dict[str, Any]) -> Iterator[dict[str, Any] | None]:
        images, annotations, _ = coco.read_coco_json(self.paths["annotations"])
        groups = coco.group_annotations(images, annotations, counter)
        yield from coco.iter_images(images, groups, counter, self._record)

    def _record(self, counter: common.DropCounter, image: Any, anns: list[dict]) -> dict[str, Any]:
        if not isinstance(image, dict):
            raise common.Reject("malformed_record")
        caption = common.clean_caption(image.get("caption"))
        image_id = common.record_id(image.get("id"))
        checked = self.read_image(coco.image_file(image, self.images_dir))
        common.note_size(counter, checked, image, ("width", "height"))

        def parse(ann: dict[str, Any]) -> tuple[np.ndarray, str, np.ndarray, float]:
            if coco.is_crowd(ann):
                raise common.Reject("iscrowd")
            box, clipped = common.clean_box(ann.get("bbox"), "xywh", checked.width, checked.height)
            spans = common.clean_spans(ann.get("tokens_positive"), caption, counter)
            if not len(spans):
                raise common.Reject("no_span")
            counter.repaired["clipped"] += int(clipped)
            return box, "", spans, 1.0

        boxes = common.collect_boxes(anns, parse, counter)
        return common.example(checked, image_id, caption, boxes, counter)
