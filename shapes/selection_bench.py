"""Does keeping the best-scoring checkpoint pick a good one? In-loop selection on the personalization benchmark.

    python benchmarks/selection.py [--out DIR] [--seeds 1] [--fast] [--only dreambooth,ti,lora]

(``benchmarks/selection.py`` runs this module's :func:`main`.)

Every concept of the personalization benchmark (:mod:`.personalization`: its datasets, prompts and node calls) is
trained through the pack's nodes at their defaults (``recipe: auto``), with a ``scorer``: DreamBooth full and
DreamBooth LoRA on each ``"subject"``, Textual Inversion on each ``"colour"``, a style LoRA on each ``"fill"``. The
trainer scores the model before training (step 0), every ``interval`` steps and at the last step, and returns the
best-scoring checkpoint; with ``every: 0`` (the default) the loop chooses the interval that keeps scoring within
about 15 % of the training time, from the first evaluation's and the first training steps' seconds.

Each run (concept, method, training seed) trains twice from the same seed (training is deterministic in it):

1. **the user's run**, with the in-loop scorer alone: what a user would wire (a Shapes Judge scorer node, measure
   ``fidelity``, samples 4, every 0, seed 0). Its target names the concept (DreamBooth ``"<colour> <shape>"``, TI
   the colour word, style LoRA the fill word) and its prompts are a few of the benchmark's measured prompts
   (DreamBooth ``"a sks shape"`` and two backgrounds, one trained on and the held-out one; TI two test prompts;
   style two test prompts). It gives the **overhead**, ``result.selection.seconds / result.training_seconds`` (the
   loop's time spent scoring over its time spent training; class-image generation and set-up excluded; target
   <= 15 %), and the interval the loop chose.
2. **the judged run**: the same in-loop scorer combined (Combine Scorers) with an independent part of weight 0
   (reported, never chooses), at the interval the user's run chose (the independent part's samples would make the
   automatic interval longer). It evaluates at the same steps with the same in-loop scores, so it keeps the same
   step (checked: the steps and the kept step are compared with the user's run and reported).

**The independent figure** is the personalization benchmark's own figure on all of its prompts for the method,
with its own seeds (5000, 6000, ... a prompt) and the benchmark's sample count (8; ``--fast`` 4): DreamBooth the
mean of subject fidelity (``"a sks shape"`` judged the subject's shape and colour) and prompt fidelity (``"a sks
shape on a <b> background"``, every allowed ``<b>``, judged the subject on ``<b>``); TI colour, shape and
background right on ``"a <token> <shape> on a <b> background"`` for the unseen shapes and every background; style
the share of samples in the fill on the four style test prompts (the fill alone, as the benchmark's style
transfer). The trainer draws one probe per distinct prompt text, and two parts asking for the same prompt would
share its samples (``Combined.probes``), so the independent part writes its prompts with a capital first letter:
the CLIP tokenizer lowercases, so the model sees the same tokens (checked bit for bit at the start), and its
samples come from its own seeds.

From the judged run's ``result.selection.history``: **kept** = the independent figure at the best step, **last** =
at the last evaluated step, **oracle** = its maximum over every evaluated step (step 0 included); the in-loop score
at each. Targets (:data:`TARGETS`): kept >= last on every run, the mean of oracle - kept at most 3 points, and the
overhead at most 15 % on every run.

The validation sampling settings, which the scorer samples with, are set to the benchmark's (64 px, euler /
normal, its sampling steps and CFG 5); everything else is the node's default. The TrainResult of each run is the
one the node hands to its loss plot (captured there, :func:`captured`). ``--out`` writes ``results.json``, one
loss-and-score plot per run (``curves/``) and all of them in ``curves.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from PIL import Image

from comfy_finetune.core.atomic import atomic_write
from comfy_finetune.core.loading import SHAPES_NAME
from comfy_finetune.nodes import dreambooth as dreambooth_nodes
from comfy_finetune.nodes import embedding_training as embedding_nodes
from comfy_finetune.nodes import training as training_nodes
from comfy_finetune.nodes.dreambooth import DreamBoothTrain
from comfy_finetune.nodes.embedding_training import LearnEmbedding
from comfy_finetune.nodes.generation import LoadBase
from comfy_finetune.nodes.scoring import CombineScorers, ScoreWithJudge
from comfy_finetune.nodes.training import TrainLoRA
from comfy_finetune.scoring.scorers import FIDELITY, Evaluation, Probe, Score, Scorer
from comfy_finetune.shapes import personalization as P
from comfy_finetune.shapes import world as W
from comfy_finetune.shapes.judge import load_judge
from comfy_finetune.shapes.train_base import sample_prompts
from comfy_finetune.training import recipes
from comfy_finetune.training.loop import TrainResult
from comfy_finetune.training.plots import image_grid, loss_plot

TARGETS = {"kept_vs_last_points": 0.0, "mean_oracle_gap_points": 3.0, "overhead_percent": 15.0}
INDEPENDENT = "independent"
INDEPENDENT_SEED = 5000
INLOOP_SAMPLES = 4
METHODS = {"dreambooth": ("DreamBooth full", "DreamBooth lora"), "ti": ("Textual Inversion",),
           "lora": ("LoRA style",)}


# --------------------------------------------------------------------------------------------------- scorers
Expected = tuple[tuple[str, str], ...]  # (judge attribute, value) pairs a sample must show


@dataclass(frozen=True)
class Independent(Scorer):
    """The personalization benchmark's figure as a scorer part: ``groups`` of (figure name, ((prompt, expected
    attributes), ...)); a figure is the mean share over its prompts of samples showing every expected attribute,
    the value the mean of the figures. Metrics: ``independent`` and, with several figures, ``independent <name>``."""

    groups: tuple[tuple[str, tuple[tuple[str, Expected], ...]], ...] = ()
    samples: int = 8
    seed: int = INDEPENDENT_SEED
    node: str = "selection benchmark"

    def prompt_list(self) -> list[str]:
        return [p for _, items in self.groups for p, _ in items]

    def probes(self) -> tuple[Probe, ...]:
        return tuple(Probe(p, self.samples, self.seed + 1000 * i) for i, p in enumerate(self.prompt_list()))

    def bind(self, references: Sequence[torch.Tensor], *, node: str) -> Callable[[Evaluation], Score]:
        judge = load_judge()

        def score(ev: Evaluation) -> Score:
            figures = {}
            for name, items in self.groups:
                shares = []
                for prompt, want in items:
                    verdicts = judge(ev.images[prompt])
                    shares.append(sum(all(getattr(v, a) == x for a, x in want) for v in verdicts)
                                  / max(1, len(verdicts)))
                figures[name] = sum(shares) / len(shares)
            value = sum(figures.values()) / len(figures)
            extra = {f"{INDEPENDENT} {k}": v for k, v in figures.items()} if len(figures) > 1 else {}
            return Score(value, {INDEPENDENT: value, **extra})

        return score

    def describe(self) -> str:
        return f"{INDEPENDENT} benchmark figure on {len(self.prompt_list())} prompt(s) x {self.samples}"


def capital(prompt: str) -> str:
    """The same prompt for the tokenizer (it lowercases), another probe for the trainer (a distinct text)."""
    return prompt[:1].upper() + prompt[1:]


def on_background(prefix: str, b: str) -> str:
    return f"{prefix} on {P.article(b)} {b} background"


@dataclass(frozen=True)
class Task:
    """One concept and method: what trains it, what the user's scorer watches, what the benchmark measures."""

    what: str          # dreambooth / ti / lora
    method: str        # the row's method name
    concept: W.HeldOut
    target: str        # the in-loop scorer's target
    prompts: tuple[str, ...]  # the in-loop scorer's prompts
    groups: tuple[tuple[str, tuple[tuple[str, Expected], ...]], ...]  # the independent figure (lowercase prompts)

    def inloop(self, every: int = 0) -> Scorer:
        return P.run_node(ScoreWithJudge, measure=FIDELITY, target=self.target, prompts="\n".join(self.prompts),
                          samples=INLOOP_SAMPLES, every=every, patience=0, seed=0)[0]

    def steps(self, budget: P.Budget) -> int:
        """The run's training steps: the budget's, else the shapes-tiny recipe's."""
        trainer, given = {"dreambooth": (f"dreambooth_{self.method.split()[-1]}", budget.db),
                          "ti": ("embedding", budget.ti), "lora": ("lora", budget.lora)}[self.what]
        return int(given.get("steps") or recipes.TABLE["shapes-tiny"][trainer]["steps"])

    def independent(self, samples: int) -> Independent:
        groups = tuple((name, tuple((capital(p), want) for p, want in items)) for name, items in self.groups)
        return Independent(groups=groups, samples=samples)

    def judged(self, samples: int, every: int) -> Scorer:
        """The in-loop scorer with the independent part (weight 0), scoring every ``every`` steps."""
        return P.run_node(CombineScorers, scorer_a=self.inloop(), weight_a=1.0, floor_a=0.0, every=every,
                          patience=0, scorer_b=self.independent(samples), weight_b=0.0, floor_b=0.0)[0]


