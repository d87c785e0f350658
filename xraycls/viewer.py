"""The viewer's own choices: what composes the screen (CAM sizes, zoom, overlays).

``app/streamlit_app.py`` lays out widgets; everything it shows comes from the library: the
bundle (:mod:`xraycls.bundle.summary`), one image's analysis (:mod:`xraycls.inference.analysis`),
display windowing and privacy (:mod:`xraycls.io.display`, :mod:`xraycls.io.privacy`), the
out-of-distribution checks (:mod:`xraycls.io.ood`) and the exports (:mod:`xraycls.inference.report`).
"""

from __future__ import annotations

import numpy as np


def cam_sizes(image_size: int, backbone: str) -> list[int]:
    """CAM input sizes to offer: the model's, and 512/256 px below it (not for ViT, whose
    position embeddings fix its input size)."""
    smaller = [] if backbone.startswith("vit") else [s for s in (512, 256) if s < image_size]
    return [image_size, *smaller]


def default_cam_size(image_size: int, backbone: str, device: str) -> int:
    """The model's input size on a GPU; on a CPU at most 512 px (a 1024-px CAM costs ~4x more
    time and memory than a 512-px one, 9 s and 6 GB for Swin-T on two cores)."""
    sizes = cam_sizes(image_size, backbone)
    return 512 if device != "cuda" and 512 in sizes else image_size


def overlay_image(display: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.4) -> np.ndarray:
    """A heatmap on the original pixel grid (:meth:`CamResult.to_original`) blended over the
    displayed (windowed) image or the same crop of both: HxWx3 uint8."""
    from xraycls.inference.cam import overlay

    return overlay(display, heatmap, alpha=alpha)


def zoom_box(
    shape: tuple[int, int], zoom: float, center: tuple[float, float] = (0.5, 0.5)
) -> tuple[slice, slice]:
    """The region a zoomed view shows: ``1/zoom`` of each side around ``center`` (fractions of
    height and width), kept inside the image. Cropping instead of scaling keeps every shown
    pixel a pixel of the original."""
    h, w = shape
    ch, cw = max(1, round(h / zoom)), max(1, round(w / zoom))
    y0 = min(max(round(center[0] * h - ch / 2), 0), h - ch)
    x0 = min(max(round(center[1] * w - cw / 2), 0), w - cw)
    return slice(y0, y0 + ch), slice(x0, x0 + cw)
