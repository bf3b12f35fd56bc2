"""The shapes world: 64x64 images of a coloured shape on a plain background, captioned in words.

Everything here is deterministic (numpy + PIL, no global random state): ``render(spec, seed)`` gives the same
pixels for the same arguments on every machine.

Composition
-----------
* :data:`SHAPES` (7): :data:`SEEN_SHAPES` circle, square, triangle, star, cross, which the base model learns, and
  :data:`UNSEEN_SHAPES` heart, moon (a crescent), which it never sees (subjects for DreamBooth). Every outline
  stays unambiguous at 64 px under the small rotations used (at most 15 degrees, so a square never becomes a
  diamond nor a cross an "x").
* :data:`COLORS` (8): :data:`SEEN_COLORS` red, green, blue, yellow, purple, orange, which the base model learns,
  and :data:`UNSEEN_COLORS` teal, pink, which it never sees (for Textual Inversion).
* :data:`BACKGROUNDS` (4): white, black, gray, blue (blue is the same RGB as the shape colour blue).
* :data:`FILLS` (3): solid; striped (diagonal stripes in a darker shade of the colour) and dotted (a grid of dark
  dots): :data:`STYLE_FILLS`, which the base model never sees (styles for LoRA).
* :data:`FORBIDDEN` (colour, background) pairs that would make an image ambiguous: blue on blue, and purple on
  blue (only ~32 CIELAB units apart). Every allowed pair is at least 35 units apart, and every dark shade at
  least 20 units from every background, so a shape always stands out.

That is 7 x 8 x 4 x 3 = 672 combinations, minus 7 x 2 x 3 = 42 forbidden: :func:`all_specs` has 630.

Held out of the base model (:data:`HELD_OUT`, :func:`is_held_out`)
-------------------------------------------------------------------
Each pattern has a ``kind``; the benchmark picks its concepts by kind (:func:`concepts`), not by hand.

* kind ``"subject"``: the DreamBooth subjects ("a sks shape"), on every background and in every fill: the green
  star (a seen shape in a seen colour, never together) and the red heart and yellow moon (shapes never seen);
* kind ``"shape"``: heart and moon in every colour, so the subjects are truly new to the base;
* kind ``"colour"``: teal and pink, everything: unseen colours for Textual Inversion;
* kind ``"fill"``: striped and dotted, everything: styles for LoRA;
* kind ``"composition"``: :data:`COMPOSITIONAL_PROBES`, five (shape, colour, background) combinations whose parts
  are each seen, never together: the base model's compositional probe.

:func:`training_specs` is everything else: 6 colours x 5 shapes x 4 backgrounds, solid, minus the 10 forbidden,
minus 4 green stars, minus 5 probes = 101 specs. :func:`held_out_specs` has the other 529.

Captions: "a red circle on a white background", "an orange square on a gray background",
"a striped green star on a black background" (the fill word only when not solid). :func:`vocabulary` lists
every caption word (20 content + 4 function words = 24), small enough for ``core.tokenizer.build_vocab``.

Seeds: :func:`example_seed` derives a 64-bit seed from (spec, index, split); the splits ``"train"`` (base model),
``"judge"`` (judge training) and ``"test"`` (evaluation) never share a seed in practice.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "SHAPES", "SEEN_SHAPES", "UNSEEN_SHAPES",
    "SEEN_COLORS", "UNSEEN_COLORS", "COLORS", "BACKGROUNDS", "FILLS", "STYLE_FILLS", "PALETTE",
    "BACKGROUND_RGB", "SHADE", "FORBIDDEN", "HeldOut", "HELD_OUT", "COMPOSITIONAL_PROBES", "concepts",
    "Spec", "render", "render_array", "render_batch", "all_specs", "training_specs", "held_out_specs",
    "is_held_out", "held_out_reasons", "vocabulary", "example_seed", "examples", "rgb_to_lab", "shade_rgb",
]

SEEN_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
#: Shapes the base model never sees: DreamBooth subjects.
UNSEEN_SHAPES: tuple[str, ...] = ("heart", "moon")
SHAPES: tuple[str, ...] = SEEN_SHAPES + UNSEEN_SHAPES
SEEN_COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
#: Colours the base model never sees: reserved for Textual Inversion.
UNSEEN_COLORS: tuple[str, ...] = ("teal", "pink")
COLORS: tuple[str, ...] = SEEN_COLORS + UNSEEN_COLORS
BACKGROUNDS: tuple[str, ...] = ("white", "black", "gray", "blue")
FILLS: tuple[str, ...] = ("solid", "striped", "dotted")
#: Fills the base model never sees: styles for LoRA.
STYLE_FILLS: tuple[str, ...] = ("striped", "dotted")

#: sRGB of each shape colour.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "teal": (0, 160, 160),
    "pink": (250, 130, 200),
}
#: sRGB of each background.
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "blue": PALETTE["blue"],
}
#: Stripes and dots are the shape colour times this factor.
SHADE = 0.5
#: (colour, background) pairs that never occur: the shape would not stand out.
FORBIDDEN: frozenset[tuple[str, str]] = frozenset({("blue", "blue"), ("purple", "blue")})

# Rendering constants, in pixels of a 64 px image (scaled with ``size``).
_SUPERSAMPLE = 4
_RADIUS = (12.8, 19.2)     # shape "radius" range (see _outline for what each shape does with it)
_MARGIN = 3.5              # minimum distance from the shape to the image border
_MAX_ROTATION = 15.0       # degrees, non-circles
_STRIPE_PERIOD = 8.0
_STRIPE_DUTY = 0.45        # dark share of each stripe period
_DOT_SPACING = 8.0
_DOT_RADIUS = 2.2


def shade_rgb(rgb: Sequence[int]) -> tuple[int, int, int]:
    """The darker shade used for stripes and dots."""
    return tuple(int(round(c * SHADE)) for c in rgb)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class Spec:
    """What an image shows. Invalid names and forbidden (colour, background) pairs raise ``ValueError``."""

    shape: str
    color: str
    background: str
    fill: str = "solid"

    def __post_init__(self) -> None:
        for value, allowed, what in ((self.shape, SHAPES, "shape"), (self.color, COLORS, "color"),
                                     (self.background, BACKGROUNDS, "background"), (self.fill, FILLS, "fill")):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; one of {', '.join(allowed)}")
        if (self.color, self.background) in FORBIDDEN:
            raise ValueError(f"a {self.color} shape on a {self.background} background is not part of the world "
                             "(it would not stand out)")

    def caption(self) -> str:
        """``"a red circle on a white background"``; ``"a striped red circle on ..."`` when not solid."""
        words = ([self.fill] if self.fill != "solid" else []) + [self.color, self.shape]
        article = "an" if words[0][0] in "aeiou" else "a"
        return f"{article} {' '.join(words)} on a {self.background} background"

    @classmethod
    def from_caption(cls, caption: str) -> Spec:
        """Inverse of :meth:`caption` (case and extra spaces ignored)."""
        words = caption.lower().split()
        try:
            if words[0] not in ("a", "an") or words[-4:-2] != ["on", "a"] or words[-1] != "background":
                raise ValueError
            background = words[-2]
            body = words[1:-4]
            fill = body[0] if len(body) == 3 else "solid"
            if len(body) not in (2, 3) or (len(body) == 3 and fill == "solid"):
                raise ValueError
            return cls(body[-1], body[-2], background, fill)
        except (ValueError, IndexError):
            raise ValueError(f"not a shapes-world caption: {caption!r}") from None

    def replace(self, **changes: str) -> Spec:
        fields = {"shape": self.shape, "color": self.color, "background": self.background, "fill": self.fill}
        fields.update(changes)
        return Spec(**fields)


def all_specs() -> list[Spec]:
    """Every combination in the world (630), in a fixed order."""
    return [Spec(s, c, b, f) for f in FILLS for c in COLORS for s in SHAPES for b in BACKGROUNDS
            if (c, b) not in FORBIDDEN]


# --------------------------------------------------------------------------------------------- held out
@dataclass(frozen=True)
class HeldOut:
    """A pattern of specs kept out of the base model's training data; ``None`` matches anything.

    ``kind`` says what it is for: ``"subject"`` (DreamBooth), ``"shape"`` (a whole shape kept unseen),
    ``"colour"`` (Textual Inversion), ``"fill"`` (LoRA style) or ``"composition"`` (the base's probe)."""

    name: str
    kind: str
    purpose: str
    shape: str | None = None
    color: str | None = None
    background: str | None = None
    fill: str | None = None

    def matches(self, spec: Spec) -> bool:
        return all(want is None or want == got for want, got in (
            (self.shape, spec.shape), (self.color, spec.color), (self.background, spec.background),
            (self.fill, spec.fill)))


#: Seen shape, colour and background, never together: each shape once, each background at least once.
COMPOSITIONAL_PROBES: tuple[Spec, ...] = (
    Spec("triangle", "orange", "black"), Spec("square", "red", "gray"), Spec("circle", "yellow", "blue"),
    Spec("cross", "purple", "white"), Spec("star", "blue", "black"),
)

HELD_OUT: tuple[HeldOut, ...] = (
    HeldOut("green star", "subject", "DreamBooth subject: a seen shape and a seen colour, never together",
            shape="star", color="green"),
    HeldOut("red heart", "subject", "DreamBooth subject: a shape the base never sees", shape="heart", color="red"),
    HeldOut("yellow moon", "subject", "DreamBooth subject: a shape the base never sees", shape="moon",
            color="yellow"),
    HeldOut("heart", "shape", "never seen in any colour, so the red heart is new", shape="heart"),
    HeldOut("moon", "shape", "never seen in any colour, so the yellow moon is new", shape="moon"),
    HeldOut("teal", "colour", "Textual Inversion: an unseen colour", color="teal"),
    HeldOut("pink", "colour", "Textual Inversion: a second unseen colour", color="pink"),
    HeldOut("striped", "fill", "LoRA style", fill="striped"),
    HeldOut("dotted", "fill", "a second LoRA style", fill="dotted"),
    *(HeldOut(p.caption().removeprefix("a ").removeprefix("an "), "composition",
              "compositional probe: each part seen, never together",
              shape=p.shape, color=p.color, background=p.background, fill="solid") for p in COMPOSITIONAL_PROBES),
)


def concepts(kind: str) -> tuple[HeldOut, ...]:
    """The held-out patterns of one ``kind``, in :data:`HELD_OUT` order: what the benchmark teaches and judges."""
    found = tuple(h for h in HELD_OUT if h.kind == kind)
    if not found:
        raise ValueError(f"no held-out concept of kind {kind!r}; kinds: {sorted({h.kind for h in HELD_OUT})}")
    return found


def held_out_reasons(spec: Spec) -> list[str]:
    """Names of the :data:`HELD_OUT` patterns ``spec`` matches (empty: the base model trains on it)."""
    return [h.name for h in HELD_OUT if h.matches(spec)]


def is_held_out(spec: Spec) -> bool:
    return any(h.matches(spec) for h in HELD_OUT)


def training_specs() -> list[Spec]:
    """The base model's world: every spec not held out (101)."""
    return [s for s in all_specs() if not is_held_out(s)]


def held_out_specs() -> list[Spec]:
    """Every held-out spec (529)."""
    return [s for s in all_specs() if is_held_out(s)]


def vocabulary() -> list[str]:
    """Every word of every caption in the world (held-out ones included), sorted."""
    return sorted({w for s in all_specs() for w in s.caption().split()})


# --------------------------------------------------------------------------------------------- seeds
def example_seed(spec: Spec, index: int, split: str = "train") -> int:
    """A stable 64-bit render seed for the ``index``-th example of ``spec`` in ``split``."""
    key = f"{split}|{spec.caption()}|{index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def examples(specs: Iterable[Spec], per_spec: int, split: str = "train") -> Iterator[tuple[Spec, int]]:
    """``(spec, seed)`` pairs: ``per_spec`` examples of each spec, seeds from :func:`example_seed`."""
    for spec in specs:
        for i in range(per_spec):
            yield spec, example_seed(spec, i, split)


# --------------------------------------------------------------------------------------------- rendering
def _star(n_points: int, outer: float, inner: float) -> np.ndarray:
    angles = -math.pi / 2 + np.arange(2 * n_points) * math.pi / n_points
    radii = np.where(np.arange(2 * n_points) % 2 == 0, outer, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)


def _outline(shape: str) -> np.ndarray:
    """Vertices (x right, y down) of ``shape`` for radius 1, centred on their bounding box."""
    if shape == "circle":
        t = np.arange(96) * (2 * math.pi / 96)
        pts = 0.9 * np.stack([np.cos(t), np.sin(t)], 1)
    elif shape == "square":
        pts = 0.8 * np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float)
    elif shape == "triangle":
        a = -math.pi / 2 + np.arange(3) * (2 * math.pi / 3)
        pts = 1.1 * np.stack([np.cos(a), np.sin(a)], 1)
    elif shape == "star":
        pts = _star(5, 1.08, 0.44)
    elif shape == "cross":
        L, W = 0.95, 0.3
        pts = np.array([[-W, -L], [W, -L], [W, -W], [L, -W], [L, W], [W, W], [W, L], [-W, L], [-W, W], [-L, W],
                        [-L, -W], [-W, -W]], dtype=float)
    elif shape == "heart":
        t = np.arange(96) * (2 * math.pi / 96)
        pts = np.stack([16 * np.sin(t) ** 3, -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t)
                                                - np.cos(4 * t))], 1) / 16.0
    elif shape == "moon":
        # a crescent opening to the right: the unit circle minus a circle of radius 0.8 centred at (0.5, 0);
        # the two meet at x = 0.61, y = +-0.79
        top = math.atan2(0.7906, 0.6100)
        outer = np.linspace(top, 2 * math.pi - top, 64)
        inner_top = math.atan2(0.7906, 0.1100)
        inner = np.linspace(2 * math.pi - inner_top, inner_top, 48)
        pts = np.concatenate([np.stack([np.cos(outer), np.sin(outer)], 1),
                              np.stack([0.5 + 0.8 * np.cos(inner), 0.8 * np.sin(inner)], 1)])
    else:  # pragma: no cover - Spec validates
        raise ValueError(shape)
    return pts - (pts.min(0) + pts.max(0)) / 2


