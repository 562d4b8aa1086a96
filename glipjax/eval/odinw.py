"""ODinW (Object Detection in the Wild): zero-shot COCO box AP over several
COCO-format datasets, each prompted with its own class names, and their mean.

A dataset is a COCO-format annotation JSON whose images sit in the JSON's folder
(the ODinW layout). ODINW_35 maps the reference's 35 dataset names to their
validation JSON under the ODinW root (the folder holding AerialMaritimeDrone/,
Aquarium/, ...); ODINW_13 names the 13 of the GLIP paper's table. The prompt is each
dataset's category names in id order (cleaned as every class prompt is), in chunks
when it exceeds the text length.
"""

from __future__ import annotations

import math
import os
import pathlib
from typing import Any, Sequence

from glipjax.eval.datasets import Detector, EvalData, evaluate_coco

_VALID = "valid/annotations_without_background.json"
_EXPORT = "export/val_annotations_without_background.json"
ODINW_35: dict[str, str] = {
    "AerialMaritimeDrone_large": f"AerialMaritimeDrone/large/{_VALID}",
    "AerialMaritimeDrone_tiled": f"AerialMaritimeDrone/tiled/{_VALID}",
    "AmericanSignLanguageLetters": f"AmericanSignLanguageLetters/American Sign Language Letters.v1-v1.coco/{_VALID}",
    "Aquarium": f"Aquarium/Aquarium Combined.v2-raw-1024.coco/{_VALID}",
    "BCCD": f"BCCD/BCCD.v3-raw.coco/{_VALID}",
    "boggleBoards": f"boggleBoards/416x416AutoOrient/{_EXPORT}",
    "brackishUnderwater": f"brackishUnderwater/960x540/{_VALID}",
    "ChessPieces": f"ChessPieces/Chess Pieces.v23-raw.coco/{_VALID}",
    "CottontailRabbits": f"CottontailRabbits/{_VALID}",
    "dice": f"dice/mediumColor/{_EXPORT}",
    "DroneControl": f"DroneControl/Drone Control.v3-raw.coco/{_VALID}",
    "EgoHands_generic": f"EgoHands/generic/{_VALID}",
    "EgoHands_specific": f"EgoHands/specific/{_VALID}",
    "HardHatWorkers": f"HardHatWorkers/raw/{_VALID}",
    "MaskWearing": f"MaskWearing/raw/{_VALID}",
    "MountainDewCommercial": f"MountainDewCommercial/{_VALID}",
    "NorthAmericaMushrooms": f"NorthAmericaMushrooms/North American Mushrooms.v1-416x416.coco/{_VALID}",
    "openPoetryVision": f"openPoetryVision/512x512/{_VALID}",
    "OxfordPets_by-breed": f"OxfordPets/by-breed/{_VALID}",
    "OxfordPets_by-species": f"OxfordPets/by-species/{_VALID}",
    "Packages": f"Packages/Raw/{_VALID}",
    "PascalVOC": f"PascalVOC/{_VALID}",
    "pistols": f"pistols/{_EXPORT}",
    "PKLot": f"PKLot/640/{_VALID}",
    "plantdoc": f"plantdoc/416x416/{_VALID}",
    "pothole": f"pothole/{_VALID}",
    "Raccoon": f"Raccoon/Raccoon.v2-raw.coco/{_VALID}",
    "selfdrivingCar": f"selfdrivingCar/fixedLarge/{_EXPORT}",
    "ShellfishOpenImages": f"ShellfishOpenImages/raw/{_VALID}",
    "ThermalCheetah": f"ThermalCheetah/{_VALID}",
    "thermalDogsAndPeople": f"thermalDogsAndPeople/{_VALID}",
    "UnoCards": f"UnoCards/raw/{_VALID}",
    "VehiclesOpenImages": f"VehiclesOpenImages/416x416/{_VALID}",
    "websiteScreenshots": f"websiteScreenshots/{_VALID}",
    "WildfireSmoke": f"WildfireSmoke/{_VALID}",
}
ODINW_13 = (
    "AerialMaritimeDrone_large", "Aquarium", "CottontailRabbits", "EgoHands_generic", "NorthAmericaMushrooms",
    "Packages", "PascalVOC", "pistols", "pothole", "Raccoon", "ShellfishOpenImages", "thermalDogsAndPeople",
    "VehiclesOpenImages",
)
SUITES: dict[str, tuple[str, ...]] = {"odinw13": ODINW_13, "odinw35": tuple(ODINW_35)}
AVERAGED = ("AP", "AP50", "AP75")


def resolve_datasets(root: str | os.PathLike, entries: Sequence[str]) -> list[tuple[str, pathlib.Path]]:
    """(name, annotation JSON) of each entry: a suite ("odinw13", "odinw35"), a name
    of ODINW_35, or the path of a COCO-format JSON (relative to root, or absolute),
    named by that path. Duplicates are dropped; missing files raise ValueError."""
    if not entries:
        raise ValueError(f"no ODinW datasets given; name a suite {sorted(SUITES)}, datasets of ODINW_35 or JSON files")
    root = pathlib.Path(root) if root else pathlib.Path()
    out: dict[str, pathlib.Path] = {}
    for entry in entries:
        for name in SUITES.get(entry, (entry,)):
            if name in ODINW_35:
                path = root / ODINW_35[name]
            elif name.endswith(".json"):
                path = root / name
            else:
                raise ValueError(f"unknown ODinW dataset {name!r}: not a suite {sorted(SUITES)}, a name of "
                                 f"ODINW_35 or a .json file")
            if not path.is_file():
                raise ValueError(f"ODinW dataset {name!r}: annotation file not found: {path}")
            out.setdefault(name, path)
    return list(out.items())


def evaluate_odinw(detector: Detector, data: EvalData, root: str | os.PathLike, entries: Sequence[str], *,
                   classes_per_chunk: int = 0) -> dict[str, Any]:
    """COCO box AP of every dataset ("datasets": {name: report}), the mean of AVERAGED
    over the datasets (NaN figures, e.g. AP75 of a dataset with no boxes, are left
    out of a mean) and num_datasets."""
    datasets = resolve_datasets(root, entries)
    reports = {name: evaluate_coco(detector, data, path, path.parent, classes_per_chunk=classes_per_chunk,
                                   name=f"odinw/{name}")
               for name, path in datasets}
    out: dict[str, Any] = {"datasets": reports, "num_datasets": len(reports)}
    for key in AVERAGED:
        values = [r[key] for r in reports.values() if not math.isnan(r[key])]
        out[key] = sum(values) / len(values) if values else float("nan")
    return out
