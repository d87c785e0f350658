"""The viewer's own choices: what composes the screen (CAM sizes, zoom, overlays).

``app/streamlit_app.py`` lays out widgets; everything it shows comes from the library: the
bundle (:mod:`xraycls.bundle.summary`), one image's analysis (:mod:`xraycls.inference.analysis`),
display windowing and privacy (:mod:`xraycls.io.display`, :mod:`xraycls.io.privacy`), the
out-of-distribution checks (:mod:`xraycls.io.ood`) and the exports (:mod:`xraycls.inference.report`).
"""

from __future__ import annotations


def cam_sizes(image_size: int, backbone: str) -> list[int]:
    """CAM input sizes to offer: the model's, and 512/256 px below it (not for ViT, whose
    position embeddings fix its input size)."""
    smaller = [] if backbone.startswith("vit") else [s for s in (512, 256) if s < image_size]
    return [image_size, *smaller]


def default_cam_size(image_size: int) -> int:
    """The model's own input size: the map then explains the prediction that was shown, from
    the same input. A smaller size is offered as an explicit, labelled choice
    (:func:`cam_size_label`): faster, but computed on a scale the model never saw."""
    return image_size


def cam_size_label(cam_size: int, image_size: int) -> str:
    """How a CAM size is named on screen and in exports."""
    if cam_size == image_size:
        return f"{cam_size} px (the model's input: explains the prediction shown)"
    return (
        f"{cam_size} px (REDUCED from the model's {image_size} px: faster, coarser, computed on "
        "a scale the model never saw; an approximation of the explanation)"
    )


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
