"""cachefit: plan layer-wise deployments whose every card partition fits on-chip memory.

Importing ``cachefit`` imports no torch: the planning core is pure Python + numpy.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
