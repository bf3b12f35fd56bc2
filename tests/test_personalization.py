"""Personalization teaches shapes-tiny something: fast versions of the benchmark's measures
(``benchmarks/personalization.py``), with thresholds far above chance, so a regression in training turns CI red."""

from __future__ import annotations

import pytest

from comfy_finetune.shapes import personalization as P
from comfy_finetune.shapes.judge import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return P.run_node(P.LoadBase, ckpt_name=P.SHAPES_NAME)[0]


def test_judge_accuracy_on_held_out_images():
    acc = evaluate(per_spec=1)  # 345 held-out combinations, fresh seeds
    assert acc["n"] == 345 and acc["all"] >= 0.95


def test_dreambooth_lora_with_prior_teaches_the_subject(pipe):
    """The base model never draws a green star for "a sks shape"; after DreamBooth it does."""
    base = P.generate(pipe, [P.INSTANCE_PROMPT], P.FAST)
    assert P.share(base, lambda v: v.shape == "star" and v.color == "green") == 0.0
    (row,) = P.dreambooth_rows(pipe, P.FAST, P.class_accuracy(pipe, P.FAST), {}, methods=(("lora", True),))
    f = row.figures
    assert (f["subject_fidelity"] + f["prompt_subject"]) / 2 >= 0.25, row  # at least 3 of 12 samples
    assert f["class_drift_points"] <= 34, row


def test_textual_inversion_learns_an_unseen_colour(pipe):
    row = P.ti_row(pipe, P.FAST, {})
    assert row.figures["no_token_identical"] == 1.0
    assert row.figures["ti_fidelity"] >= 0.25, row  # the base model never draws teal


def test_lora_learns_a_style_that_transfers(pipe):
    row = P.lora_row(pipe, P.FAST, {})
    f = row.figures
    assert f["strength0_identical"] == 1.0
    assert f["style_transfer"] >= 0.5 and f["style_transfer"] > f["style_base"], row
    assert 0.0 < f["half_distance_ratio"] < 1.0, row


def test_check_flags_missed_targets():
    good = P.Row("DreamBooth lora, with prior", {"subject_fidelity": 0.9, "prompt_fidelity": 0.8,
                                                 "class_drift_points": 2.0}, 30.0)
    assert P.check(good) == []
    bad = P.Row("DreamBooth lora, with prior", {"subject_fidelity": 0.5, "prompt_fidelity": 0.8,
                                                "class_drift_points": 20.0}, 200.0)
    missed = P.check(bad)
    assert len(missed) == 3 and any("subject" in m for m in missed) and any("drift" in m for m in missed)
    assert P.check(P.Row("LoRA style (striped)", {"style_transfer": 0.9, "strength0_identical": 0.0,
                                                  "half_distance_ratio": 1.2}, 10.0)) == [
        "strength 0 changed the image", "strength 0.5 is not between 0 and 1"]


def test_node_defaults_follow_input_types():
    d = P.node_defaults(P.TrainLoRA)
    assert d["rank"] == P.TrainLoRA.INPUT_TYPES()["required"]["rank"][1]["default"]
    assert "pipe" not in d and "dataset" not in d  # links have no default
    assert d["optimizer"] == "adamw"  # a combo's default
