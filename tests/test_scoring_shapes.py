"""In-loop scoring on shapes-tiny with the shapes judge, through the nodes as a workflow wires them.

A deliberately over-trained run (a learning rate far too high) makes the model forget what class prompts draw;
the judge's class-preservation scorer sees it, so the best checkpoint is the one before training and the trainer
must return it, not the last one: a LoRA whose up-projections are still zero, which samples exactly like the base.
Cancelling keeps the latest and the best checkpoint, and resuming finishes with the same choice.
"""

from __future__ import annotations

import pytest
import torch

from comfy_finetune import host
from comfy_finetune.core.errors import Interrupted
from comfy_finetune.nodes.generation import Sample
from comfy_finetune.nodes.scoring import ScoreWithJudge
from comfy_finetune.nodes.training import TrainLoRA
from comfy_finetune.shapes import personalization as P
from comfy_finetune.shapes import world as W

pytestmark = pytest.mark.usefixtures("one_thread")

CLASS_PROMPTS = "a red shape on a white background\na blue shape on a gray background"


@pytest.fixture(scope="module")
def pipe():
    return P.run_node(P.LoadBase, ckpt_name=P.SHAPES_NAME)[0]


@pytest.fixture(scope="module")
def data():
    specs = [W.Spec(s, c, b) for s, c, b in P.STYLE_TRAIN[:4]]
    return P.dataset([s.replace(fill="striped") for s in specs], [s.replace(fill="striped").caption() for s in specs])


def _scorer(every=4):
    return ScoreWithJudge().run(measure="class_preservation", target="", prompts=CLASS_PROMPTS, samples=2,
                                every=every, patience=0, seed=0)[0]


def _train(pipe, data, scorer, **kw):
    # far too high a learning rate: the LoRA wrecks what the model draws within a few steps
    inputs = dict(pipe=pipe, dataset=data, recipe="custom", steps=12, learning_rate=0.3, batch_size=2, rank=4,
                  alpha=4.0, seed=0, validation_size=64, validation_steps=8, validation_cfg=5.0, scorer=scorer)
    inputs.update(kw)
    return P.run_node(TrainLoRA, **inputs)


def _sample(pipe):
    return P.run_node(Sample, pipe=pipe, prompt="a red circle on a white background", seed=3, steps=8, cfg=5.0,
                      width=64, height=64, batch_size=2)[0]


def test_an_over_trained_run_returns_its_best_checkpoint_not_the_last(pipe, data, caplog):
    with caplog.at_level("INFO", logger="comfy_finetune"):
        lora, out, plot, _ = _train(pipe, data, _scorer())
    line = next(r.getMessage().split("] ", 1)[1] for r in caplog.records if "] kept step" in r.getMessage())
    assert line.startswith("kept step 0 (score 0 ± ") and "last: step 12" in line, line  # ± its standard error
    drops = [float(x.split(" (score ")[1].split(")")[0]) for x in line.split(";")[1:2]]
    assert drops[0] < -20, line  # the last checkpoint lost more than 20 points of class accuracy
    # the kept state is the one before training: every up-projection is still zero, so sampling is the base's
    assert all(float(m.up.abs().max()) == 0.0 for m in lora.modules.values())
    assert torch.equal(_sample(out), _sample(pipe))
    # the file's metadata says which step it holds
    meta = lora.metadata
    assert (meta["ss_steps"], meta["ft_kept_step"], meta["ft_steps_run"]) == ("0", "0", "12")
    plain, *_ = _train(pipe, data, None, steps=4)
    assert any(float(m.up.abs().max()) > 0 for m in plain.modules.values())  # without a scorer: the last state
    assert plot.shape[1] > 384  # the score panel under the loss


def test_cancel_keeps_the_best_and_the_latest_and_resume_keeps_the_choice(pipe, data, tmp_path):
    host.configure(output_dir=tmp_path)

    def cancel_at_8(event, payload):
        if event == "comfy_finetune.train_score" and payload["step"] == 8:
            host.request_interrupt()

    host.add_event_sink(cancel_at_8)
    try:
        with pytest.raises(Interrupted):
            _train(pipe, data, _scorer(), save_every=0)
    finally:
        host._settings.event_sinks.remove(cancel_at_8)
    files = sorted(p.name for p in (tmp_path / "finetune_checkpoints").iterdir())
    assert len(files) == 2 and files[0].endswith(".best.pt") and files[1].endswith(".pt"), files
    lora, out, _, _ = _train(pipe, data, _scorer(), save_every=0, resume=True)
    assert all(float(m.up.abs().max()) == 0.0 for m in lora.modules.values())
    assert torch.equal(_sample(out), _sample(pipe))