def _layout(spec: Spec, seed: int, size: int) -> np.ndarray:
    """The shape's polygon in output pixel coordinates; draws from the seed in a fixed order for every spec."""
    rng = np.random.default_rng(seed)
    k = size / 64.0
    radius = rng.uniform(*_RADIUS) * k
    angle = math.radians(rng.uniform(-_MAX_ROTATION, _MAX_ROTATION))
    fx, fy = rng.uniform(0.0, 1.0, 2)
    pts = _outline(spec.shape) * radius
    if spec.shape != "circle":
        c, s = math.cos(angle), math.sin(angle)
        pts = pts @ np.array([[c, s], [-s, c]])
    lo, hi = pts.min(0), pts.max(0)
    margin = _MARGIN * k
    free = np.maximum(size - 2 * margin - (hi - lo), 0.0)
    offset = margin - lo + np.array([fx, fy]) * free
    return pts + offset


def _pattern(fill: str, seed: int, hi: int, size: int) -> np.ndarray | None:
    """Boolean [hi, hi] map of the dark (shade) pixels at supersampled resolution, or None for solid."""
    if fill == "solid":
        return None
    rng = np.random.default_rng([seed, 1])  # separate stream: the layout is the same with or without a fill
    k = size / 64.0
    ph1, ph2 = rng.uniform(0.0, 1.0, 2)
    u = (np.arange(hi) + 0.5) * (size / hi)  # output-pixel coordinates of supersampled pixel centres
    x, y = u[None, :], u[:, None]
    if fill == "striped":
        period = _STRIPE_PERIOD * k
        t = (x + y) / math.sqrt(2) + ph1 * period
        return np.mod(t, period) < _STRIPE_DUTY * period
    spacing = _DOT_SPACING * k
    dx = np.mod(x + ph1 * spacing, spacing) - spacing / 2
    dy = np.mod(y + ph2 * spacing, spacing) - spacing / 2
    return dx * dx + dy * dy < (_DOT_RADIUS * k) ** 2


