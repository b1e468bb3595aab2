"""Compression: how techniques change a unit's footprint (pure core) and, in ``apply``, real tensors.

``cachefit.compress.techniques`` is the memory and quality-risk model the planner uses; it imports
no torch. ``cachefit.compress.apply`` (torch) applies the same techniques to a live model.
``cachefit.compress.quality_profile`` (no torch) reads the measured quality losses that
``cachefit.compress.quality`` (torch) measures per unit and technique.
"""

from cachefit.compress.techniques import (
    CANONICAL_ORDER,
    DEFAULT_MATRIX_ROLES,
    GPT2_CONV1D_PATTERNS,
    TECHNIQUE_KINDS,
    TECHNIQUES,
    CompressionConfig,
    Step,
    Technique,
    compress_unit,
    compression_risk,
    explain_compression,
    resolve_techniques,
)

__all__ = [
    "CANONICAL_ORDER",
    "DEFAULT_MATRIX_ROLES",
    "GPT2_CONV1D_PATTERNS",
    "TECHNIQUES",
    "TECHNIQUE_KINDS",
    "CompressionConfig",
    "Step",
    "Technique",
    "compress_unit",
    "compression_risk",
    "explain_compression",
    "resolve_techniques",
]
