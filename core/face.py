"""Face analysis for InstantID: the face embedding and keypoints of a reference photo, and the keypoint image.

Facts relied on (insightface and InstantID, public):

* ``insightface.app.FaceAnalysis(name="antelopev2", root=R, providers=[...])`` reads its ONNX models from
  ``R/models/antelopev2`` (and tries to download them when that folder is missing, which is never wanted here, so
  the folder is checked first); ``app.prepare(ctx_id=0, det_size=(640, 640))``; ``app.get(image)`` takes an
  ``H x W x 3`` uint8 **BGR** array and returns faces with ``.bbox`` (x1, y1, x2, y2), ``.embedding`` (512 floats,
  the recognition model's raw output: InstantID feeds it unnormalised) and ``.kps`` (5 x 2 pixel coordinates: left
  eye, right eye, nose, left and right mouth corner). InstantID uses the largest face (bbox area).
* The antelopev2 archive unpacks into ``antelopev2/antelopev2/*.onnx`` when extracted "into" a folder of that
  name, which leaves ``models/antelopev2`` without models.
* InstantID's keypoint image (the IdentityNet's condition): on a black image of the reference's size, for each
  limb ``(a, b)`` of ``[(0, 2), (1, 2), (3, 2), (4, 2)]`` a filled ellipse along the limb (centre the truncated
  midpoint, half-axes ``int(length / 2)`` and 4 px, rotated by the truncated limb angle in degrees, as a polygon of
  one point per degree) in the colour of keypoint ``a``; then the whole image times 0.6 (truncated to uint8); then a
  filled circle of radius 10 (the pixels with dx^2 + dy^2 <= 100) at each keypoint (truncated coordinates) in its
  own colour. Colours: red, green,
  blue, yellow, magenta.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .errors import FinetuneError

__all__ = ["face_analysis", "detect_face", "draw_kps", "hint_to_image", "KPS_COLORS", "KPS_LIMBS",
           "FACE_MODEL", "models_folder"]

FACE_MODEL = "antelopev2"
DET_SIZE = (640, 640)
EMBED_DIM = 512
KPS_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
KPS_LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))
STICK_WIDTH = 4
LIMB_DIM = 0.6
KPS_RADIUS = 10

_FIX_INSTALL = ("pip install insightface onnxruntime (into the python that runs ComfyUI; onnxruntime-gpu works "
                "too), then restart")
_APPS: dict[tuple, Any] = {}


def models_folder(root: str | Path) -> Path:
    """Where FaceAnalysis reads the antelopev2 models: ``<root>/models/antelopev2``."""
    return Path(root) / "models" / FACE_MODEL


def _check_models(root: Path, *, node: str | None, input: str | None) -> None:
    folder = models_folder(root)
    if any(folder.glob("*.onnx")):
        return
    if any((folder / FACE_MODEL).glob("*.onnx")):
        raise FinetuneError(f"the {FACE_MODEL} models are one folder too deep ({folder / FACE_MODEL})", node=node,
                            input=input, fix=f"move the .onnx files from {folder / FACE_MODEL} up into {folder}")
    what = "has no .onnx models" if folder.is_dir() else "is missing"
    raise FinetuneError(f"the insightface face models folder {folder} {what}", node=node, input=input,
                        fix=f"download the {FACE_MODEL} face models (antelopev2.zip: 1k3d68.onnx, 2d106det.onnx, "
                        f"genderage.onnx, glintr100.onnx, scrfd_10g_bnkps.onnx) and put the .onnx files in {folder}")


def face_analysis(root: str | Path, *, node: str | None = None, input: str | None = "image"):
    """insightface's antelopev2 ``FaceAnalysis`` (on the CPU), prepared, cached per folder."""
    root = Path(root)
    try:
        from insightface.app import FaceAnalysis  # noqa: PLC0415 - optional dependency
    except ImportError as exc:
        missing = getattr(exc, "name", None) or "insightface"
        raise FinetuneError(f"InstantID needs insightface for face analysis, and '{missing}' cannot be imported "
                            f"({exc})", node=node, input=input, fix=_FIX_INSTALL) from exc
    _check_models(root, node=node, input=input)
    key = (str(root.resolve()), FACE_MODEL, FaceAnalysis)  # the class itself: a reinstalled package is new
    app = _APPS.get(key)
    if app is None:
        try:
            app = FaceAnalysis(name=FACE_MODEL, root=str(root), providers=["CPUExecutionProvider"])
            app.prepare(ctx_id=0, det_size=DET_SIZE)
        except ImportError as exc:  # insightface imports onnxruntime lazily in places
            raise FinetuneError(f"insightface could not load its models: '{getattr(exc, 'name', None) or exc}' "
                                "cannot be imported", node=node, input=input, fix=_FIX_INSTALL) from exc
        except Exception as exc:  # noqa: BLE001 - a damaged or partial model folder
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise FinetuneError(f"insightface could not load the {FACE_MODEL} models from {models_folder(root)} "
                                f"({type(exc).__name__}: {first})", node=node, input=input,
                                fix=f"download the {FACE_MODEL} models again into {models_folder(root)}") from exc
        _APPS[key] = app
    return app


