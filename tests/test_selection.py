"""Keeping the best checkpoint in the loop: a toy objective, scripted scores (no models).

The score of the toy is a function of its weight, so which state the loop ends with says which checkpoint it kept.
Covered: the best state is returned (not the last), ties keep the later, early stop after ``patience``
evaluations, cancel writes the latest and the best, resume restores both, a NaN rollback truncates the scores,
and a combination ranks checkpoints below their floors last.
"""

from __future__ import annotations

import math

import pytest
import torch

from comfy_finetune import host
from comfy_finetune.core.errors import Interrupted
from comfy_finetune.scoring.scorers import (
    Combined,
    Evaluation,
    Part,
    Score,
    Scorer,
    better,
    expected_attributes,
    mean_stderr,
    proportion_stderr,
    within_noise,
)
from comfy_finetune.training import loop
from comfy_finetune.training.selection import Selection, best_path
from comfy_finetune.training.settings import TrainSettings

CPU = torch.device("cpu")


class _Walk:
    """One weight that grows by about lr every step (sign-Adam on a linear loss): w ~= lr * step."""

    def __init__(self) -> None:
        self.w = torch.nn.Parameter(torch.zeros(1))

    def param_groups(self):
        return [{"params": [self.w]}]

    def loss(self, step, batch, generator):
        return -self.w.sum()

    def trainable_state(self):
        return {"w": self.w.detach()}

    def load_trainable_state(self, state):
        with torch.no_grad():
            self.w.copy_(state["w"])


def _peak_at(objective: _Walk, peak: float, calls: list | None = None):
    """A score that rises until w reaches ``peak`` and falls after (over-training)."""

    def evaluate(step, first):
        w = float(objective.w.detach())
        if calls is not None:
            calls.append((step, first))
        return Score(-abs(w - peak), {"closeness": -abs(w - peak), "w": w}), None

    return evaluate


def _settings(steps=20, **kw) -> TrainSettings:
    return TrainSettings(steps=steps, learning_rate=0.1, optimizer="adamw", **kw)


def _batches(first):
    while True:
        yield None


def test_the_loop_returns_the_best_scoring_state_not_the_last():
    obj = _Walk()
    calls = []
    scoring = loop.Scoring(_peak_at(obj, 0.8, calls), interval=4, name="peak")
    result = loop.train(obj, _batches, _settings(20), node="T", device=CPU, scoring=scoring)
    steps = [s for s, _ in result.selection.history]
    assert steps == [0, 4, 8, 12, 16, 20]  # before training, every 4 steps, and the last
    assert calls[0][1] is None and calls[1][1] == {"closeness": pytest.approx(-0.8), "w": 0.0}  # first = baseline
    assert result.best_step == 8  # w ~ 0.8 there
    assert float(obj.w.detach()) == pytest.approx(0.8, abs=0.05)  # the kept state, not the last (w ~ 2.0)
    assert result.steps_done == 20 and result.stopped_early_at is None
    summary = result.score_summary()
    assert "kept step 8" in summary and "last: step 20" in summary and "scoring" in summary
    curves = result.selection.curves()
    assert [s for s, _ in curves["score"]] == steps and set(curves) == {"score", "closeness", "w"}


def test_patience_stops_early_and_keeps_the_best():
    obj = _Walk()
    scoring = loop.Scoring(_peak_at(obj, 0.4, None), interval=2, patience=3, name="peak")
    result = loop.train(obj, _batches, _settings(40), node="T", device=CPU, scoring=scoring)
    assert result.best_step == 4
    assert result.stopped_early_at == 10  # evaluations at 6, 8, 10 were not better
    assert result.steps_done == 10 and len(result.losses) == 10
    assert float(obj.w.detach()) == pytest.approx(0.4, abs=0.05)


def test_ties_keep_the_later_checkpoint_count_as_no_improvement_and_nan_ranks_last():
    sel = Selection()
    assert sel.offer(0, Score(0.5), lambda: {"w": torch.ones(1)})
    assert not sel.offer(1, Score(0.5), lambda: {"w": torch.full((1,), 2.0)})  # a tie: kept, but no improvement
    assert not sel.offer(2, Score(math.nan), lambda: {"w": torch.zeros(1)})
    assert sel.best_step == 1 and float(sel.best_state["w"]) == 2.0
    assert sel.since_best == 2 and sel.should_stop(2) and not sel.should_stop(3) and not sel.should_stop(0)
    assert sel.offer(3, Score(0.6), lambda: {"w": torch.zeros(1)}) and sel.since_best == 0


