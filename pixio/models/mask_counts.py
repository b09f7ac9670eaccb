"""How many patch groups a masking draw keeps: the arithmetic of `pixio.models.masking`, without
torch, so that the config checks (pre-training's and distillation's mask ratio) load none."""


def num_kept(n_groups: int, mask_ratio: float) -> int:
    """Groups left visible per sample (the same count for every sample of a batch)."""
    return int(n_groups * (1 - mask_ratio))