def _bgr(images, *, node: str | None, input: str | None):
    """The first image of a ComfyUI IMAGE batch as an ``H x W x 3`` uint8 BGR array (what insightface reads)."""
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    if not hasattr(images, "shape") or images.dim() != 4 or images.shape[0] < 1:
        raise FinetuneError(f"expected an IMAGE batch [B, H, W, C], got {getattr(images, 'shape', type(images))}",
                            node=node, input=input, fix="connect a Load Image node (or any IMAGE output)")
    if images.shape[-1] != 3:
        raise FinetuneError(f"the image has {images.shape[-1]} channels; face analysis needs RGB", node=node,
                            input=input, fix="load the image as RGB (Load Image gives RGB)")
    rgb = (images[0].detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return np.ascontiguousarray(rgb[:, :, ::-1])


def detect_face(images, app, *, node: str | None = None, input: str | None = "image"):
    """``(embedding [512] float32, kps [5, 2] float32)`` (torch, CPU) of the largest face in the first image of
    ``images`` ([B, H, W, 3], 0..1)."""
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    faces = list(app.get(_bgr(images, node=node, input=input)) or [])
    h, w = int(images.shape[1]), int(images.shape[2])
    if not faces:
        raise FinetuneError(f"no face found in the image ({w}x{h})", node=node, input=input,
                            fix="use a photo in which one face is clearly visible (frontal or three-quarter, not "
                            "tiny: crop closer to the face if it is small in a large photo)")

    def area(face) -> float:
        x1, y1, x2, y2 = (float(v) for v in np.asarray(face.bbox).reshape(-1)[:4])
        return (x2 - x1) * (y2 - y1)

    face = max(faces, key=area)
    embedding = np.asarray(face.embedding, dtype=np.float32).reshape(-1)
    kps = np.asarray(face.kps, dtype=np.float32)
    if embedding.shape != (EMBED_DIM,) or kps.shape != (5, 2):
        raise FinetuneError(f"the face model gave a {embedding.shape[0]}-wide embedding and {kps.shape} keypoints; "
                            f"InstantID needs {FACE_MODEL}'s 512-wide embedding and 5 keypoints", node=node,
                            input=input, fix=f"put the {FACE_MODEL} models (not another insightface pack) in the "
                            "insightface models folder")
    return torch.from_numpy(embedding.copy()), torch.from_numpy(kps.copy())


def _ellipse_polygon(center: tuple[int, int], axes: tuple[int, int], angle: int) -> list[tuple[int, int]]:
    """The outline of a rotated ellipse, one point per degree, rounded to pixels (repeats dropped)."""
    cx, cy = center
    a, b = axes
    r = math.radians(angle)
    cos_r, sin_r = math.cos(r), math.sin(r)
    points: list[tuple[int, int]] = []
    for deg in range(361):
        t = math.radians(deg)
        x, y = a * math.cos(t), b * math.sin(t)
        p = (int(round(cx + x * cos_r - y * sin_r)), int(round(cy + x * sin_r + y * cos_r)))
        if not points or points[-1] != p:
            points.append(p)
    return points


def draw_kps(width: int, height: int, kps):
    """InstantID's keypoint image for ``kps`` (5 x 2 pixels) on a ``width`` x ``height`` canvas, as the
    ``[1, 3, H, W]`` 0..1 float32 hint a ``ControlHint`` takes."""
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from PIL import Image, ImageDraw  # noqa: PLC0415

    pts = np.asarray(kps.detach().cpu() if hasattr(kps, "detach") else kps, dtype=np.float64).reshape(-1, 2)
    if pts.shape[0] != len(KPS_COLORS):
        raise ValueError(f"expected 5 keypoints, got {pts.shape[0]}")
    canvas = Image.new("RGB", (int(width), int(height)))
    draw = ImageDraw.Draw(canvas)
    for a, b in KPS_LIMBS:
        (x0, y0), (x1, y1) = pts[a], pts[b]
        length = math.hypot(x0 - x1, y0 - y1)
        angle = math.degrees(math.atan2(y0 - y1, x0 - x1))
        polygon = _ellipse_polygon((int((x0 + x1) / 2), int((y0 + y1) / 2)), (int(length / 2), STICK_WIDTH),
                                   int(angle))
        if len(polygon) >= 3:
            draw.polygon(polygon, fill=KPS_COLORS[a])
        else:
            draw.point(polygon, fill=KPS_COLORS[a])
    out = (np.asarray(canvas, dtype=np.float64) * LIMB_DIM).astype(np.uint8)
    rows, cols = np.ogrid[:int(height), :int(width)]
    for (x, y), color in zip(pts, KPS_COLORS):  # filled discs: the pixels within the radius of the centre
        x, y = int(x), int(y)
        out[(cols - x) ** 2 + (rows - y) ** 2 <= KPS_RADIUS ** 2] = color
    array = torch.from_numpy(out.astype(np.float32)) / 255.0
    return array.permute(2, 0, 1).unsqueeze(0).contiguous()


def hint_to_image(hint):
    """A ``[1, 3, H, W]`` hint as a ComfyUI IMAGE ``[1, H, W, 3]`` (for a preview output)."""
    return hint.permute(0, 2, 3, 1).contiguous()
