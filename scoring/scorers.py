"""Scorers: what a trainer measures every N steps to keep its best checkpoint, and what the evaluation node reports.

A scorer is an immutable description (a node output, so it is never changed once made); a trainer calls
:meth:`Scorer.bind` once with the instance images, which returns a :class:`Bound` scorer holding whatever it
precomputed (reference features), and calls that at every evaluation with an :class:`Evaluation`: the images the
trained model drew for the scorer's :meth:`~Scorer.probes` (fixed prompts and seeds, through the same sampler,
negative prompt and settings as the Sample node), the held-out denoising loss when the scorer asked for one, and the
first evaluation's figures (the model before training), against which drift is measured.

Every :class:`Score` has a ``value`` where higher is better, named ``metrics`` (the curves the trainer draws) and a
``shortfall``: how far it is below the floors a :class:`Combined` scorer was asked to keep (0 when every floor is
met). :func:`better` ranks scores: meeting the floors first, then a smaller shortfall, then a higher value.

The measures:

* **fidelity** (:class:`JudgeScorer`, the shapes world): the share of samples whose judged shape, colour,
  background and fill match what the target and the prompt name ("green star" + "a sks shape on a black
  background" expects a green star on black). One rule covers subject, prompt, style and colour fidelity.
* **class preservation**: how much samples of class prompts ("a shape") drift from what the model drew before
  training. With the judge: the share of class samples judged as their prompt says, and its drop in points since
  the first evaluation (value = minus the drop). With image features: the DreamBooth paper's PRES, the mean cosine
  between class samples and the instance images, and its rise since the first evaluation (value = minus the rise).
* **subject similarity** (:class:`FeatureScorer`): the mean cosine between every sample's and every instance
  image's embedding, DINO or CLIP-I as in the DreamBooth paper (DreamBooth-SD on DreamBench: DINO 0.668, CLIP-I
  0.803; Textual Inversion 0.569 / 0.780).
* **prompt alignment**: the mean cosine between each sample's CLIP image embedding and its prompt's CLIP text
  embedding, CLIP-T (DreamBooth-SD 0.305, Textual Inversion 0.255).
* **held-out loss** (:class:`ValidationLossScorer`): the denoising loss of images kept out of training at fixed
  noise and timesteps (value = minus the loss).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.errors import FinetuneError
from ..shapes import world as W
from ..shapes.judge import load_judge

FIDELITY = "fidelity"
CLASS_PRESERVATION = "class_preservation"
SUBJECT_SIMILARITY = "subject_similarity"
PROMPT_ALIGNMENT = "prompt_alignment"
JUDGE_MEASURES = (FIDELITY, CLASS_PRESERVATION)
FEATURE_MEASURES = (SUBJECT_SIMILARITY, PROMPT_ALIGNMENT, CLASS_PRESERVATION)


# An earlier checkpoint is kept over a later one only when it scores higher by more than this many standard errors
# of the difference of the two scores (see :func:`within_noise`).
NOISE_Z = 1.0


@dataclass(frozen=True)
class Score:
    value: float
    metrics: Mapping[str, float] = field(default_factory=dict)
    shortfall: float = 0.0
    # The standard error of ``value`` from the samples it was measured on (0: exact, or unknown).
    stderr: float = 0.0

    def key(self) -> tuple:
        """Sort key: floors met, then a smaller shortfall, then a higher value (NaN ranks last)."""
        value = self.value if math.isfinite(self.value) else -math.inf
        return (self.shortfall <= 0.0, -self.shortfall, value)


def better(a: Score, b: Score | None) -> bool:
    """Whether ``a`` beats ``b`` strictly (a tie is no improvement; the selection keeps the later of two ties)."""
    return b is None or a.key() > b.key()


def within_noise(later: Score, peak: Score | None, z: float = NOISE_Z) -> bool:
    """Whether ``later`` cannot be told apart from the highest score so far, ``peak``: the same floors met (no
    shortfall, or the same one) and a value at most ``z`` standard errors of the difference below it
    (``sqrt(se_later² + se_peak²)``; with no standard errors this is a tie). Picking the highest of several noisy
    scores favours a lucky one (a judge on 12 samples has a standard error near 0.14), so the selection keeps the
    latest checkpoint within noise of the highest: an earlier one wins only when it is clearly better."""
    if peak is None:
        return True
    if not (math.isfinite(later.value) and math.isfinite(peak.value)):
        return later.key() == peak.key()
    if (later.shortfall > 0.0 or peak.shortfall > 0.0) and later.shortfall != peak.shortfall:
        return False
    margin = z * math.sqrt(later.stderr ** 2 + peak.stderr ** 2)
    return peak.value - later.value <= margin


def proportion_stderr(shares: Sequence[tuple[int, int]]) -> float:
    """The standard error of the mean of per-prompt shares ``hits / n``, each share's variance ``p (1 - p) / n`` with
    ``p = (hits + 1) / (n + 2)`` (so an all-or-nothing share is not taken as certain)."""
    var = 0.0
    for hits, n in shares:
        if n > 0:
            p = (hits + 1) / (n + 2)
            var += p * (1 - p) / n
    return math.sqrt(var) / max(1, len(shares))


def mean_stderr(groups: Sequence[torch.Tensor]) -> float:
    """The standard error of the mean of per-group means (one per prompt) of per-sample values; 0 where a group has
    fewer than two samples."""
    var = 0.0
    for g in groups:
        g = g.double().flatten()
        if g.numel() > 1:
            var += float(g.var(unbiased=True)) / g.numel()
    return math.sqrt(var) / max(1, len(groups))


@dataclass(frozen=True)
class Probe:
    """A prompt sampled at every evaluation: ``samples`` images, seeds ``seed``, ``seed + 1``, ... in one batch."""

    prompt: str
    samples: int
    seed: int


@dataclass
class Evaluation:
    """What a bound scorer reads at one evaluation."""

    step: int
    images: Mapping[str, torch.Tensor]  # prompt -> IMAGE [n, H, W, 3] of the trained model
    first: Mapping[str, float] | None = None  # the metrics of the first evaluation (None: this is it)
    heldout_loss: float | None = None


Bound = Callable[[Evaluation], Score]


def _lines(text: str | Sequence[str]) -> tuple[str, ...]:
    items = text.splitlines() if isinstance(text, str) else list(text)
    return tuple(s.strip() for s in items if s.strip())


def images_from(pixels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Training pixels ``[3, h, w]`` in -1..1 as IMAGE tensors ``[1, h, w, 3]`` in 0..1 (sizes may differ)."""
    return [((p.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).unsqueeze(0) for p in pixels]


@dataclass(frozen=True)
class Scorer:
    """Base: when to evaluate and when to stop. ``every`` 0 = automatic (as often as keeps scoring within about 15 %
    of the training time, see ``training.loop.Scoring``); ``patience`` 0 = never stop early, K = stop when the score
    has not improved for K evaluations."""

    every: int = 0
    patience: int = 0
    node: str = "Scorer"

    def interval(self, steps: int) -> int:
        """Steps between evaluations; 0: chosen by the loop."""
        return max(0, min(int(self.every), steps))

    def probes(self) -> tuple[Probe, ...]:
        return ()

    @property
    def holdout(self) -> int:
        """How many training images the trainer keeps out of training for a held-out loss."""
        return 0

    @property
    def heldout_set(self) -> Any:
        """A separate held-out TrainingSet, or None."""
        return None

    def bind(self, references: Sequence[torch.Tensor], *, node: str) -> Bound:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


# ---------------------------------------------------------------------------------------------- the shapes judge
_BACKGROUND = re.compile(r"\bon an? (\w+) background\b")


def expected_attributes(target: str, prompt: str) -> dict[str, str]:
    """The shapes-world attributes a sample must show: those ``target`` names, then those ``prompt`` names in world
    words (``on a <b> background``, shape, colour and fill words; other words such as ``sks`` are ignored).
    The target wins where both name one."""
    def parse(text: str) -> dict[str, str]:
        text = text.lower()
        out: dict[str, str] = {}
        m = _BACKGROUND.search(text)
        if m and m.group(1) in W.BACKGROUNDS:
            out["background"] = m.group(1)
            text = text[:m.start()] + " " + text[m.end():]
        for word in re.findall(r"[a-z]+", text):
            for attr, words in (("shape", W.SHAPES), ("color", W.COLORS), ("fill", W.FILLS)):
                if word in words:
                    out[attr] = word
        return out

    return {**parse(prompt), **parse(target)}


@dataclass(frozen=True)
class JudgeScorer(Scorer):
    """The shapes judge on the built-in world: :data:`FIDELITY` (mean share over ``prompts`` of samples matching
    ``target`` and the prompt) or :data:`CLASS_PRESERVATION` (the share of class-prompt samples judged as their
    prompt says, as its drop since the first evaluation)."""

    measure: str = FIDELITY
    target: str = ""
    prompts: tuple[str, ...] = ()
    samples: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", _lines(self.prompts))

    def check(self) -> None:
        if self.measure not in JUDGE_MEASURES:
            raise FinetuneError(f"unknown measure '{self.measure}'", node=self.node, input="measure",
                                fix=f"use one of {', '.join(JUDGE_MEASURES)}")
        if not self.prompts:
            raise FinetuneError("no prompts to sample", node=self.node, input="prompts",
                                fix="write one prompt per line, e.g. 'a sks shape on a black background'")
        for p in self.prompts:
            if not expected_attributes("" if self.measure == CLASS_PRESERVATION else self.target, p):
                blame = "target" if self.measure == FIDELITY and self.target == "" else "prompts"
                raise FinetuneError(f"neither the target nor the prompt '{p}' names anything the judge can check",
                                    node=self.node, input=blame,
                                    fix="name shapes-world words: a shape, colour, fill ('green star', 'striped') "
                                        "or 'on a black background'")
        if self.samples < 1:
            raise FinetuneError("samples must be at least 1", node=self.node, input="samples", fix="use 4-8")

    def probes(self) -> tuple[Probe, ...]:
        return tuple(Probe(p, self.samples, self.seed + 1000 * i) for i, p in enumerate(self.prompts))

    def name(self) -> str:
        return "judge fidelity" if self.measure == FIDELITY else "judge class"

    def bind(self, references: Sequence[torch.Tensor], *, node: str) -> Bound:
        self.check()
        judge = load_judge()
        target = "" if self.measure == CLASS_PRESERVATION else self.target
        expected = {p: expected_attributes(target, p) for p in self.prompts}
        name = self.name()

        def counts(ev: Evaluation) -> list[tuple[int, int]]:
            out = []
            for p in self.prompts:
                verdicts = judge(ev.images[p])
                want = expected[p]
                out.append((sum(all(getattr(v, a) == x for a, x in want.items()) for v in verdicts), len(verdicts)))
            return out

        def score(ev: Evaluation) -> Score:
            hits = counts(ev)
            share = sum(h / max(1, n) for h, n in hits) / len(hits)
            se = proportion_stderr(hits)
            if self.measure == FIDELITY:
                return Score(share, {name: share}, stderr=se)
            first = ev.first.get(name, share) if ev.first else share
            drop = 100.0 * (first - share)
            return Score(0.0 - drop, {name: share, "class drift (points)": drop}, stderr=100.0 * se)  # 0.0 -: no -0

        return score

    def describe(self) -> str:
        return f"{self.name()} on {len(self.prompts)} prompt(s) x {self.samples}"


# ---------------------------------------------------------------------------------------------- image features
@dataclass(frozen=True)
class FeatureScorer(Scorer):
    """DINO / CLIP measures with a :class:`~.features.FeatureModel`: subject similarity (DINO or CLIP-I), prompt
    alignment (CLIP-T) or class preservation (PRES and its rise since the first evaluation)."""

    features: Any = None
    measure: str = SUBJECT_SIMILARITY
    prompts: tuple[str, ...] = ()
    samples: int = 4
    seed: int = 0
    references: Any = None  # IMAGE [N, H, W, 3]; None: the trainer's instance images

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", _lines(self.prompts))

    def check(self, references: Sequence[torch.Tensor]) -> None:
        if self.measure not in FEATURE_MEASURES:
            raise FinetuneError(f"unknown measure '{self.measure}'", node=self.node, input="measure",
                                fix=f"use one of {', '.join(FEATURE_MEASURES)}")
        if not self.prompts:
            raise FinetuneError("no prompts to sample", node=self.node, input="prompts",
                                fix="write one prompt per line, e.g. 'a photo of sks dog on the beach'")
        if self.measure == PROMPT_ALIGNMENT and not self.features.has_text:
            raise FinetuneError(f"prompt alignment (CLIP-T) needs a CLIP with its text model, and "
                                f"'{self.features.name}' is a {self.features.kind} image model", node=self.node,
                                input="features", fix="load a full CLIP folder (vision + text + tokenizer, e.g. "
                                                      "openai/clip-vit-base-patch32), or measure subject_similarity")
        if self.measure != PROMPT_ALIGNMENT and not references:
            raise FinetuneError(f"{self.measure} compares samples with the instance images, and there are none",
                                node=self.node, input="references",
                                fix="connect the subject's images, or use the scorer on a trainer (its training "
                                    "images are the references)")
        if self.samples < 1:
            raise FinetuneError("samples must be at least 1", node=self.node, input="samples", fix="use 4-8")

    def probes(self) -> tuple[Probe, ...]:
        return tuple(Probe(p, self.samples, self.seed + 1000 * i) for i, p in enumerate(self.prompts))

    def name(self) -> str:
        kind = "DINO" if self.features.kind in ("dino", "dinov2") else "CLIP"
        if self.measure == SUBJECT_SIMILARITY:
            return f"{kind}{'-I' if kind == 'CLIP' else ''} subject"
        if self.measure == PROMPT_ALIGNMENT:
            return "CLIP-T prompt"
        return f"{kind} PRES"

    def bind(self, references: Sequence[torch.Tensor], *, node: str) -> Bound:
        refs = list(references) if self.references is None else [self.references]
        self.check(refs)
        fm, name = self.features, self.name()
        ref = None
        if self.measure != PROMPT_ALIGNMENT:
            ref = torch.nn.functional.normalize(torch.cat([fm.image_features(r) for r in refs]).float(), dim=-1)
        text = None
        if self.measure == PROMPT_ALIGNMENT:
            text = torch.nn.functional.normalize(fm.text_features(list(self.prompts)).float(), dim=-1)

        def score(ev: Evaluation) -> Score:
            per_sample = []  # per prompt: each sample's similarity (to the prompt, or its mean over the references)
            for i, p in enumerate(self.prompts):
                feats = torch.nn.functional.normalize(fm.image_features(ev.images[p]).float(), dim=-1)
                per_sample.append(feats @ text[i] if text is not None else (feats @ ref.T).mean(dim=1))
            value = sum(float(g.mean()) for g in per_sample) / len(per_sample)
            se = mean_stderr(per_sample)
            if self.measure != CLASS_PRESERVATION:
                return Score(value, {name: value}, stderr=se)
            first = ev.first.get(name, value) if ev.first else value
            return Score(0.0 - (value - first), {name: value, f"{name} rise": value - first}, stderr=se)

        return score

    def describe(self) -> str:
        return f"{self.name()} ({self.features.name}) on {len(self.prompts)} prompt(s) x {self.samples}"


# ---------------------------------------------------------------------------------------------- held-out loss
@dataclass(frozen=True)
class ValidationLossScorer(Scorer):
    """The denoising loss of held-out images at fixed noise and timesteps: ``dataset`` (a separate set), or the last
    ``holdout_count`` images of the training set, kept out of training."""

    dataset: Any = None
    holdout_count: int = 0

    @property
    def holdout(self) -> int:
        return 0 if self.dataset is not None else self.holdout_count

    @property
    def heldout_set(self) -> Any:
        return self.dataset

    def bind(self, references: Sequence[torch.Tensor], *, node: str) -> Bound:
        if self.dataset is None and self.holdout_count < 1:
            raise FinetuneError("there is nothing to hold out", node=self.node, input="holdout",
                                fix="hold out 1 or more training images, or connect a validation dataset")

        def score(ev: Evaluation) -> Score:
            loss = float("nan") if ev.heldout_loss is None else ev.heldout_loss
            return Score(-loss, {"held-out loss": loss})

        return score

    def describe(self) -> str:
        return ("held-out loss on a separate set" if self.dataset is not None
                else f"held-out loss on {self.holdout_count} training image(s)")


# ---------------------------------------------------------------------------------------------- combination
@dataclass(frozen=True)
class Part:
    scorer: Scorer
    weight: float = 1.0
    floor: float | None = None  # the part's value must reach this (None: no floor)


@dataclass(frozen=True)
class Combined(Scorer):
    """A weighted mean of its parts' values (weight 0: reported, not chosen by), with floors: a checkpoint whose
    part falls below its floor ranks below every checkpoint that meets all floors (:func:`better`)."""

    parts: tuple[Part, ...] = ()

    def probes(self) -> tuple[Probe, ...]:
        seen: dict[str, Probe] = {}
        for part in self.parts:
            for p in part.scorer.probes():
                old = seen.get(p.prompt)
                if old is None or p.samples > old.samples:
                    seen[p.prompt] = Probe(p.prompt, p.samples, old.seed if old else p.seed)
        return tuple(seen.values())

    @property
    def holdout(self) -> int:
        return max((p.scorer.holdout for p in self.parts), default=0)

    @property
    def heldout_set(self) -> Any:
        return next((p.scorer.heldout_set for p in self.parts if p.scorer.heldout_set is not None), None)

    def bind(self, references: Sequence[torch.Tensor], *, node: str) -> Bound:
        if not self.parts:
            raise FinetuneError("nothing to combine", node=self.node, input="scorer_a", fix="connect a scorer")
        if sum(p.weight for p in self.parts) <= 0:
            raise FinetuneError("every weight is 0, so nothing decides which checkpoint is best", node=self.node,
                                input="weight_a", fix="give at least one scorer a positive weight")
        bound = [(p, p.scorer.bind(references, node=node)) for p in self.parts]
        sizes = {p.prompt: p.samples for p in self.probes()}

        def score(ev: Evaluation) -> Score:
            total = weights = shortfall = variance = 0.0
            metrics: dict[str, float] = {}
            for part, fn in bound:
                own = {p.prompt: p.samples for p in part.scorer.probes()}
                images = {k: (v[:own[k]] if k in own and own[k] < sizes.get(k, 0) else v)
                          for k, v in ev.images.items()}
                s = fn(Evaluation(ev.step, images, ev.first, ev.heldout_loss))
                for k, v in s.metrics.items():
                    name, n = k, 2
                    while name in metrics:
                        name, n = f"{k} {n}", n + 1
                    metrics[name] = v
                if part.weight > 0:  # weight 0: reported only (its NaN or anything else never moves the value)
                    total += part.weight * s.value
                    weights += part.weight
                    variance += (part.weight * s.stderr) ** 2  # the parts' samples taken as independent
                shortfall += s.shortfall
                if part.floor is not None and not s.value >= part.floor:
                    shortfall += (part.floor - s.value) if math.isfinite(s.value) else math.inf
            value = total / weights
            return Score(value, {"score": value, **metrics}, shortfall, math.sqrt(variance) / weights)

        return score

    def describe(self) -> str:
        return " + ".join(f"{p.weight:g} x {p.scorer.describe()}" + (f" (>= {p.floor:g})" if p.floor is not None
                                                                      else "") for p in self.parts)
