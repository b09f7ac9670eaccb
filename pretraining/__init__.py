"""Pixio pre-training job (entry point: `python -m pretraining.train`)."""