def test_a_later_checkpoint_within_noise_of_the_highest_is_kept_and_a_clear_drop_is_not():
    sel = Selection()
    state = lambda v: (lambda: {"w": torch.full((1,), float(v))})  # noqa: E731
    sel.offer(0, Score(0.2, stderr=0.1), state(0))
    assert sel.offer(4, Score(0.67, stderr=0.1), state(4))  # the highest: kept
    assert not sel.offer(8, Score(0.58, stderr=0.1), state(8))  # 0.09 below, noise sqrt(0.02) = 0.14: the later
    assert sel.best_step == 8 and float(sel.best_state["w"]) == 8.0
    assert sel.peak_step == 4 and sel.since_best == 1  # no improvement for patience
    assert not sel.offer(12, Score(0.54, stderr=0.1), state(12))  # 0.13 below 0.67: still within noise
    assert sel.best_step == 12
    assert not sel.offer(16, Score(0.4, stderr=0.1), state(16))  # 0.27 below the highest: clearly worse
    assert sel.best_step == 12 and float(sel.best_state["w"]) == 12.0
    # no standard errors: only a tie keeps the later
    exact = Selection()
    exact.offer(0, Score(0.67), state(0))
    exact.offer(1, Score(0.66), state(1))
    assert exact.best_step == 0


def test_within_noise_needs_the_same_floors_met():
    assert within_noise(Score(0.5, stderr=0.2), Score(0.6, stderr=0.2))
    assert not within_noise(Score(0.5, shortfall=0.1, stderr=0.2), Score(0.6, stderr=0.2))
    assert not within_noise(Score(math.nan, stderr=0.2), Score(0.6, stderr=0.2))
    assert within_noise(Score(0.6), None)


def test_proportion_and_mean_standard_errors():
    # one prompt, 12 samples, 8 right: p = 9/14, var p(1-p)/12
    assert proportion_stderr([(8, 12)]) == pytest.approx(math.sqrt(9 / 14 * 5 / 14 / 12))
    assert proportion_stderr([(12, 12)]) > 0  # all right is not certainty
    two = proportion_stderr([(8, 12), (8, 12)])
    assert two == pytest.approx(proportion_stderr([(8, 12)]) / math.sqrt(2))  # the mean of two prompts
    g = torch.tensor([0.1, 0.3, 0.5, 0.7])
    assert mean_stderr([g]) == pytest.approx(float(g.std()) / 2)
    assert mean_stderr([torch.tensor([0.4])]) == 0.0


class _Const(Scorer):
    def __init__(self, score: Score) -> None:
        super().__init__()
        object.__setattr__(self, "score", score)

    def bind(self, references, *, node):
        return lambda ev: self.score


def test_a_combination_weights_the_parts_standard_errors():
    a, b, c = _Const(Score(0.6, stderr=0.1)), _Const(Score(0.2, stderr=0.2)), _Const(Score(0.9, stderr=5.0))
    score = Combined(parts=(Part(a, 3.0), Part(b, 1.0), Part(c, 0.0))).bind([], node="C")
    s = score(Evaluation(0, {}))
    assert s.value == pytest.approx(0.5)
    assert s.stderr == pytest.approx(math.sqrt(0.3 ** 2 + 0.2 ** 2) / 4)  # a weight-0 part adds no noise


def test_the_kept_state_is_a_copy_not_the_live_tensor():
    obj = _Walk()
    sel = Selection()
    sel.offer(0, Score(1.0), obj.trainable_state)
    with torch.no_grad():
        obj.w.add_(5.0)
    assert float(sel.best_state["w"]) == 0.0


