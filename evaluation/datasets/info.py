"""What each evaluation dataset is: task, classes, depth range, split sizes of the reference."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about one benchmark (docs/reproduction.md, Datasets)."""

    name: str
    task: str  # "depth" | "semseg"
    num_classes: int | None = None  # semseg only
    min_depth: float | None = None  # metres, depth only
    max_depth: float | None = None
    expected_sizes: tuple[int, int] = (0, 0)  # (train, val) of the reference's split lists
    class_names: tuple[str, ...] | None = None
    depth_scale: float | None = None  # 16-bit png value per metre
    eigen_crop: bool = False  # NYUv2: rows 45:471, cols 41:601 on train and val
    reduce_zero_label: bool = False  # raw 0 = other / no data -> 255, k -> k - 1


# How a segmentation set's masks are stored (data.label_format; evaluation/datasets/labels.py):
# the release's values, remapped on the fly (raw), or 0..K-1 and 255 (reduced).
LABEL_FORMATS = ("raw", "reduced")

# Rows 45:471 and columns 41:601 of the 480 x 640 NYUv2 frames (top, bottom, left, right).
EIGEN_CROP: tuple[int, int, int, int] = (45, 471, 41, 601)

# objectInfo150 of the ADE20K scene parsing benchmark, in label order 1..150 (ids 0..149 here).
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
    "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step",
    "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)  # fmt: skip

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

# LoveDA raw ids 1..7 (0 = no data), here 0..6.
LOVEDA_CLASSES: tuple[str, ...] = (
    "background", "building", "road", "water", "barren", "forest", "agricultural",
)  # fmt: skip

DATASETS: dict[str, DatasetInfo] = {
    "nyuv2": DatasetInfo(
        "nyuv2", "depth", min_depth=1e-3, max_depth=10.0, expected_sizes=(24231, 654),
        depth_scale=1000.0, eigen_crop=True,
    ),
    "kitti": DatasetInfo(
        "kitti", "depth", min_depth=1e-3, max_depth=80.0, expected_sizes=(23158, 652),
        depth_scale=256.0,
    ),
    "ade20k": DatasetInfo(
        "ade20k", "semseg", num_classes=150, expected_sizes=(20210, 2000),
        class_names=ADE20K_CLASSES, reduce_zero_label=True,
    ),
    # 10,582 with the SBD-augmented list, 1,464 with the plain VOC2012 train list.
    "pascal": DatasetInfo(
        "pascal", "semseg", num_classes=21, expected_sizes=(10582, 1449), class_names=VOC_CLASSES,
    ),
    "loveda": DatasetInfo(
        "loveda", "semseg", num_classes=7, expected_sizes=(2522, 1669),
        class_names=LOVEDA_CLASSES, reduce_zero_label=True,
    ),
}  # fmt: skip

VOC_PLAIN_TRAIN_SIZE = 1464  # ImageSets/Segmentation/train.txt without the SBD images

# Other spellings accepted by `get_info` (configs and the reference use these).
ALIASES: dict[str, str] = {"nyu": "nyuv2", "ade": "ade20k", "voc": "pascal", "pascal_voc": "pascal"}


def get_info(name: str) -> DatasetInfo:
    """The DatasetInfo of `name` (or an alias); a ValueError lists the known names."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[key]