def dreambooth_task(concept: W.HeldOut, method: str) -> Task:
    subject = P.subject_spec(concept)
    bgs = P.allowed_backgrounds(subject.color)
    trained_bg, held_out_bg = P.instance_backgrounds(concept)[0], bgs[-1]
    is_subject = (("shape", subject.shape), ("color", subject.color))
    groups = (("subject", ((P.INSTANCE_PROMPT, is_subject),)),
              ("prompt", tuple((on_background(P.INSTANCE_PROMPT, b), (*is_subject, ("background", b)))
                               for b in bgs)))
    prompts = (P.INSTANCE_PROMPT, on_background(P.INSTANCE_PROMPT, trained_bg),
               on_background(P.INSTANCE_PROMPT, held_out_bg))
    return Task("dreambooth", f"DreamBooth {method}", concept, f"{subject.color} {subject.shape}", prompts, groups)


def ti_task(concept: W.HeldOut) -> Task:
    token, bgs = P.ti_token(concept), P.allowed_backgrounds(concept.color)
    items = tuple((on_background(f"a {token} {shape}", b), (("color", concept.color), ("shape", shape),
                                                           ("background", b)))
                  for shape in P.TI_TEST_SHAPES for b in bgs)
    prompts = (on_background(f"a {token} {P.TI_TEST_SHAPES[0]}", bgs[0]),
               on_background(f"a {token} {P.TI_TEST_SHAPES[1]}", bgs[-1]))
    return Task("ti", "Textual Inversion", concept, concept.color, prompts, (("ti", items),))


