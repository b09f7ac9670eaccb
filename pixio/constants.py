"""Constants shared by every Pixio job (preprocessing statistics, defaults)."""

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

DEFAULT_IMG_SIZE = 256
DEFAULT_PATCH_SIZE = 16
DEFAULT_N_CLS_TOKENS = 8
