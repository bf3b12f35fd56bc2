"""Does personalization work? DreamBooth, Textual Inversion and LoRA on ``shapes-tiny``, over every held-out concept.

    python benchmarks/personalization.py [--out bench-out] [--seeds 2] [--samples 8] [--fast]
        [--only base,dreambooth,zeroshot,ti,lora] [--methods lora,full,pivotal]

(``benchmarks/personalization.py`` runs this module's :func:`main`; the tests import the measures from here.)

The concepts are not picked by hand: every held-out pattern of the world of the right kind is taught
(:func:`comfy_finetune.shapes.world.concepts`): each ``"subject"`` by DreamBooth (LoRA and full, with prior
preservation) and by pivotal tuning (a new word ``<sks>`` and a LoRA, also with prior preservation), each
``"colour"`` by Textual Inversion, each ``"fill"`` by a style LoRA; the ``"composition"`` probes test the base model.
Every run goes through the pack's own nodes exactly as a workflow would, and a trainer node
gets only its data and prompts (everything else is the node's default, i.e. its ``recipe: auto``) unless ``--fast``
shortens it for the tests. Every image is judged by the shapes judge (``comfy_finetune.shapes.judge``; its held-out
accuracy is printed first). Measures, per concept and training seed, and targets (:data:`TARGETS`):

=====================  =====================================================================================  =====
base                   shape, colour and background all right on the world's prompts (background alone)      >= 90%
                                                                                                               (98%)
base probes            the same on the held-out combinations of seen attributes                               >= 70%
subject fidelity       "a sks shape" samples judged the subject (shape and colour)                            >= 90%
prompt fidelity        "a sks shape on a <b> background" judged the subject on background <b>, every <b>       >= 80%
class drift            colour+background accuracy of "a red shape on a white background"-style prompts,        <= 5
                       base minus trained, in points                                                          points
zero-shot              the built-in image prompt adapter, one reference image of the subject, no training:    >= 70%
                       subject and prompt fidelity as above with "a shape" for "a sks shape"                  (each)
TI fidelity            "a <token> <shape> on a <b> background" for shapes and backgrounds its images never    >= 85%
                       showed: colour, shape and background all right
TI no-token prompts    a prompt without the token gives the base image bit for bit                            yes
style transfer         share of samples in the style for shapes and colours the LoRA's images never showed    >= 85%
style strength         0 gives the base image bit for bit; the style share does not fall from 0 to 0.5 to 1,  yes
                       and 0.5 lies between 0 and 1 in pixel distance
seconds                each training run (2 CPU cores)                                                         <= 90
=====================  =====================================================================================  =====

It writes ``grid.png`` (one row per prompt: base, then one model per method) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from comfy_finetune.core.atomic import atomic_write
from comfy_finetune.core.loading import SHAPES_NAME
from comfy_finetune.nodes.base import input_defaults
from comfy_finetune.nodes.data import TrainingDataFromImages
from comfy_finetune.nodes.dreambooth import DreamBoothTrain
from comfy_finetune.nodes.embedding_training import LearnEmbedding
from comfy_finetune.nodes.generation import AddLoRA, LoadBase
from comfy_finetune.nodes.image_prompt import BUILTIN as BUILTIN_ADAPTER
from comfy_finetune.nodes.image_prompt import ImagePrompt
from comfy_finetune.nodes.pivotal import PivotalTuning
from comfy_finetune.nodes.training import TrainLoRA
from comfy_finetune.shapes import world as W
from comfy_finetune.shapes.judge import evaluate as judge_evaluate
from comfy_finetune.shapes.judge import load_judge
from comfy_finetune.shapes.train_base import evaluate_base, sample_prompts
from comfy_finetune.training.plots import image_grid

SIZE = 64
INSTANCE_PROMPT = "a sks shape"
PIVOTAL_TOKEN = "<sks>"  # pivotal tuning's new word (a word of its own, where DreamBooth reuses the rare "sks")
PIVOTAL_PROMPT = f"a {PIVOTAL_TOKEN} shape"
DREAMBOOTH_METHODS = ("lora", "full", "pivotal")
CLASS_PROMPT = "a shape"

TARGETS = {"base_all": 0.90, "base_background": 0.98, "base_probes": 0.70, "subject_fidelity": 0.90,
           "prompt_fidelity": 0.80, "class_drift_points": 5.0, "ti_fidelity": 0.85, "style_transfer": 0.85,
           "seconds": 90.0}
ZERO_SHOT = "Image prompt (zero-shot)"
ZERO_SHOT_PROMPT = "a shape"  # the subject comes from the reference image; the words say only the class and where
#: The zero-shot row's own targets (no training at all, one reference image).
ROW_TARGETS = {ZERO_SHOT: {"subject_fidelity": 0.70, "prompt_fidelity": 0.70}}


@dataclass(frozen=True)
class Budget:
    """Sample counts, training seeds, and node inputs that override the defaults (only :data:`FAST` has any)."""

    seeds: tuple[int, ...] = (0, 1)   # training seeds per concept
    samples: int = 8                  # samples per measured prompt
    sample_steps: int = 20
    cfg: float = 5.0
    base_per_spec: int = 1            # samples per world prompt for the base row
    db: dict = field(default_factory=dict)     # DreamBoothTrain inputs beyond data and prompts
    ti: dict = field(default_factory=dict)     # LearnEmbedding inputs
    lora: dict = field(default_factory=dict)   # TrainLoRA inputs


FULL = Budget()
FAST = Budget(seeds=(0,), samples=4, sample_steps=12, db={"num_class_images": 8}, ti={"steps": 150},
              lora={"steps": 300})


# --------------------------------------------------------------------------------------------------- helpers
def run_node(cls, **inputs):
    kwargs = input_defaults(cls)
    kwargs.update(inputs)
    return cls().run(**kwargs)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def dataset(specs: Sequence[W.Spec], captions: Sequence[str], split: str = "bench"):
    images = torch.from_numpy(W.render_batch(list(specs), [W.example_seed(s, i, split) for i, s in enumerate(specs)]))
    return run_node(TrainingDataFromImages, images=images, captions="\n".join(captions), resolution=SIZE)[0]


def generate(pipe, prompts: Sequence[str], budget: Budget, seed0: int = 1000) -> torch.Tensor:
    """``budget.samples`` images per prompt (seeds seed0, seed0+1, ...), through the pack's sampler."""
    return sample_prompts(pipe, [p for p in prompts for _ in range(budget.samples)],
                          [seed0 + k for _ in prompts for k in range(budget.samples)],
                          steps=budget.sample_steps, cfg=budget.cfg)


