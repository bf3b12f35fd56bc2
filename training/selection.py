"""Keeping the best checkpoint: the scores of a run, the best-scoring trainable state, and when to stop early.

The loop (:mod:`.loop`) evaluates the model before the first step and every ``interval`` steps after (and at the
last step), offers each :class:`~..scoring.scorers.Score` here with a way to copy the trainable state, and asks
:meth:`Selection.should_stop` whether ``patience`` evaluations have passed without a better score. Only an
checkpoint to keep copies the state (to the CPU; nothing aliases the live tensors), so at most one copy besides the
live weights is ever held.

Which checkpoint is kept: the latest one whose score is within noise of the highest so far
(:func:`~..scoring.scorers.within_noise`: at most one standard error of the difference below it; a tie when the
scorer reports no standard error). When the scorer cannot tell two checkpoints apart, the result is what training
without a scorer would have given; an earlier checkpoint is kept only when it scored clearly higher. (The highest of
several noisy scores is often a lucky one: in the selection benchmark at 5 evaluations, DreamBooth LoRA's judge
scored 67 % at step 200 and 58 % at 250 on 12 samples, and the benchmark's own figure on 8 x more samples was 34 %
at 200 and 44 % at 250; and the Textual Inversion of pink scored 0 before training and after, where keeping the
earlier had kept the untrained token.) Only a strictly higher score counts as an improvement for ``patience``.

What survives a cancel or a crash is split in two: the score history, the best step and its score ride in the
resumable checkpoint (:meth:`to_state`), and the best weights go to a file of their own beside it
(:func:`best_path`), written only when the best changed since the last write: so the output folder never holds
more than the latest and the best state of a run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..scoring.scorers import Score, better, within_noise


def best_path(checkpoint: Path) -> Path:
    """``<kind>-<key>.pt`` -> ``<kind>-<key>.best.pt``."""
    return checkpoint.with_name(checkpoint.stem + ".best" + checkpoint.suffix)


def _cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


@dataclass
class Selection:
    """The scores so far and the best state. ``history``: (step, score) in evaluation order."""

    history: list[tuple[int, Score]] = field(default_factory=list)
    best_step: int | None = None
    best: Score | None = None
    best_state: dict[str, torch.Tensor] | None = None
    written_step: int | None = None  # the best step whose state is on disk
    seconds: float = 0.0  # spent scoring
    scorer: str = ""  # what scores (the scorer's description): a resumed run with another scorer starts afresh
    interval: int | None = None  # the automatic interval once chosen
    evaluation_seconds: float | None = None  # the last evaluation's
    peak_step: int | None = None  # the first step with the highest score (the kept one is it or a later one)
    peak: Score | None = None

    @property
    def first(self) -> dict[str, float] | None:
        return dict(self.history[0][1].metrics) if self.history else None

    @property
    def since_best(self) -> int:
        """Evaluations after the last strict improvement."""
        if self.peak_step is None:
            return 0
        return sum(1 for s, _ in self.history if s > self.peak_step)

    def offer(self, step: int, score: Score, state: Callable[[], dict[str, torch.Tensor]]) -> bool:
        """Record ``score`` at ``step``; copy ``state()`` if it is the highest so far or within noise of it (the
        later is kept). Returns whether it is strictly better than every earlier one."""
        self.history.append((step, score))
        improved = better(score, self.peak)
        if improved:
            self.peak_step, self.peak = step, score
        if improved or within_noise(score, self.peak):
            self.best_step, self.best, self.best_state = step, score, _cpu_copy(state())
        return improved

    def _find_peak(self) -> None:
        self.peak_step = self.peak = None
        for step, score in self.history:
            if better(score, self.peak):
                self.peak_step, self.peak = step, score

    def should_stop(self, patience: int) -> bool:
        return patience > 0 and self.since_best >= patience

    def truncate(self, step: int) -> None:
        """Forget evaluations after ``step`` (a NaN rollback went back there); the best state stays if it is later:
        it was a good state when it was scored."""
        self.history = [(s, sc) for s, sc in self.history if s <= step or s == self.best_step]
        self._find_peak()

    # ------------------------------------------------------------------ curves
    def curves(self) -> dict[str, list[tuple[int, float]]]:
        """Every metric as a (step, value) series, plus ``score`` (the value that chooses) when it is not one."""
        out: dict[str, list[tuple[int, float]]] = {}
        for step, score in self.history:
            if "score" not in score.metrics:
                out.setdefault("score", []).append((step, score.value))
            for name, value in score.metrics.items():
                out.setdefault(name, []).append((step, float(value)))
        return out

    # ------------------------------------------------------------------ persistence
    def to_state(self) -> dict[str, Any]:
        """What the resumable checkpoint carries (no weights)."""
        return {"selection": {"history": [[s, sc.value, dict(sc.metrics), sc.shortfall, sc.stderr]
                                          for s, sc in self.history],
                              "best_step": self.best_step, "seconds": self.seconds, "scorer": self.scorer,
                              "interval": self.interval}}

    def load_state(self, state: dict[str, Any], best_file: Path | None,
                   load: Callable[[Path], dict]) -> str | None:
        """Restore from a checkpoint's ``selection`` and the best file; returns a warning when the best weights are
        missing (the history is kept, the best starts again from the next evaluation)."""
        sel = state.get("selection")
        if not sel:
            return None
        if sel.get("scorer", "") != self.scorer:
            return (f"the checkpoint was scored by {sel.get('scorer') or 'another scorer'}, not {self.scorer}: its "
                    "scores are dropped and the best is chosen afresh from the next evaluation on")
        self.history = [(int(s), Score(float(v), {str(k): float(x) for k, x in m.items()}, float(sh),
                                       float(rest[0]) if rest else 0.0))  # checkpoints before stderr: 0
                        for s, v, m, sh, *rest in sel["history"]]
        self._find_peak()
        self.seconds = float(sel.get("seconds", 0.0))
        self.interval = sel.get("interval")
        step = sel.get("best_step")
        if step is None:
            return None
        found = None
        if best_file is not None and best_file.exists():
            saved = load(best_file)
            if int(saved.get("step", -1)) == int(step):
                found = saved["trainable"]
        if found is None:
            return (f"the best checkpoint of step {step} is missing, so the best is chosen again from the next "
                    "evaluation on")
        self.best_step = int(step)
        self.best = next(sc for s, sc in self.history if s == self.best_step)
        self.best_state, self.written_step = found, self.best_step
        return None

    def needs_write(self) -> bool:
        return self.best_state is not None and self.written_step != self.best_step

    def file_state(self) -> dict[str, Any]:
        return {"step": self.best_step, "score": self.best.value if self.best else None,
                "trainable": self.best_state}
