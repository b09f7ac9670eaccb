"""Loaded by pytest before the test modules: `pixio` is imported before anything loads torch,
so OpenMP's threads in the test processes (each pytest-xdist worker too) wait passively, as in
every Pixio entry point (pixio.runtime.threads). Spinning threads of two workers on two cores
would hold the cores each other needs."""

import pixio  # noqa: F401
