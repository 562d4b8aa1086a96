"""Image-caption pairs (a JSONL file of {"image": path, "caption": text}, e.g. the
shapes captions split exported, or CC3M-style pairs) -> the common record schema
(glipjax.data.builders.common), with no boxes.

Inputs: `annotations`, the JSONL file; `images` (optional), the directory the image
paths are relative to, by default the JSONL file's directory. An optional "image_id"
(int or string) names the record; otherwise its id is a stable hash of the image path.
A line that is not JSON, a missing or undecodable image and a blank caption skip the
record.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar, Iterator, Mapping

from glipjax.data.builders import common


class ImageText(common.SourceBuilder):
    """Image-caption pairs without boxes."""

    name = "image_text"
    KIND = "image_text"
    PATHS: ClassVar[Mapping[str, bool]] = {"annotations": True, "images": False}

    def _records(self, counter: common.DropCounter, extra: dict[str, Any]) -> Iterator[dict[str, Any] | None]:
        for raw in common.read_jsonl(self.paths["annotations"]):
            yield common.record_or_skip(counter, 0, functools.partial(self._record, raw=raw))

    def _record(self, counter: common.DropCounter, raw: Any) -> dict[str, Any]:
        if isinstance(raw, common.Reject):
            raise raw
        if not isinstance(raw, dict):
            raise common.Reject("malformed_record")
        caption = common.clean_caption(raw.get("caption"))
        name = raw.get("image")
        checked = self.read_image(common.image_path(name, self.images_dir))
        image_id = common.record_id(raw.get("image_id", name))
        return common.example(checked, image_id, caption, [], counter, boxed=False)
