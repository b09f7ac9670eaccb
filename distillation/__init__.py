"""Pixio distillation: one frozen teacher encoder, several student encoders trained in one run.

`python -m distillation.train experiment=distill_demo`; see docs/distillation.md.
"""

import pixio  # noqa: F401  (first: sets OpenMP's wait policy before anything loads torch)
