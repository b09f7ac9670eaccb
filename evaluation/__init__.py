"""Frozen-encoder evaluation: depth and segmentation heads (linear, DPT), sliding-window
inference, metrics, and k-NN classification (docs/evaluation.md, docs/reproduction.md).

Apps: `python -m evaluation.knn` (k-NN), and the depth / segmentation apps beside it.
Importing the package stays light: the building blocks are imported from their modules.
"""

import pixio  # noqa: F401  (first: sets OpenMP's wait policy before anything loads torch)
