"""The headless runner: every example workflow runs; errors name the node, the input and the fix."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

import comfy_finetune
from comfy_finetune import host
from comfy_finetune.headless.runner import load_prompt, main, node_classes, run_workflow
from comfy_finetune.headless.workflow import load_workflow

EXAMPLES = sorted((Path(comfy_finetune.__file__).parent / "example_workflows").glob("*.json"))


@pytest.fixture
def dirs(models_dir, tmp_path):
    out = tmp_path / "out"
    host.configure(output_dir=out)
    yield out
    host.configure(output_dir=models_dir.parent / "output")


def test_there_are_examples():
    assert EXAMPLES, "example_workflows/ must hold at least one workflow"


#: Shorter runs of the examples' long nodes, so every example runs end to end in seconds.
QUICK = {"steps": 3, "num_class_images": 2, "class_sample_steps": 2, "validate_every": 0, "validation_steps": 2}


def quick_copy(path, folder):
    """The example in API format with its training and sampling shortened (see QUICK), written to ``folder``."""
    api = load_workflow(json.loads(path.read_text()), node_classes())
    for node in api.values():
        for name, value in QUICK.items():
            if name in node["inputs"] and not isinstance(node["inputs"][name], list):
                node["inputs"][name] = value
    out = folder / f"{path.stem}.api.json"
    out.write_text(json.dumps(api))
    return out


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_runs_headless(path, dirs, models_dir, capsys, tmp_path):
    code = main(["run", str(quick_copy(path, tmp_path)), "--quiet", "--models", str(models_dir),
                 "--output", str(dirs)])
    assert code == 0, capsys.readouterr().err
    pngs = list(dirs.rglob("*.png"))
    assert pngs, "the workflow saved no image"
    assert "wrote" in capsys.readouterr().out


def _ui():
    folder = Path(comfy_finetune.__file__).parent / "example_workflows"
    return json.loads((folder / "Generate images.json").read_text())


def test_ui_and_api_formats_give_the_same_images(dirs):
    import numpy as np
    from PIL import Image

    ui = _ui()
    api = load_workflow(ui, node_classes())
    run_workflow(ui, ["Sample.steps=2", "Sample.batch_size=1", "SaveImage.filename_prefix=ui"])
    run_workflow(api, ["Sample.steps=2", "Sample.batch_size=1", "SaveImage.filename_prefix=api"])
    a = np.asarray(Image.open(next(dirs.glob("ui_*.png"))))
    b = np.asarray(Image.open(next(dirs.glob("api_*.png"))))
    assert a.shape == (64, 64, 3) and (a == b).all()


def test_seed_control_value_is_skipped_and_override_applies(dirs):
    api = load_workflow(_ui(), node_classes())
    sample = next(n for n in api.values() if n["class_type"] == "Sample")
    assert sample["inputs"]["seed"] == 42 and sample["inputs"]["steps"] == 20
    assert sample["inputs"]["sampler_name"] == "euler"  # not shifted by the "fixed" control value


def test_bad_input_names_node_input_and_fix_and_next_run_works(dirs, capsys):
    path = str(Path(comfy_finetune.__file__).parent / "example_workflows" / "Generate images.json")
    assert main(["run", path, "--quiet", "--set", "Sample.width=100"]) == 1
    err = capsys.readouterr().err
    assert "Sample" in err and "'width'" in err and "Fix:" in err
    assert main(["run", path, "--quiet", "--set", "Sample.steps=1", "--set", "Sample.batch_size=1"]) == 0


def test_unknown_sampler_in_hand_edited_workflow(dirs, capsys):
    ui = _ui()
    next(n for n in ui["nodes"] if n["type"] == "Sample")["widgets_values"][5] = "warp_drive"
    wf = dirs / "edited.json"
    wf.parent.mkdir(parents=True, exist_ok=True)
    wf.write_text(json.dumps(ui))
    assert main(["run", str(wf), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "sampler_name" in err and "warp_drive" in err and "euler" in err


def test_missing_node_type_and_dangling_link(dirs, capsys):
    ui = _ui()
    broken = copy.deepcopy(ui)
    next(n for n in broken["nodes"] if n["type"] == "NegativePrompt")["type"] = "SomeOtherPackNode"
    (dirs.parent / "missing.json").write_text(json.dumps(broken))
    assert main(["run", str(dirs.parent / "missing.json"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "SomeOtherPackNode" in err and "install" in err
    dangling = copy.deepcopy(ui)
    dangling["links"].append([99, 77, 0, 3, 0, "FT_PIPE"])
    next(n for n in dangling["nodes"] if n["type"] == "Sample")["inputs"][0]["link"] = 99
    (dirs.parent / "dangling.json").write_text(json.dumps(dangling))
    assert main(["run", str(dirs.parent / "dangling.json"), "--quiet"]) == 1
    assert "77" in capsys.readouterr().err


def test_missing_file_and_bad_json(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.json"), "--quiet"]) == 1
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["run", str(tmp_path / "bad.json"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "nope.json" in err and "bad.json" in err


def test_nodes_command_lists_nodes(capsys):
    from comfy_finetune.nodes import RENAMED_NODE_IDS  # noqa: PLC0415

    assert main(["nodes"]) == 0
    out = capsys.readouterr().out
    current, _, old = out.partition("Old ids")
    for node_id in ("LoadBase", "AddLoRA", "NegativePrompt", "Sample", "FinetuneTrainLoRA"):
        assert node_id in current.split()
    for old_id, new_id in RENAMED_NODE_IDS.items():
        assert old_id not in current.split() and f"{old_id} " in old and new_id in old


def _with_old_ids(ui: dict) -> dict:
    """``ui`` as saved before the rename: every node of a renamed id has its old id again."""
    from comfy_finetune.nodes import RENAMED_NODE_IDS  # noqa: PLC0415

    old_of = {new: old for old, new in RENAMED_NODE_IDS.items()}
    ui = copy.deepcopy(ui)
    for node in ui["nodes"]:
        if node["type"] in old_of:
            node["type"] = old_of[node["type"]]
            node.setdefault("properties", {})["Node name for S&R"] = node["type"]
    return ui


def test_workflow_with_old_node_ids_runs_the_current_classes(dirs, caplog):
    """A workflow saved with the ids from before the Finetune prefix (TrainingData, TrainLoRA) still runs headless:
    each old id runs the current class (not its deprecated alias), ``--set`` finds the nodes by the old id too, and
    the workflow embedded in the saved PNG is the file as it was saved."""
    from PIL import Image  # noqa: PLC0415

    from comfy_finetune.headless.executor import Executor  # noqa: PLC0415
    from comfy_finetune.nodes import NODE_CLASS_MAPPINGS  # noqa: PLC0415

    ui = _with_old_ids(json.loads((EXAMPLES[0].parent / "Train a LoRA.json").read_text()))
    types = {str(n["id"]): n["type"] for n in ui["nodes"]}
    assert types["2"] == "TrainingData" and types["3"] == "TrainLoRA", types
    overrides = ["TrainLoRA.steps=2", "TrainLoRA.batch_size=1", "TrainLoRA.validate_every=0", "Sample.steps=2",
                 "Sample.batch_size=1", "SaveImage.filename_prefix=old-ids/img",
                 "FinetuneSaveLoRA.name=old-ids/lora", "FinetuneSaveLoRA.overwrite=true"]

    api, raw = load_prompt(ui, overrides)
    assert raw == ui
    assert (api["2"]["class_type"], api["3"]["class_type"]) == ("FinetuneTrainingData", "FinetuneTrainLoRA")
    assert api["3"]["inputs"]["steps"] == 2 and api["3"]["inputs"]["validate_every"] == 0
    assert api["3"]["inputs"]["validation_prompt"] == "a striped purple cross on a white background"  # widgets

    executor = Executor(node_classes())
    with caplog.at_level("INFO", logger="comfy_finetune"):
        result = run_workflow(ui, overrides, executor=executor)
    assert "node 3 has the old id TrainLoRA; it runs as FinetuneTrainLoRA" in caplog.text
    ran = {nid: type(obj) for (nid, _), obj in executor._objects.items()}
    assert ran["2"] is NODE_CLASS_MAPPINGS["FinetuneTrainingData"]
    assert ran["3"] is NODE_CLASS_MAPPINGS["FinetuneTrainLoRA"]
    assert {"2", "3", "6"} <= set(result.executed)
    (png,) = (dirs / "old-ids").glob("img_*.png")
    with Image.open(png) as img:
        saved = json.loads(img.text["workflow"])
    assert {str(n["id"]): n["type"] for n in saved["nodes"]} == types