def lora_task(concept: W.HeldOut) -> Task:
    captions = [W.Spec(s, c, b, concept.fill).caption() for s, c, b in P.STYLE_TEST]
    items = tuple((c, (("fill", concept.fill),)) for c in captions)
    return Task("lora", "LoRA style", concept, concept.fill, tuple(captions[:2]), (("style", items),))


def tasks(only: Sequence[str]) -> list[Task]:
    out: list[Task] = []
    if "dreambooth" in only:
        out += [dreambooth_task(c, m) for c in W.concepts("subject") for m in ("full", "lora")]
    if "ti" in only:
        out += [ti_task(c) for c in W.concepts("colour")]
    if "lora" in only:
        out += [lora_task(c) for c in W.concepts("fill")]
    return out


def check_case_blind(pipe, task_list: Sequence[Task]) -> None:
    """The independent prompts' premise: a capital first letter gives the same image bit for bit."""
    for task in task_list:
        prompt = task.groups[0][1][0][0]
        images = sample_prompts(pipe, [prompt, capital(prompt)], [0, 0], steps=2)
        if not torch.equal(images[0], images[1]):
            raise RuntimeError(f"'{prompt}' and '{capital(prompt)}' sample differently: the independent part "
                               "would not measure the same prompts")


# --------------------------------------------------------------------------------------------------- training
@contextlib.contextmanager
def captured() -> Iterator[list[TrainResult]]:
    """The TrainResult of every trainer node run in the block, as each node hands it to its loss plot."""
    results: list[TrainResult] = []
    original = training_nodes.outputs_for

    def keep(result: TrainResult) -> tuple:
        results.append(result)
        return original(result)

    with contextlib.ExitStack() as stack:
        for module in (dreambooth_nodes, embedding_nodes, training_nodes):
            stack.enter_context(mock.patch.object(module, "outputs_for", keep))
        yield results


def validation_inputs(budget: P.Budget) -> dict:
    """The sampling settings the scorer samples with: the benchmark's."""
    return {"validation_size": P.SIZE, "validation_steps": budget.sample_steps, "validation_cfg": budget.cfg,
            "validation_sampler": "euler", "validation_scheduler": "normal"}