def _downsample(a: np.ndarray, size: int) -> np.ndarray:
    return a.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3), dtype=np.float32)


def render_array(spec: Spec, seed: int, size: int = 64) -> np.ndarray:
    """``uint8 [size, size, 3]`` image of ``spec``; layout (position, scale, rotation, pattern phase) from ``seed``."""
    seed = int(seed)
    hi = size * _SUPERSAMPLE
    pts = _layout(spec, seed, size) * _SUPERSAMPLE
    mask_img = Image.new("L", (hi, hi), 0)
    ImageDraw.Draw(mask_img).polygon([tuple(p) for p in pts.tolist()], fill=255)
    mask = np.asarray(mask_img, dtype=np.float32) / np.float32(255.0)
    color = np.asarray(PALETTE[spec.color], dtype=np.float32)
    bg = np.asarray(BACKGROUND_RGB[spec.background], dtype=np.float32)
    # Linear in the per-pixel weights, so downsample the weights first:
    # bg + (color - bg) * cover + (shade - color) * dark.
    cover = _downsample(mask, size)
    img = bg + (color - bg) * cover[..., None]
    dark = _pattern(spec.fill, seed, hi, size)
    if dark is not None:
        shade = np.asarray(shade_rgb(PALETTE[spec.color]), dtype=np.float32)
        img += (shade - color) * _downsample(mask * dark, size)[..., None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render(spec: Spec, seed: int, size: int = 64) -> Image.Image:
    """The image of ``spec`` (RGB, ``size`` x ``size``), antialiased (rendered at 4x and box-downsampled)."""
    return Image.fromarray(render_array(spec, seed, size), "RGB")


def render_batch(specs: Sequence[Spec], seeds: Sequence[int], size: int = 64) -> np.ndarray:
    """``float32 [B, size, size, 3]`` in 0..1 (ComfyUI IMAGE layout, as numpy)."""
    if len(specs) != len(seeds):
        raise ValueError(f"{len(specs)} specs but {len(seeds)} seeds")
    out = np.empty((len(specs), size, size, 3), dtype=np.float32)
    for i, (spec, seed) in enumerate(zip(specs, seeds)):
        out[i] = render_array(spec, seed, size)
    return out / np.float32(255.0)


# --------------------------------------------------------------------------------------------- colour
_RGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                        [0.2126729, 0.7151522, 0.0721750],
                        [0.0193339, 0.1191920, 0.9503041]], dtype=np.float64)
_WHITE = np.array([0.95047, 1.0, 1.08883])


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB values in 0..1, any leading shape ``[..., 3]``."""
    c = np.asarray(rgb, dtype=np.float64)
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = (c @ _RGB_TO_XYZ.T) / _WHITE
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
    return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], -1)
