"""Does personalization work? DreamBooth, Textual Inversion and LoRA on ``shapes-tiny``, judged.

    python benchmarks/personalization.py [--out bench-out] [--fast] [--only dreambooth,ti,lora] [--json r.json]

(``benchmarks/personalization.py`` runs this module's :func:`main`; the tests import the measures from here.)

Every run goes through the pack's own nodes (LoadBase, TrainingDataFromImages, DreamBoothTrain, LearnEmbedding,
TrainLoRA, AddLoRA) exactly as a workflow would, and every image is judged by the shapes judge
(``comfy_finetune.shapes.judge``; its held-out accuracy is printed first). Measures and targets:

==========================  ===========================================================================  ======
base                        judge accuracy (shape, colour, background all right) on the world's prompts     --
DreamBooth subject          share of "a sks shape" samples judged green star                              >= 80%
DreamBooth prompt           share of "a sks shape on a blue background" samples with a blue background    >= 70%
DreamBooth class drift      colour+background accuracy on "a red shape on a white background"-style        <= 10
                            prompts, base minus trained, in points (with prior preservation)               points
TI fidelity                 share of "a <teal> square" / "a <teal> circle" samples judged teal + shape     >= 70%
TI no-token prompts         a prompt without the token gives the base image bit for bit                     yes
LoRA style transfer         share of striped samples for shapes and colours the LoRA never saw            >= 70%
LoRA strength               0 gives the base image bit for bit; 0.5 lies between 0 and 1                    yes
==========================  ===========================================================================  ======

Each training run should take at most 3 minutes on 2 CPU cores; the time is in the table. ``--fast`` (fewer
steps and samples) is what the tests run. It writes ``grid.png`` (one row per prompt: base, then each trained
model) into ``--out`` for people to look at.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from comfy_finetune.core.atomic import atomic_write
from comfy_finetune.core.loading import SHAPES_NAME
from comfy_finetune.nodes.data import TrainingDataFromImages
from comfy_finetune.nodes.dreambooth import DreamBoothTrain
from comfy_finetune.nodes.embedding_training import LearnEmbedding
from comfy_finetune.nodes.generation import AddLoRA, LoadBase
from comfy_finetune.nodes.training import TrainLoRA
from comfy_finetune.shapes import world as W
from comfy_finetune.shapes.judge import evaluate as judge_evaluate
from comfy_finetune.shapes.judge import load_judge
from comfy_finetune.shapes.train_base import evaluate_base, sample_prompts
from comfy_finetune.training.plots import image_grid

SIZE = 64
SUBJECT = W.Spec("star", "green", "white")
INSTANCE_PROMPT = "a sks shape"
CLASS_PROMPT = "a shape"
TI_TOKEN = "<teal>"
TI_COLOR = "teal"

TARGETS = {"subject_fidelity": 0.80, "prompt_fidelity": 0.70, "class_drift_points": 10.0, "ti_fidelity": 0.70,
           "style_transfer": 0.70, "seconds": 180.0}


@dataclass(frozen=True)
class Budget:
    """Steps and sample counts: :data:`FULL` for the benchmark, :data:`FAST` for the tests."""
    db_steps: int = 250
    db_lr_lora: float = 2e-3
    db_lr_full: float = 2e-4
    num_class_images: int = 24
    ti_steps: int = 300
    ti_lr: float = 2e-2
    lora_steps: int = 300
    lora_lr: float = 2e-3
    batch: int = 4
    samples: int = 16          # samples per measured prompt
    sample_steps: int = 20
    cfg: float = 5.0
    base_per_spec: int = 1     # samples per world prompt for the base row


FULL = Budget()
FAST = Budget(db_steps=120, ti_steps=300, lora_steps=150, num_class_images=8, samples=6, sample_steps=12)


# --------------------------------------------------------------------------------------------------- helpers
def node_defaults(cls) -> dict[str, Any]:
    """Each widget input's default from the node's INPUT_TYPES (what a freshly dropped node has)."""
    types = cls.INPUT_TYPES()
    out: dict[str, Any] = {}
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if "default" in opts:
                out[name] = opts["default"]
            elif isinstance(spec[0], (list, tuple)) and spec[0]:
                out[name] = spec[0][0]
    return out


def run_node(cls, **inputs):
    kwargs = node_defaults(cls)
    kwargs.update(inputs)
    return cls().run(**kwargs)


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


def train_settings(budget: Budget, steps: int, lr: float) -> dict[str, Any]:
    return dict(steps=steps, learning_rate=lr, batch_size=budget.batch, seed=0, validate_every=0,
                lr_schedule="constant", warmup_steps=0)


@dataclass
class Row:
    name: str
    figures: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    notes: str = ""


# --------------------------------------------------------------------------------------------------- the measures
def class_prompts() -> list[W.Spec]:
    """ "a red shape on a white background"-style prompts: colour and background named, shape left open."""
    colours = [c for c in W.SEEN_COLORS if c != SUBJECT.color]
    bgs = ["white", "black", "gray"]
    return [W.Spec("circle", c, b) for c in colours for b in bgs][:9]


def class_accuracy(pipe, budget: Budget) -> float:
    specs = class_prompts()
    prompts = [f"{'an' if s.color[0] in 'aeiou' else 'a'} {s.color} shape on a {s.background} background"
               for s in specs]
    b = replace(budget, samples=max(2, budget.samples // 4))
    images = generate(pipe, prompts, b, seed0=7000)
    verdicts = load_judge()(images)
    many = [s for s in specs for _ in range(b.samples)]
    return sum(v.color == s.color and v.background == s.background for v, s in zip(verdicts, many)) / len(many)


def base_row(pipe, budget: Budget) -> Row:
    t0 = time.perf_counter()
    acc = evaluate_base(pipe, budget.base_per_spec, budget.sample_steps, budget.cfg)
    probe = evaluate_base(pipe, max(2, budget.samples // 2), budget.sample_steps, budget.cfg,
                          specs=[W.COMPOSITIONAL_PROBE])
    return Row("base model (world prompts)", {"accuracy_all": acc["all"], "shape": acc["shape"],
                                             "color": acc["color"], "background": acc["background"],
                                             "probe_all": probe["all"],
                                             "class_accuracy": class_accuracy(pipe, budget)},
               time.perf_counter() - t0, f"{int(acc['n'])} world prompts; probe: {W.COMPOSITIONAL_PROBE.caption()}")


DREAMBOOTH_RUNS = (("lora", False), ("lora", True), ("full", False), ("full", True))


def dreambooth_rows(pipe, budget: Budget, base_class_acc: float, grid: dict,
                    methods: Sequence[tuple[str, bool]] = DREAMBOOTH_RUNS) -> list[Row]:
    """One row per (method, prior preservation) run."""
    bgs = ["white", "gray", "black", "white", "gray"]
    instance = dataset([SUBJECT.replace(background=b) for b in bgs], [INSTANCE_PROMPT] * len(bgs))
    rows = []
    for method, prior in methods:
        lr = budget.db_lr_lora if method == "lora" else budget.db_lr_full
        t0 = time.perf_counter()
        out = run_node(DreamBoothTrain, pipe=pipe, dataset=instance, instance_prompt=INSTANCE_PROMPT,
                       class_prompt=CLASS_PROMPT, method=method, prior_preservation=prior,
                       num_class_images=budget.num_class_images, class_sample_steps=budget.sample_steps,
                       class_cfg=budget.cfg, rank=8, alpha=8.0, train_text_encoder=False,
                       **train_settings(budget, budget.db_steps, lr))
        seconds = time.perf_counter() - t0
        trained = out[0]
        subject = generate(trained, [INSTANCE_PROMPT], budget)
        on_blue = generate(trained, [INSTANCE_PROMPT + " on a blue background"], budget)
        fig = {"subject_fidelity": share(subject, lambda v: v.shape == "star" and v.color == "green"),
               "prompt_fidelity": share(on_blue, lambda v: v.background == "blue"),
               "prompt_subject": share(on_blue, lambda v: v.shape == "star" and v.color == "green")}
        acc = class_accuracy(trained, budget)
        fig["class_accuracy"] = acc
        fig["class_drift_points"] = round(100 * (base_class_acc - acc), 1)
        name = f"DreamBooth {method}, {'with' if prior else 'without'} prior"
        rows.append(Row(name, fig, seconds))
        grid[name] = trained
    return rows


def ti_row(pipe, budget: Budget, grid: dict) -> Row:
    shapes_ = ["triangle", "star", "cross", "triangle", "star", "cross"]
    bgs = ["white", "gray", "black", "gray", "black", "white"]
    specs = [W.Spec(s, TI_COLOR, b) for s, b in zip(shapes_, bgs)]
    captions = [f"a {TI_TOKEN} {s.shape} on a {s.background} background" for s in specs]
    t0 = time.perf_counter()
    emb, with_emb, _, _ = run_node(LearnEmbedding, pipe=pipe, dataset=dataset(specs, captions), token=TI_TOKEN,
                                   initializer="green", num_vectors=1, templates="captions",
                                   **train_settings(budget, budget.ti_steps, budget.ti_lr))
    seconds = time.perf_counter() - t0
    fids = {}
    for shape in ("square", "circle"):
        imgs = generate(with_emb, [f"a {TI_TOKEN} {shape}"], budget)
        fids[shape] = share(imgs, lambda v, shape=shape: v.color == TI_COLOR and v.shape == shape)
    plain = W.Spec("circle", "red", "white").caption()
    b1 = replace(budget, samples=1)
    identical = torch.equal(generate(pipe, [plain], b1), generate(with_emb, [plain], b1))
    grid["Textual Inversion"] = with_emb
    return Row("Textual Inversion (teal)", {"ti_fidelity": (fids["square"] + fids["circle"]) / 2,
                                           "ti_square": fids["square"], "ti_circle": fids["circle"],
                                           "no_token_identical": float(identical)}, seconds)


def lora_row(pipe, budget: Budget, grid: dict) -> Row:
    train_specs = [W.Spec(s, c, b, "striped") for s, c, b in [
        ("circle", "red", "white"), ("square", "blue", "gray"), ("triangle", "yellow", "black"),
        ("circle", "blue", "white"), ("square", "red", "black"), ("triangle", "red", "gray"),
        ("square", "yellow", "white"), ("circle", "yellow", "gray"), ("triangle", "blue", "white"),
        ("circle", "red", "black")]]
    t0 = time.perf_counter()
    lora, _, _, _ = run_node(TrainLoRA, pipe=pipe, dataset=dataset(train_specs, [s.caption() for s in train_specs]),
                             rank=8, alpha=8.0, train_text_encoder=False,
                             **train_settings(budget, budget.lora_steps, budget.lora_lr))
    seconds = time.perf_counter() - t0
    unseen = [W.Spec("star", "purple", "white", "striped"), W.Spec("cross", "orange", "gray", "striped"),
              W.Spec("star", "orange", "black", "striped"), W.Spec("cross", "green", "white", "striped")]
    prompts = [s.caption() for s in unseen]
    b = replace(budget, samples=max(2, budget.samples // 2))
    styled = {}
    for strength in (0.0, 0.5, 1.0):
        p = run_node(AddLoRA, pipe=pipe, lora=lora, strength_unet=strength, strength_text=strength)[0]
        styled[strength] = generate(p, prompts, b)
    base_imgs = generate(pipe, prompts, b)
    striped = {k: share(v, lambda v: v.fill == "striped") for k, v in styled.items()}
    half = float((styled[0.5] - base_imgs).abs().mean() / (styled[1.0] - base_imgs).abs().mean().clamp_min(1e-12))
    grid["LoRA style (striped)"] = run_node(AddLoRA, pipe=pipe, lora=lora, strength_unet=1.0, strength_text=1.0)[0]
    return Row("LoRA style (striped)", {"style_transfer": striped[1.0], "style_half": striped[0.5],
                                       "style_base": share(base_imgs, lambda v: v.fill == "striped"),
                                       "strength0_identical": float(torch.equal(styled[0.0], base_imgs)),
                                       "half_distance_ratio": round(half, 3)}, seconds)


# --------------------------------------------------------------------------------------------------- grid + table
GRID_PROMPTS = ["a sks shape", "a sks shape on a blue background", f"a {TI_TOKEN} square",
                "a striped purple star on a white background", "a red circle on a black background"]


def write_grid(pipe, models: dict, out: Path, budget: Budget) -> Path:
    from PIL import Image

    columns = {"base": pipe, **models}
    b = replace(budget, samples=2)
    rows, labels = [], []
    for prompt in GRID_PROMPTS:
        rows.append(torch.cat([generate(p, [prompt], b, seed0=11) for p in columns.values()]))
        labels.append(prompt)
    grid = image_grid(rows, labels=labels)
    path = out / "grid.png"
    image = Image.fromarray((grid[0].numpy() * 255).round().astype("uint8"))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    atomic_write(out / "grid_columns.txt",
                 lambda tmp: tmp.write_text("columns, 2 seeds each: " + ", ".join(columns) + "\n"))
    return path


def check(row: Row) -> list[str]:
    """Targets this row misses (empty: all met)."""
    f, missed = row.figures, []
    for key in ("subject_fidelity", "prompt_fidelity", "ti_fidelity", "style_transfer"):
        if key in f and f[key] < TARGETS[key]:
            missed.append(f"{key} {f[key]:.0%} < {TARGETS[key]:.0%}")
    drift = f.get("class_drift_points")
    if drift is not None and "with prior" in row.name and drift > TARGETS["class_drift_points"]:
        missed.append(f"class drift {f['class_drift_points']} > {TARGETS['class_drift_points']} points")
    if row.name != "base model (world prompts)" and row.seconds > TARGETS["seconds"]:
        missed.append(f"{row.seconds:.0f} s > {TARGETS['seconds']:.0f} s")
    if f.get("no_token_identical", 1.0) != 1.0:
        missed.append("a prompt without the token changed")
    if f.get("strength0_identical", 1.0) != 1.0:
        missed.append("strength 0 changed the image")
    if "half_distance_ratio" in f and not 0.0 < f["half_distance_ratio"] < 1.0:
        missed.append("strength 0.5 is not between 0 and 1")
    return missed


def _figure(key: str, value: float) -> str:
    if "identical" in key:
        return f"{key} {'yes' if value == 1.0 else 'no'}"
    if isinstance(value, float) and 0 <= value <= 1 and "points" not in key and "ratio" not in key:
        return f"{key} {value:.0%}"
    return f"{key} {value}"


def format_row(r: Row) -> str:
    miss = check(r)
    figs = ", ".join(_figure(k, v) for k, v in r.figures.items())
    return f"{r.name:<34} {r.seconds:6.0f}  {figs}" + (f"  MISSED: {'; '.join(miss)}" if miss else "")


def format_table(rows: Sequence[Row], judge_acc: float) -> str:
    return "\n".join([f"judge accuracy on held-out synthetic images: {judge_acc:.1%}", "",
                      f"{'run':<34} {'s':>6}  figures", "-" * 100, *map(format_row, rows)])


def run(budget: Budget = FULL, only: Sequence[str] = ("dreambooth", "ti", "lora"), out: Path | None = None,
        log: Callable[[str], None] = print) -> dict:
    pipe = run_node(LoadBase, ckpt_name=SHAPES_NAME)[0]
    judge_acc = judge_evaluate(per_spec=1)["all"]
    rows = [base_row(pipe, budget)]
    log(format_table(rows, judge_acc))
    grid_models: dict = {}
    if "dreambooth" in only:
        new = dreambooth_rows(pipe, budget, rows[0].figures["class_accuracy"], grid_models)
        rows += new
        log("\n".join(map(format_row, new)))
    if "ti" in only:
        rows.append(ti_row(pipe, budget, grid_models))
        log(format_row(rows[-1]))
    if "lora" in only:
        rows.append(lora_row(pipe, budget, grid_models))
        log(format_row(rows[-1]))
    result = {"judge_accuracy": judge_acc, "budget": asdict(budget), "targets": TARGETS,
              "rows": [{**asdict(r), "missed": check(r)} for r in rows]}
    if out is not None:
        result["grid"] = str(write_grid(pipe, grid_models, out, budget))
    result["table"] = format_table(rows, judge_acc)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench-out", help="folder for grid.png (default: bench-out)")
    p.add_argument("--fast", action="store_true", help="the tests' budget: fewer steps and samples")
    p.add_argument("--only", default="dreambooth,ti,lora")
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("comfy_finetune").setLevel(logging.WARNING)
    result = run(FAST if args.fast else FULL, [s.strip() for s in args.only.split(",")], Path(args.out))
    print()
    print(result["table"])
    print(f"\ngrid: {result.get('grid')}")
    if args.json:
        atomic_write(args.json, lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