def train(pipe, task: Task, seed: int, budget: P.Budget, scorer: Scorer) -> tuple[TrainResult, float]:
    """Train ``task``'s concept through its node with ``scorer``; the TrainResult and the node's wall seconds."""
    concept, val = task.concept, validation_inputs(budget)
    t0 = time.perf_counter()
    with captured() as results:
        if task.what == "dreambooth":
            subject = P.subject_spec(concept)
            bgs = P.instance_backgrounds(concept)
            specs = [subject.replace(background=bgs[i % len(bgs)]) for i in range(5)]
            P.run_node(DreamBoothTrain, pipe=pipe, dataset=P.dataset(specs, [P.INSTANCE_PROMPT] * len(specs)),
                       instance_prompt=P.INSTANCE_PROMPT, class_prompt=P.CLASS_PROMPT,
                       method=task.method.split()[-1], seed=seed, scorer=scorer, **val, **budget.db)
        elif task.what == "ti":
            token, bgs = P.ti_token(concept), P.allowed_backgrounds(concept.color)[:-1]
            specs = [W.Spec(s, concept.color, bgs[i % len(bgs)]) for i, s in enumerate(P.TI_TRAIN_SHAPES * 2)]
            captions = [on_background(f"a {token} {s.shape}", s.background) for s in specs]
            P.run_node(LearnEmbedding, pipe=pipe, dataset=P.dataset(specs, captions), token=token, seed=seed,
                       scorer=scorer, **val, **budget.ti)
        else:
            specs = [W.Spec(s, c, b, concept.fill) for s, c, b in P.STYLE_TRAIN]
            P.run_node(TrainLoRA, pipe=pipe, dataset=P.dataset(specs, [s.caption() for s in specs]), seed=seed,
                       scorer=scorer, **val, **budget.lora)
    if len(results) != 1 or results[0].selection is None:
        raise RuntimeError(f"{task.method} {concept.name}: expected one scored TrainResult, got {len(results)}")
    return results[0], time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------- figures
@dataclass
class Run:
    """One run: the judged run's selection figures (shares 0..1) and the user's run (``user``: its overhead,
    interval, in-loop scores and kept step, and whether the judged run matched them)."""

    method: str
    concept: str
    seed: int
    steps: int
    interval: int
    best_step: int
    last_step: int
    oracle_step: int
    inloop: dict[str, float]        # the in-loop score at best / last / oracle
    independent: dict[str, float]   # the independent figure at best (kept) / last / oracle
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    scoring_seconds: float = 0.0    # the judged run (both parts)
    training_seconds: float = 0.0
    node_seconds: float = 0.0
    user: dict[str, Any] = field(default_factory=dict)  # the user's run: overhead, steps, kept step

    @property
    def overhead(self) -> float:
        return self.user["overhead_percent"]

    @property
    def same_as_user(self) -> bool:
        """The judged run evaluated at the user's steps, with the same in-loop scores, and kept the same step."""
        return bool(self.user["same_steps"] and self.user["same_scores"] and self.user["same_best_step"])

    @property
    def kept_minus_last(self) -> float:
        return 100.0 * (self.independent["kept"] - self.independent["last"])

    @property
    def oracle_gap(self) -> float:
        return 100.0 * (self.independent["oracle"] - self.independent["kept"])


def figures(task: Task, seed: int, result: TrainResult, seconds: float, user: TrainResult,
            user_seconds: float, every: int) -> Run:
    """The run's figures; ``every`` is the interval both runs scored at (chosen by the loop or fixed)."""
    sel = result.selection
    history = [(step, score) for step, score in sel.history]
    indep = {step: float(score.metrics[INDEPENDENT]) for step, score in history}
    inloop = {step: float(score.value) for step, score in history}
    last = history[-1][0]
    oracle = max(indep, key=lambda s: (indep[s], -s))  # the earliest of the best
    best = sel.best_step
    curves = {"in-loop": [(s, inloop[s]) for s, _ in history],
              **{k: v for k, v in sel.curves().items() if k.startswith(INDEPENDENT)}}
    u = user.selection
    user_scores = [(step, float(score.value)) for step, score in u.history]
    return Run(task.method, task.concept.name, seed, result.steps_done, every,
               best, last, oracle, {"best": inloop[best], "last": inloop[last], "oracle": inloop[oracle]},
               {"kept": indep[best], "last": indep[last], "oracle": indep[oracle]}, curves, sel.seconds,
               result.training_seconds, seconds,
               {"overhead_percent": 100.0 * u.seconds / user.training_seconds if user.training_seconds > 0
                else math.nan, "scoring_seconds": u.seconds, "training_seconds": user.training_seconds,
                "node_seconds": user_seconds, "interval": u.interval, "steps": user.steps_done,
                "best_step": u.best_step, "scores": user_scores,
                "same_steps": [s for s, _ in user_scores] == [s for s, _ in history],
                "same_scores": user_scores == [(s, inloop[s]) for s, _ in history],
                "same_best_step": u.best_step == best})


