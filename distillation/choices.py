"""The values of distillation's `loss` keys, in a module that loads no torch: the config check
(`distillation.config`) reads them before anything heavy is imported; `distillation.loss`, which
computes the terms, imports them from here."""

CLS_LOSSES = ("cosine", "l1", "mse", "none")  # loss.cls
PATCH_LOSSES = ("cosine", "l1", "mse")  # loss.patch
FUSIONS = ("avg", "sum")  # loss.fuse