def share(images: torch.Tensor, test: Callable[[Any], bool]) -> float:
    verdicts = load_judge()(images)
    return sum(bool(test(v)) for v in verdicts) / max(1, len(verdicts))


@dataclass
class Row:
    """One training run (or the base model): its figures, seconds and what it was."""

    method: str
    concept: str = ""
    seed: int | None = None
    figures: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    notes: str = ""

    @property
    def name(self) -> str:
        return " ".join(x for x in (self.method, self.concept, "" if self.seed is None else f"seed {self.seed}") if x)


def allowed_backgrounds(color: str) -> list[str]:
    return [b for b in W.BACKGROUNDS if (color, b) not in W.FORBIDDEN]


# --------------------------------------------------------------------------------------------------- base
def class_prompts(exclude_color: str = "") -> list[W.Spec]:
    """ "a red shape on a white background"-style prompts: colour and background named, shape left open."""
    colours = [c for c in W.SEEN_COLORS if c != exclude_color]
    return [W.Spec("circle", c, b) for c in colours for b in ("white", "black", "gray")][:9]


def class_accuracy(pipe, budget: Budget, exclude_color: str = "") -> float:
    specs = class_prompts(exclude_color)
    prompts = [f"{article(s.color)} {s.color} shape on a {s.background} background" for s in specs]
    b = replace(budget, samples=max(2, budget.samples // 2))
    images = generate(pipe, prompts, b, seed0=7000)
    verdicts = load_judge()(images)
    many = [s for s in specs for _ in range(b.samples)]
    return sum(v.color == s.color and v.background == s.background for v, s in zip(verdicts, many)) / len(many)


def base_row(pipe, budget: Budget) -> Row:
    t0 = time.perf_counter()
    acc = evaluate_base(pipe, budget.base_per_spec, budget.sample_steps, budget.cfg)
    probes = evaluate_base(pipe, max(2, budget.samples // 2), budget.sample_steps, budget.cfg,
                           specs=W.COMPOSITIONAL_PROBES)
    return Row("base", "world prompts", None, {"base_all": acc["all"], "shape": acc["shape"], "color": acc["color"],
                                               "base_background": acc["background"], "base_probes": probes["all"]},
               time.perf_counter() - t0, f"{int(acc['n'])} world prompts, {len(W.COMPOSITIONAL_PROBES)} probes")


# --------------------------------------------------------------------------------------------------- DreamBooth
def subject_spec(concept: W.HeldOut) -> W.Spec:
    return W.Spec(concept.shape, concept.color, "white")


def instance_backgrounds(concept: W.HeldOut) -> list[str]:
    """The instance images' backgrounds: every allowed one but the last, so that one is only ever asked for."""
    return allowed_backgrounds(concept.color)[:-1]


def subject_figures(model, subject: W.Spec, prompt: str, budget: Budget) -> dict[str, float]:
    """Subject fidelity of ``prompt`` and prompt fidelity of "``prompt`` on a <b> background" for every allowed
    background (each, and their mean): the measures every subject method shares."""
    is_subject = lambda v: v.shape == subject.shape and v.color == subject.color  # noqa: E731
    fig = {"subject_fidelity": share(generate(model, [prompt], budget), is_subject)}
    per_bg = {}
    for b in allowed_backgrounds(subject.color):
        imgs = generate(model, [f"{prompt} on {article(b)} {b} background"], budget, seed0=2000)
        per_bg[b] = share(imgs, lambda v, b=b: is_subject(v) and v.background == b)
    fig["prompt_fidelity"] = sum(per_bg.values()) / len(per_bg)
    fig.update({f"prompt_{b}": v for b, v in per_bg.items()})
    return fig


def dreambooth_row(pipe, concept: W.HeldOut, method: str, seed: int, budget: Budget, base_class_acc: float,
                   grid: dict | None = None) -> Row:
    subject = subject_spec(concept)
    bgs = instance_backgrounds(concept)
    specs = [subject.replace(background=bgs[i % len(bgs)]) for i in range(5)]
    prompt = PIVOTAL_PROMPT if method == "pivotal" else INSTANCE_PROMPT
    t0 = time.perf_counter()
    data = dataset(specs, [prompt] * len(specs))
    if method == "pivotal":
        trained = run_node(PivotalTuning, pipe=pipe, dataset=data, instance_prompt=prompt, class_prompt=CLASS_PROMPT,
                           token=PIVOTAL_TOKEN, seed=seed, **budget.db)[0]
    else:
        trained = run_node(DreamBoothTrain, pipe=pipe, dataset=data, instance_prompt=prompt,
                           class_prompt=CLASS_PROMPT, method=method, seed=seed, **budget.db)[0]
    seconds = time.perf_counter() - t0
    fig = subject_figures(trained, subject, prompt, budget)
    acc = class_accuracy(trained, budget, subject.color)
    fig["class_drift_points"] = round(100 * (base_class_acc - acc), 1)
    if grid is not None:
        grid.setdefault(_method_label(method), trained)
    return Row(_method_label(method), concept.name, seed, fig, seconds)


def reference_image(concept: W.HeldOut, index: int = 0) -> torch.Tensor:
    """One rendered image of the subject on white (ComfyUI IMAGE ``[1, 64, 64, 3]``): the zero-shot reference."""
    spec = subject_spec(concept)
    return torch.from_numpy(W.render_batch([spec], [W.example_seed(spec, index, "reference")])).float()


def zero_shot_row(pipe, concept: W.HeldOut, budget: Budget) -> Row:
    """The built-in shapes-tiny image prompt adapter given one reference image: no training. Same measures as
    DreamBooth's with "a shape" for "a sks shape" (seconds: encoding the reference)."""
    subject = subject_spec(concept)
    t0 = time.perf_counter()
    adapted = run_node(ImagePrompt, pipe=pipe, image=reference_image(concept), adapter_name=BUILTIN_ADAPTER)[0]
    seconds = time.perf_counter() - t0
    fig = subject_figures(adapted, subject, ZERO_SHOT_PROMPT, budget)
    fig["training_seconds"] = 0.0
    return Row(ZERO_SHOT, concept.name, None, fig, seconds, "one reference image, no training")


def _method_label(method: str) -> str:
    return "Pivotal tuning" if method == "pivotal" else f"DreamBooth {method}"


# --------------------------------------------------------------------------------------------------- TI
TI_TRAIN_SHAPES = ("triangle", "star", "cross")
TI_TEST_SHAPES = ("circle", "square")


def ti_token(concept: W.HeldOut) -> str:
    return f"<{concept.color}>"


def ti_row(pipe, concept: W.HeldOut, seed: int, budget: Budget, grid: dict | None = None) -> Row:
    token, bgs = ti_token(concept), allowed_backgrounds(concept.color)
    train_bgs = bgs[:-1]
    specs = [W.Spec(s, concept.color, train_bgs[i % len(train_bgs)]) for i, s in enumerate(TI_TRAIN_SHAPES * 2)]
    captions = [f"a {token} {s.shape} on {article(s.background)} {s.background} background" for s in specs]
    t0 = time.perf_counter()
    _, with_emb, _, _ = run_node(LearnEmbedding, pipe=pipe, dataset=dataset(specs, captions), token=token, seed=seed,
                                 **budget.ti)
    seconds = time.perf_counter() - t0
    fig = {}
    for shape in TI_TEST_SHAPES:
        hits = []
        for b in bgs:
            imgs = generate(with_emb, [f"a {token} {shape} on {article(b)} {b} background"], budget, seed0=3000)
            hits.append(share(imgs, lambda v, shape=shape, b=b: (v.color, v.shape, v.background) == (
                concept.color, shape, b)))
        fig[f"ti_{shape}"] = sum(hits) / len(hits)
    fig["ti_fidelity"] = sum(fig.values()) / len(fig)
    plain = W.Spec("circle", "red", "white").caption()
    b1 = replace(budget, samples=1)
    fig["no_token_identical"] = float(torch.equal(generate(pipe, [plain], b1), generate(with_emb, [plain], b1)))
    if grid is not None:
        grid.setdefault("Textual Inversion", with_emb)
    return Row("Textual Inversion", concept.name, seed, fig, seconds)


# --------------------------------------------------------------------------------------------------- LoRA style
STYLE_TRAIN = (("circle", "red", "white"), ("square", "blue", "gray"), ("triangle", "yellow", "black"),
               ("circle", "blue", "white"), ("square", "red", "black"), ("triangle", "red", "gray"),
               ("square", "yellow", "white"), ("circle", "yellow", "gray"), ("triangle", "blue", "white"),
               ("circle", "red", "black"))
STYLE_TEST = (("star", "purple", "white"), ("cross", "orange", "gray"), ("star", "orange", "black"),
              ("cross", "green", "white"))


def lora_row(pipe, concept: W.HeldOut, seed: int, budget: Budget, grid: dict | None = None) -> Row:
    fill = concept.fill
    specs = [W.Spec(s, c, b, fill) for s, c, b in STYLE_TRAIN]
    t0 = time.perf_counter()
    lora = run_node(TrainLoRA, pipe=pipe, dataset=dataset(specs, [s.caption() for s in specs]), seed=seed,
                    **budget.lora)[0]
    seconds = time.perf_counter() - t0
    prompts = [W.Spec(s, c, b, fill).caption() for s, c, b in STYLE_TEST]
    styled = {}
    for strength in (0.0, 0.5, 1.0):
        p = run_node(AddLoRA, pipe=pipe, lora=lora, strength_unet=strength, strength_text=strength)[0]
        styled[strength] = generate(p, prompts, budget, seed0=4000)
        if grid is not None and strength == 1.0:
            grid.setdefault("LoRA style", p)
    base_imgs = generate(pipe, prompts, budget, seed0=4000)
    in_style = {k: share(v, lambda v: v.fill == fill) for k, v in styled.items()}
    half = float((styled[0.5] - base_imgs).abs().mean() / (styled[1.0] - base_imgs).abs().mean().clamp_min(1e-12))
    return Row("LoRA style", concept.name, seed, {
        "style_transfer": in_style[1.0], "style_half": in_style[0.5], "style_base": in_style[0.0],
        "strength0_identical": float(torch.equal(styled[0.0], base_imgs)),
        "strength_monotone": float(in_style[0.0] <= in_style[0.5] <= in_style[1.0]),
        "half_distance_ratio": round(half, 3)}, seconds)


# --------------------------------------------------------------------------------------------------- grid + table
def grid_prompts() -> list[str]:
    ti = ti_token(W.concepts("colour")[0])
    fill = W.concepts("fill")[0].fill
    return ["a sks shape", "a sks shape on a blue background", f"a {ti} square on a blue background",
            f"a {fill} purple star on a white background", W.COMPOSITIONAL_PROBES[0].caption()]


def write_grid(pipe, models: dict, out: Path, budget: Budget) -> Path:
    from PIL import Image

    columns = {"base": pipe, **models}
    b = replace(budget, samples=2)
    rows = [torch.cat([generate(p, [prompt], b, seed0=11) for p in columns.values()]) for prompt in grid_prompts()]
    grid = image_grid(rows, labels=grid_prompts())
    path = out / "grid.png"
    image = Image.fromarray((grid[0].numpy() * 255).round().astype("uint8"))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    atomic_write(out / "grid_columns.txt",
                 lambda tmp: tmp.write_text("columns, 2 seeds each: " + ", ".join(columns) + "\n"))
    return path


_AT_LEAST = ("base_all", "base_background", "base_probes", "subject_fidelity", "prompt_fidelity", "ti_fidelity",
             "style_transfer")


def check(row: Row) -> list[str]:
    """Targets this row misses (empty: all met)."""
    f, missed = row.figures, []
    targets = {**TARGETS, **ROW_TARGETS.get(row.method, {})}
    for key in _AT_LEAST:
        if key in f and f[key] < targets[key]:
            missed.append(f"{key} {f[key]:.0%} < {targets[key]:.0%}")
    if f.get("class_drift_points", 0.0) > TARGETS["class_drift_points"]:
        missed.append(f"class drift {f['class_drift_points']} > {TARGETS['class_drift_points']} points")
    if row.method != "base" and row.seconds > TARGETS["seconds"]:
        missed.append(f"{row.seconds:.0f} s > {TARGETS['seconds']:.0f} s")
    if f.get("no_token_identical", 1.0) != 1.0:
        missed.append("a prompt without the token changed")
    if f.get("strength0_identical", 1.0) != 1.0:
        missed.append("strength 0 changed the image")
    if f.get("strength_monotone", 1.0) != 1.0:
        missed.append("the style share fell as strength rose")
    if "half_distance_ratio" in f and not 0.0 < f["half_distance_ratio"] < 1.0:
        missed.append("strength 0.5 is not between 0 and 1")
    return missed


HEADLINE = ("base_all", "base_background", "base_probes", "subject_fidelity", "prompt_fidelity",
            "class_drift_points", "ti_fidelity", "style_transfer")


def _figure(key: str, value: float) -> str:
    if "identical" in key or key == "strength_monotone":
        return f"{key} {'yes' if value == 1.0 else 'no'}"
    if isinstance(value, float) and 0 <= value <= 1 and not any(w in key for w in ("points", "ratio", "seconds")):
        return f"{key} {value:.0%}"
    return f"{key} {value}"


def format_row(r: Row) -> str:
    miss = check(r)
    figs = ", ".join(_figure(k, v) for k, v in r.figures.items())
    return f"{r.name:<44} {r.seconds:5.0f}  {figs}" + (f"  MISSED: {'; '.join(miss)}" if miss else "")


def summary(rows: Sequence[Row]) -> list[Row]:
    """Per (method, concept): the mean over seeds of every figure (the flags: all seeds must hold), and the longest
    run's seconds; then per method the mean over concepts."""
    def merge(group: list[Row], method: str, concept: str) -> Row:
        keys = dict.fromkeys(k for r in group for k in r.figures)
        figs = {}
        for k in keys:
            vals = [r.figures[k] for r in group if k in r.figures]
            flag = "identical" in k or k == "strength_monotone"
            figs[k] = min(vals) if flag else round(sum(vals) / len(vals), 4 if "points" not in k else 1)
        return Row(method, concept, None, figs, max(r.seconds for r in group))

    by_concept: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        by_concept.setdefault((r.method, r.concept), []).append(r)
    out = [merge(g, m, c) for (m, c), g in by_concept.items()]
    methods = dict.fromkeys(m for m, _ in by_concept)
    for m in methods:
        per = [r for r in out if r.method == m]
        if len(per) > 1:
            out.append(merge(per, m, "mean over concepts"))
    return out


def format_table(rows: Sequence[Row], judge_acc: float) -> str:
    targets = ", ".join(f"{k} {'<=' if 'points' in k or k == 'seconds' else '>='} "
                        f"{v if 'points' in k or k == 'seconds' else f'{v:.0%}'}" for k, v in TARGETS.items())
    return "\n".join([f"judge accuracy on held-out synthetic images: {judge_acc:.1%}", f"targets: {targets}", "",
                      f"{'run (mean over seeds)':<44} {'s':>5}  figures", "-" * 110,
                      *map(format_row, summary(rows))])


KINDS = {"dreambooth": "subject", "zeroshot": "subject", "ti": "colour", "lora": "fill"}


def run(budget: Budget = FULL, only: Sequence[str] = ("base", "dreambooth", "zeroshot", "ti", "lora"),
        out: Path | None = None,
        log: Callable[[str], None] = print, methods: Sequence[str] = DREAMBOOTH_METHODS) -> dict:
    pipe = run_node(LoadBase, ckpt_name=SHAPES_NAME)[0]
    judge_acc = judge_evaluate(per_spec=1)["all"]
    log(f"judge accuracy on held-out synthetic images: {judge_acc:.1%}")
    rows: list[Row] = []
    if "base" in only:
        rows.append(base_row(pipe, budget))
        log(format_row(rows[-1]))
    grid: dict = {}
    for what in ("dreambooth", "zeroshot", "ti", "lora"):
        if what not in only:
            continue
        for concept in W.concepts(KINDS[what]):
            if what == "zeroshot":  # no training: no seeds
                rows.append(zero_shot_row(pipe, concept, budget))
                log(format_row(rows[-1]))
                continue
            base_class = class_accuracy(pipe, budget, concept.color) if what == "dreambooth" else 0.0
            for seed in budget.seeds:
                if what == "dreambooth":
                    new = [dreambooth_row(pipe, concept, m, seed, budget, base_class, grid) for m in methods]
                elif what == "ti":
                    new = [ti_row(pipe, concept, seed, budget, grid)]
                else:
                    new = [lora_row(pipe, concept, seed, budget, grid)]
                rows += new
                for r in new:
                    log(format_row(r))
    result = {"judge_accuracy": judge_acc, "budget": asdict(budget), "targets": TARGETS,
              "rows": [{**asdict(r), "missed": check(r)} for r in rows],
              "summary": [{**asdict(r), "missed": check(r)} for r in summary(rows)]}
    if out is not None and grid:
        result["grid"] = str(write_grid(pipe, grid, out, budget))
    result["table"] = format_table(rows, judge_acc)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench-out", help="folder for grid.png (default: bench-out)")
    p.add_argument("--fast", action="store_true", help="the tests' budget: fewer steps and samples")
    p.add_argument("--seeds", type=int, default=None, help="training seeds per concept (default 2; --fast 1)")
    p.add_argument("--samples", type=int, default=None, help="samples per measured prompt (default 8; --fast 4)")
    p.add_argument("--only", default="base,dreambooth,zeroshot,ti,lora",
                   help="which rows: base, dreambooth (and pivotal), zeroshot (the image prompt adapter), ti, lora")
    p.add_argument("--methods", default=",".join(DREAMBOOTH_METHODS),
                   help="the subject trainers to run: lora and full (DreamBooth), pivotal (pivotal tuning)")
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("comfy_finetune").setLevel(logging.WARNING)
    budget = FAST if args.fast else FULL
    if args.seeds is not None:
        budget = replace(budget, seeds=tuple(range(args.seeds)))
    if args.samples is not None:
        budget = replace(budget, samples=args.samples)
    result = run(budget, [s.strip() for s in args.only.split(",")], Path(args.out),
                 methods=[m.strip() for m in args.methods.split(",")])
    print()
    print(result["table"])
    print(f"\ngrid: {result.get('grid')}")
    if args.json:
        atomic_write(args.json, lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