def plot(run: Run, result: TrainResult) -> torch.Tensor:
    return loss_plot(result.losses, lrs=result.lrs, title=f"{run.method}, {run.concept}, seed {run.seed}",
                     scores=run.curves, best=(run.best_step, run.inloop["best"]), primary="in-loop")


def pct(x: float) -> str:
    return f"{100 * x:.0f}"


HEADER = (f"{'method':<18} {'concept':<11} {'seed':>4} {'steps':>5} {'every':>5} {'best':>5} {'in-loop':>7} "
          f"{'kept':>5} {'last':>5} {'oracle':>6} {'@step':>5} {'kept-last':>9} {'oracle-kept':>11} "
          f"{'score s':>7} {'train s':>7} {'overhead':>8} {'same':>4}")


def format_run(r: Run) -> str:
    return (f"{r.method:<18} {r.concept:<11} {r.seed:>4} {r.steps:>5} {r.interval:>5} {r.best_step:>5} "
            f"{pct(r.inloop['best']):>6}% {pct(r.independent['kept']):>4}% {pct(r.independent['last']):>4}% "
            f"{pct(r.independent['oracle']):>5}% {r.oracle_step:>5} {r.kept_minus_last:>+9.1f} "
            f"{r.oracle_gap:>11.1f} {r.user['scoring_seconds']:>7.1f} {r.user['training_seconds']:>7.1f} "
            f"{r.overhead:>7.1f}% {'yes' if r.same_as_user else 'NO':>4}")


def summary(runs: Sequence[Run]) -> dict[str, Any]:
    """Means over runs and whether each target is met."""
    if not runs:
        return {}
    n = len(runs)
    mean = {k: sum(r.independent[k] for r in runs) / n for k in ("kept", "last", "oracle")}
    gap = sum(r.oracle_gap for r in runs) / n
    below = [f"{r.method} {r.concept} seed {r.seed}" for r in runs if r.kept_minus_last < 0]
    overheads = [r.overhead for r in runs]
    over = [f"{r.method} {r.concept} seed {r.seed}" for r in runs if not r.overhead <= TARGETS["overhead_percent"]]
    return {"runs": n, "mean_kept": mean["kept"], "mean_last": mean["last"], "mean_oracle": mean["oracle"],
            "mean_kept_minus_last_points": sum(r.kept_minus_last for r in runs) / n,
            "mean_oracle_gap_points": gap, "kept_below_last": below, "kept_ge_last_met": not below,
            "oracle_gap_met": gap <= TARGETS["mean_oracle_gap_points"],
            "overhead_percent": overheads, "mean_overhead_percent": sum(overheads) / n,
            "max_overhead_percent": max(overheads), "overhead_over_target": over, "overhead_met": not over,
            "same_as_user": sum(r.same_as_user for r in runs)}


