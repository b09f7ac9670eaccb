"""Pixio pre-training job (entry point: `python -m pretraining.train`)."""

import pixio  # noqa: F401  (first: sets OpenMP's wait policy before anything loads torch)