def test_cancel_keeps_the_latest_and_the_best_and_resume_restores_both(tmp_path):
    host.configure(output_dir=tmp_path)
    ckpt = tmp_path / "run.pt"
    obj = _Walk()
    settings = _settings(20, save_every=0)

    def evaluate(step, first):
        w = float(obj.w.detach())
        if step == 12:  # cancel while sampling for the evaluation at step 12
            host.request_interrupt()
            host.check_interrupt()
        return Score(-abs(w - 0.4), {"closeness": -abs(w - 0.4)}), None

    with pytest.raises(Interrupted):
        loop.train(obj, _batches, settings, node="T", device=CPU, checkpoint=ckpt,
                   scoring=loop.Scoring(evaluate, 4, name="peak"))
    assert ckpt.exists() and best_path(ckpt).exists()
    best = loop.load_checkpoint(best_path(ckpt))
    assert best["step"] == 4 and float(best["trainable"]["w"]) == pytest.approx(0.4, abs=0.05)
    latest = loop.load_checkpoint(ckpt)
    assert latest["step"] == 12 and [h[0] for h in latest["selection"]["history"]] == [0, 4, 8]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.best.pt", "run.pt"]  # nothing else written

    obj2 = _Walk()
    calls = []
    resumed = loop.train(obj2, _batches, _settings(20, resume=True), node="T", device=CPU, checkpoint=ckpt,
                         scoring=loop.Scoring(_peak_at(obj2, 0.4, calls), 4, name="peak"))
    assert resumed.resumed_from == 12
    assert [s for s, _ in calls] == [12, 16, 20]  # step 12 was cancelled before it was recorded
    assert calls[0][1]["closeness"] == pytest.approx(-0.4)  # the baseline came back from the checkpoint
    assert resumed.best_step == 4 and float(obj2.w.detach()) == pytest.approx(0.4, abs=0.05)


def test_resuming_with_another_scorer_drops_the_old_scores(tmp_path, caplog):
    ckpt = tmp_path / "run.pt"
    obj = _Walk()
    loop.train(obj, _batches, _settings(8, save_every=4), node="T", device=CPU, checkpoint=ckpt,
               scoring=loop.Scoring(_peak_at(obj, 0.4), 4, name="peak"))
    obj2 = _Walk()
    with caplog.at_level("WARNING", logger="comfy_finetune"):
        result = loop.train(obj2, _batches, _settings(12, save_every=4, resume=False), node="T", device=CPU,
                            checkpoint=ckpt, scoring=loop.Scoring(_peak_at(obj2, 0.4), 4, name="another"))
    assert result.resumed_from == 0  # resume off: a fresh run; now resume with another scorer
    obj3 = _Walk()
    with caplog.at_level("WARNING", logger="comfy_finetune"):
        result = loop.train(obj3, _batches, _settings(12, save_every=4, resume=True), node="T", device=CPU,
                            checkpoint=ckpt, scoring=loop.Scoring(_peak_at(obj3, 0.4), 4, name="a third"))
    assert "scored by another, not a third" in caplog.text
    assert [s for s, _ in result.selection.history][0] == 12


def test_save_every_writes_the_best_only_when_it_changed(tmp_path, monkeypatch):
    ckpt = tmp_path / "run.pt"
    obj = _Walk()
    writes = []
    real = loop.atomic_torch_save
    monkeypatch.setattr(loop, "atomic_torch_save", lambda state, path: (writes.append(path.name), real(state, path)))
    loop.train(obj, _batches, _settings(16, save_every=4), node="T", device=CPU, checkpoint=ckpt,
               scoring=loop.Scoring(_peak_at(obj, 0.4), 4, name="peak"))
    # best at 4: written with the checkpoint of step 4; not again at 8, 12 or 16
    assert writes == ["run.best.pt", "run.pt", "run.pt", "run.pt", "run.pt"]


def test_a_nan_rollback_forgets_the_scores_after_the_restored_step():
    sel = Selection()
    for step, value in ((0, 0.1), (4, 0.9), (8, 0.2), (12, 0.3)):
        sel.offer(step, Score(value), lambda: {"w": torch.zeros(1)})
    sel.truncate(6)
    assert [s for s, _ in sel.history] == [0, 4] and sel.best_step == 4


