"""xraycls: chest X-ray classification, from correct DICOM ingestion to calibrated predictions.

Research software, not a medical device. Heavy dependencies (torch, monai, transformers) are
imported only by the modules that need them, so ``import xraycls`` and the CLI start fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
