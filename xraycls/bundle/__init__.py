"""The run bundle: its on-disk format (one typed reader), calibration fitting, model card and
summary. Below both training (which writes bundles) and inference (which serves them)."""

from xraycls.bundle.format import Bundle, BundleError, OutOfFold, find_bundles, read_oof

__all__ = ["Bundle", "BundleError", "OutOfFold", "find_bundles", "read_oof"]