def format_table(runs: Sequence[Run], s: dict[str, Any]) -> str:
    lines = ["every = the interval both runs scored at (chosen by the loop, or --evaluations); in-loop = its score "
             "at the kept step (best); kept / last / oracle = the independent",
             "benchmark figure at the kept step, the last evaluated step and its best step (@step), in %; points = "
             "percentage points; score s / train s / overhead: the user's run (scorer alone); same = the judged run "
             "scored the same steps and kept the same step", "",
             HEADER, "-" * len(HEADER), *map(format_run, runs)]
    if not s:
        return "\n".join(lines)
    yes = {True: "met", False: "MISSED"}
    lines += ["", f"means over {s['runs']} run(s): kept {pct(s['mean_kept'])}%, last {pct(s['mean_last'])}%, oracle "
                  f"{pct(s['mean_oracle'])}%; kept - last {s['mean_kept_minus_last_points']:+.1f} points, oracle - "
                  f"kept {s['mean_oracle_gap_points']:.1f} points",
              f"target kept >= last on every run: {yes[s['kept_ge_last_met']]}"
              + (f" (below on: {'; '.join(s['kept_below_last'])})" if s["kept_below_last"] else ""),
              f"target mean(oracle - kept) <= {TARGETS['mean_oracle_gap_points']:g} points: "
              f"{yes[s['oracle_gap_met']]} ({s['mean_oracle_gap_points']:.1f})",
              f"target scoring overhead <= {TARGETS['overhead_percent']:g} % on every run (in-loop scorer alone, "
              f"automatic interval): {yes[s['overhead_met']]} (mean {s['mean_overhead_percent']:.1f} %, max "
              f"{s['max_overhead_percent']:.1f} %)"
              + (f"; over on: {'; '.join(s['overhead_over_target'])}" if s["overhead_over_target"] else ""),
              f"judged runs that scored the user's steps with the same in-loop scores and kept the same step: "
              f"{s['same_as_user']} of {s['runs']}"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- run
def write_png(path: Path, image: torch.Tensor) -> None:
    picture = Image.fromarray((image[0].clamp(0, 1).numpy() * 255).round().astype("uint8"))
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def run(budget: P.Budget, only: Sequence[str], out: Path | None = None, independent_samples: int | None = None,
        log: Callable[[str], None] = print, evaluations: int = 0) -> dict[str, Any]:
    """``evaluations`` 0: the scorer's automatic interval (its default); K: every steps // K steps instead."""
    t_start = time.perf_counter()
    pipe = P.run_node(LoadBase, ckpt_name=SHAPES_NAME)[0]
    task_list = tasks(only)
    check_case_blind(pipe, task_list)
    samples = independent_samples or budget.samples
    log(f"in-loop scorer: {INLOOP_SAMPLES} samples per prompt, seed 0; independent part: {samples} samples per "
        f"prompt, seeds from {INDEPENDENT_SEED}; sampling {budget.sample_steps} steps, CFG {budget.cfg:g}")
    log(HEADER)
    runs: list[Run] = []
    plots: list[torch.Tensor] = []
    for task in task_list:
        for seed in budget.seeds:
            fixed = max(1, task.steps(budget) // evaluations) if evaluations else 0
            user, user_seconds = train(pipe, task, seed, budget, task.inloop(fixed))
            every = fixed or user.selection.interval or user.steps_done
            result, seconds = train(pipe, task, seed, budget, task.judged(samples, every))
            r = figures(task, seed, result, seconds, user, user_seconds, every)
            runs.append(r)
            log(format_run(r))
            if out is not None:
                image = plot(r, result)
                plots.append(image)
                name = f"{r.method}-{r.concept}-seed{r.seed}".replace(" ", "_")
                write_png(out / "curves" / f"{name}.png", image)
    s = summary(runs)
    result_json: dict[str, Any] = {
        "budget": asdict(budget), "targets": TARGETS, "independent_samples": samples,
        "inloop_samples": INLOOP_SAMPLES, "only": list(only),
        "runs": [{**asdict(r), "kept_minus_last_points": r.kept_minus_last, "oracle_gap_points": r.oracle_gap,
                  "overhead_percent": r.overhead, "same_as_user": r.same_as_user} for r in runs],
        "summary": s, "seconds": time.perf_counter() - t_start}
    result_json["table"] = format_table(runs, s)
    if out is not None:
        if plots:
            width = max(p.shape[2] for p in plots)
            padded = [torch.nn.functional.pad(p, (0, 0, 0, width - p.shape[2])) for p in plots]
            write_png(out / "curves.png", image_grid([torch.cat(padded[i:i + 2]) for i in range(0, len(padded), 2)]))
        atomic_write(out / "results.json", lambda tmp: tmp.write_text(json.dumps(result_json, indent=1)))
    return result_json


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="folder for results.json and the curves (default: none)")
    p.add_argument("--fast", action="store_true", help="the personalization tests' budget (FAST)")
    p.add_argument("--seeds", type=int, default=1, help="training seeds per concept (default 1)")
    p.add_argument("--only", default="dreambooth,ti,lora")
    p.add_argument("--independent-samples", type=int, default=None,
                   help="samples per prompt of the independent figure (default: the budget's, 8; --fast 4)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--evaluations", type=int, default=0,
                   help="score every steps // K steps instead of the automatic interval (default 0: automatic)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("comfy_finetune").setLevel(logging.WARNING)
    budget = replace(P.FAST if args.fast else P.FULL, seeds=tuple(range(args.seeds)))
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in METHODS]
    if unknown:
        p.error(f"unknown --only {', '.join(unknown)}; use {', '.join(METHODS)}")
    out = Path(args.out) if args.out else None
    result = run(budget, only, out, args.independent_samples,
                 log=lambda line: print(line, flush=True), evaluations=args.evaluations)
    print()
    print(result["table"])
    print(f"\n{result['seconds'] / 60:.1f} minutes" + (f"; results in {out}" if out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
