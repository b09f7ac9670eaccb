"""Pixio distillation: one frozen teacher encoder, several student encoders trained in one run.

`python -m distillation.train experiment=distill_demo`; see docs/distillation.md.
"""