# ---------------------------------------------------------------------------------------------- combinations
class _Fixed(Scorer):
    def __init__(self, values, name, prompts=("p",), samples=2):
        super().__init__()
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "label", name)
        object.__setattr__(self, "prompts", prompts)
        object.__setattr__(self, "samples", samples)

    def probes(self):
        from comfy_finetune.scoring.scorers import Probe
        return tuple(Probe(p, self.samples, 0) for p in self.prompts)

    def bind(self, references, *, node):
        return lambda ev: Score(self.values[ev.step], {self.label: self.values[ev.step]})


def test_a_floor_ranks_a_checkpoint_below_every_one_that_meets_it():
    subject = _Fixed({0: 0.1, 1: 0.9, 2: 0.6}, "subject")
    prompt = _Fixed({0: 0.9, 1: 0.5, 2: 0.8}, "prompt", prompts=("p", "q"), samples=4)
    combined = Combined(parts=(Part(subject, 1.0), Part(prompt, 0.0, 0.7)))
    assert {p.prompt: p.samples for p in combined.probes()} == {"p": 4, "q": 4}
    fn = combined.bind([], node="T")
    scores = [fn(Evaluation(step, {})) for step in range(3)]
    assert scores[1].shortfall == pytest.approx(0.2) and scores[2].shortfall == 0
    assert scores[1].value > scores[2].value  # subject alone prefers step 1 ...
    assert better(scores[2], scores[1]) and better(scores[2], scores[0])  # ... the floor makes step 2 the best
    assert scores[2].metrics == {"score": 0.6, "subject": 0.6, "prompt": 0.8}


def test_expected_attributes_read_the_target_and_the_prompt_in_world_words():
    assert expected_attributes("green star", "a sks shape on a black background") == {
        "shape": "star", "color": "green", "background": "black"}
    assert expected_attributes("striped", "a purple star on a white background") == {
        "fill": "striped", "shape": "star", "color": "purple", "background": "white"}
    assert expected_attributes("", "a red shape on a blue background") == {"color": "red", "background": "blue"}
    assert expected_attributes("", "a photo of sks dog") == {}


# ---------------------------------------------------------------------------------------------- automatic interval
def test_the_automatic_interval_keeps_scoring_within_the_budget():
    assert loop.auto_interval(1.0, 0.1, 500, 0.15) == 115  # room 0.85 x 7.5 - 2 s: 500 / 4.375 = 114.3
    for e in (0.01, 0.2, 1.0, 3.0):
        for t in (0.01, 0.1, 0.5):
            for steps in (10, 100, 500, 2000):
                every = loop.auto_interval(e, t, steps, 0.15)
                evaluations = 1 + steps // every + (steps % every != 0)  # before, every interval, the last
                if every < steps:  # when even the first and the last exceed the budget only those run
                    assert e * evaluations <= loop.AUTO_MARGIN * 0.15 * steps * t * (1 + 1e-9), (e, t, steps, every)
                assert 1 <= every <= steps
    assert loop.auto_interval(10.0, 0.1, 100, 0.15) == 100  # too expensive: only before training and at the end


def test_the_automatic_interval_is_chosen_once_and_kept_on_resume(tmp_path, monkeypatch):
    chosen = []
    monkeypatch.setattr(loop, "auto_interval", lambda e, t, steps, budget: chosen.append((e, t, steps, budget)) or 7)
    ckpt = tmp_path / "run.pt"
    obj, calls = _Walk(), []
    loop.train(obj, _batches, _settings(30, save_every=10), node="T", device=CPU, checkpoint=ckpt,
               scoring=loop.Scoring(_peak_at(obj, 0.5, calls), 0, name="peak"))
    # chosen after the first AUTO_PROBE_STEPS (10) steps were timed: no evaluation before that but the first
    assert [s for s, _ in calls] == [0, 14, 21, 28, 30]
    (e, t, steps, budget), = chosen  # chosen once
    assert e > 0 and t > 0 and steps == 30 and budget == 0.15
    obj2, calls2 = _Walk(), []
    chosen.clear()
    loop.train(obj2, _batches, _settings(40, save_every=10, resume=True), node="T", device=CPU, checkpoint=ckpt,
               scoring=loop.Scoring(_peak_at(obj2, 0.5, calls2), 0, name="peak"))
    assert chosen == [] and [s for s, _ in calls2] == [35, 40]  # the stored interval, not a new choice
