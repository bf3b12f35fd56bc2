"""The headless runner: every example workflow runs; errors name the node, the input and the fix."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

import comfy_finetune
from comfy_finetune import host
from comfy_finetune.headless.workflow import load_workflow
from comfy_finetune.headless.runner import main, node_classes, run_workflow

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
    return json.loads((Path(comfy_finetune.__file__).parent / "example_workflows" / "Generate images.json").read_text())


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
    assert main(["nodes"]) == 0
    out = capsys.readouterr().out
    for node_id in ("LoadBase", "AddLoRA", "NegativePrompt", "Sample"):
        assert node_id in out
