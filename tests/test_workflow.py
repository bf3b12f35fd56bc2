"""UI-format -> API-format conversion and --set overrides, following the frontend's graphToPrompt."""

from __future__ import annotations

import json

import pytest

from comfy_finetune.core.errors import WorkflowError
from comfy_finetune.headless.workflow import (
    apply_overrides,
    is_ui_workflow,
    load_workflow,
    ui_to_api,
    widget_slots,
)

NODE_DEFS = {
    "CheckpointLoaderSimple": {"required": {"ckpt_name": (["a.safetensors", "b.safetensors"],)}},
    "KSampler": {"required": {
        "model": ("MODEL",),
        "seed": ("INT", {"default": 0, "min": 0}),
        "steps": ("INT", {"default": 20, "min": 1}),
        "cfg": ("FLOAT", {"default": 8.0}),
        "sampler_name": (["euler", "ddim"],),
        "positive": ("CONDITIONING",),
        "latent_image": ("LATENT",),
        "denoise": ("FLOAT", {"default": 1.0}),
    }},
    "EmptyLatentImage": {"required": {"width": ("INT",), "height": ("INT",), "batch_size": ("INT",)}},
    "CLIPTextEncode": {"required": {"text": ("STRING", {"multiline": True}), "clip": ("CLIP",)}},
    "LoadImage": {"required": {"image": (["x.png"], {"image_upload": True})}},
    "Blend": {"required": {"image": ("IMAGE",), "factor": ("FLOAT",)},
              "optional": {"mask": ("MASK",), "strength": ("INT", {"forceInput": True}),
                           "mode": ("COMBO", {"options": ["a", "b"], "control_after_generate": True}),
                           "label": ("STRING",)}},
    "SaveImage": {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})}},
}


def node(id_, type_, widgets=(), inputs=(), outputs=(), mode=0, title=None, **extra):
    n = {"id": id_, "type": type_, "mode": mode, "inputs": list(inputs), "outputs": list(outputs),
         "widgets_values": list(widgets), "properties": {}, **extra}
    if title:
        n["title"] = title
    return n


def inp(name, type_, link=None, widget=False):
    d = {"name": name, "type": type_, "link": link}
    if widget:
        d["widget"] = {"name": name}
    return d


def out(name, type_, links=()):
    return {"name": name, "type": type_, "links": list(links)}


def wf(nodes, links):
    return {"last_node_id": 99, "last_link_id": 99, "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {}, "version": 0.4}


def basic():
    """Checkpoint -> KSampler <- EmptyLatent; LoadImage -> SaveImage."""
    return wf([
        node(4, "CheckpointLoaderSimple", ["b.safetensors"], outputs=[out("MODEL", "MODEL", [1])]),
        node(5, "EmptyLatentImage", [512, 768, 2], outputs=[out("LATENT", "LATENT", [2])]),
        node(3, "KSampler", [42, "randomize", 25, 7.5, "ddim", 0.6],
             inputs=[inp("model", "MODEL", 1), inp("positive", "CONDITIONING"), inp("latent_image", "LATENT", 2)],
             title="My Sampler"),
        node(10, "LoadImage", ["x.png", "image"], outputs=[out("IMAGE", "IMAGE", [3])]),
        node(9, "SaveImage", ["runs/cat"], inputs=[inp("images", "IMAGE", 3)]),
    ], [[1, 4, 0, 3, 0, "MODEL"], [2, 5, 0, 3, 2, "LATENT"], [3, 10, 0, 9, 0, "IMAGE"]])


def test_is_ui_workflow():
    assert is_ui_workflow(basic())
    assert not is_ui_workflow({"3": {"class_type": "KSampler", "inputs": {}}})
    assert not is_ui_workflow([1, 2])


def test_widgets_with_seed_control_and_upload_value():
    api = ui_to_api(basic(), NODE_DEFS)
    assert api["3"] == {"class_type": "KSampler", "_meta": {"title": "My Sampler"}, "inputs": {
        "seed": 42, "steps": 25, "cfg": 7.5, "sampler_name": "ddim", "denoise": 0.6,
        "model": ["4", 0], "latent_image": ["5", 0]}}
    assert api["5"]["inputs"] == {"width": 512, "height": 768, "batch_size": 2}
    assert api["10"]["inputs"] == {"image": "x.png"}
    assert api["9"]["inputs"] == {"images": ["10", 0], "filename_prefix": "runs/cat"}
    assert api["4"]["_meta"]["title"] == "CheckpointLoaderSimple"


def test_missing_control_value_is_tolerated():
    w = basic()
    w["nodes"][2]["widgets_values"] = [42, 25, 7.5, "ddim", 0.6]  # saved without the control widget
    assert ui_to_api(w, NODE_DEFS)["3"]["inputs"]["steps"] == 25
    w["nodes"][2]["widgets_values"] = [42, True, 25, 7.5, "ddim", 0.6]  # old files: bool control
    inputs = ui_to_api(w, NODE_DEFS)["3"]["inputs"]
    assert (inputs["steps"], inputs["denoise"]) == (25, 0.6)


def test_widget_order_skips_sockets_and_force_input_and_adds_controls():
    assert widget_slots("Blend", NODE_DEFS["Blend"]) == [
        ("widget", "factor"), ("widget", "mode"), ("control", "mode"), ("widget", "label")]
    w = wf([node(1, "Blend", [0.5, "b", "fixed", "hi"])], [])
    assert ui_to_api(w, NODE_DEFS)["1"]["inputs"] == {"factor": 0.5, "mode": "b", "label": "hi"}


def test_linked_widget_uses_link_and_list_values_are_wrapped():
    w = wf([
        node(1, "EmptyLatentImage", [64, 64, 1], outputs=[out("LATENT", "LATENT", [])]),
        node(2, "Blend", [0.5, "a", "fixed", ["x", "y"]], inputs=[inp("factor", "FLOAT", 7, widget=True)]),
        node(3, "Blend", [1.0, "a", "fixed", ""], outputs=[out("f", "FLOAT", [7])]),
    ], [[7, 3, 0, 2, 0, "FLOAT"]])
    inputs = ui_to_api(w, NODE_DEFS)["2"]["inputs"]
    assert inputs["factor"] == ["3", 0]
    assert inputs["label"] == {"__value__": ["x", "y"]}


def test_primitive_node_value_goes_into_every_target():
    w = basic()
    w["nodes"].append(node(20, "PrimitiveNode", [1234, "increment"],
                           outputs=[{"name": "INT", "type": "INT", "links": [20, 21], "widget": {"name": "seed"}}]))
    w["nodes"].append(node(21, "KSampler", [0, "fixed", 5, 1.0, "euler", 1.0],
                           inputs=[inp("seed", "INT", 21, widget=True)]))
    w["nodes"][2]["inputs"].append(inp("seed", "INT", 20, widget=True))
    w["links"] += [[20, 20, 0, 3, 3, "INT"], [21, 20, 0, 21, 0, "INT"]]
    api = ui_to_api(w, NODE_DEFS)
    assert api["3"]["inputs"]["seed"] == 1234
    assert api["21"]["inputs"]["seed"] == 1234
    assert "20" not in api


def test_reroute_chain_and_notes_are_followed_and_dropped():
    w = basic()
    w["nodes"] += [node(30, "Reroute", inputs=[inp("", "*", 3)], outputs=[out("", "IMAGE", [31])]),
                   node(31, "Reroute", inputs=[inp("", "*", 31)], outputs=[out("", "IMAGE", [32])]),
                   node(40, "Note", ["some text"]), node(41, "MarkdownNote", ["# hi"])]
    w["nodes"][4]["inputs"] = [inp("images", "IMAGE", 32)]
    w["links"] = [lk for lk in w["links"] if lk[0] != 3]
    w["links"] += [[3, 10, 0, 30, 0, "IMAGE"], [31, 30, 0, 31, 0, "IMAGE"], [32, 31, 0, 9, 0, "IMAGE"]]
    api = ui_to_api(w, NODE_DEFS)
    assert api["9"]["inputs"]["images"] == ["10", 0]
    assert not {"30", "31", "40", "41"} & set(api)


def test_muted_node_is_dropped_and_its_consumers_lose_the_input():
    w = basic()
    w["nodes"][3]["mode"] = 2  # LoadImage muted
    api = ui_to_api(w, NODE_DEFS)
    assert "10" not in api
    assert "images" not in api["9"]["inputs"]


def test_bypassed_node_is_rewired_to_its_input_of_the_same_type():
    w = basic()
    w["nodes"].append(node(50, "Blend", [0.5, "a", "fixed", ""], mode=4,
                           inputs=[inp("mask", "MASK"), inp("image", "IMAGE", 3)],
                           outputs=[out("IMAGE", "IMAGE", [51])]))
    w["nodes"][4]["inputs"] = [inp("images", "IMAGE", 51)]
    w["links"] = [[1, 4, 0, 3, 0, "MODEL"], [2, 5, 0, 3, 2, "LATENT"], [3, 10, 0, 50, 1, "IMAGE"],
                  [51, 50, 0, 9, 0, "IMAGE"]]
    api = ui_to_api(w, NODE_DEFS)
    assert "50" not in api
    assert api["9"]["inputs"]["images"] == ["10", 0]
    # A bypassed node with no input of that type: the consumer loses the input.
    w["nodes"][-1]["inputs"] = [inp("mask", "MASK")]
    w["links"][2] = [3, 10, 0, 9, 5, "IMAGE"]
    api = ui_to_api(w, NODE_DEFS)
    assert "images" not in api["9"]["inputs"]


def test_bypass_slot_choice_same_index_then_exact_type_then_loose():
    sources = [node(1, "LoadImage", ["x.png", "image"], outputs=[out("IMAGE", "IMAGE", [1])]),
               node(2, "LoadImage", ["x.png", "image"], outputs=[out("IMAGE", "IMAGE", [2])])]

    def run(bypass_inputs, from_slot):
        w = wf(sources + [
            node(5, "Blend", [0.5, "a", "fixed", ""], mode=4, inputs=bypass_inputs,
                 outputs=[out("IMAGE", "IMAGE", [3] if from_slot == 0 else []),
                          out("IMAGE", "IMAGE", [3] if from_slot == 1 else [])]),
            node(9, "SaveImage", ["p"], inputs=[inp("images", "IMAGE", 3)]),
        ], [[1, 1, 0, 5, 0, "*"], [2, 2, 0, 5, 1, "IMAGE"], [3, 5, from_slot, 9, 0, "IMAGE"]])
        return ui_to_api(w, NODE_DEFS)["9"]["inputs"].get("images")

    both = [inp("a", "IMAGE", 1), inp("b", "IMAGE", 2)]
    assert run(both, 0) == ["1", 0] and run(both, 1) == ["2", 0]  # same slot index when its type fits
    star_first = [inp("a", "*", 1), inp("b", "IMAGE", 2)]
    assert run(star_first, 0) == ["2", 0]  # exact type beats a loose '*' at the same index
    assert run([inp("a", "*", 1), inp("m", "MASK", 2)], 1) == ["1", 0]  # else the first compatible one


def test_unknown_node_type_names_node_and_pack():
    w = basic()
    w["nodes"].append(node(77, "VHS_VideoCombine", [], title="Video", properties={"cnr_id": "comfyui-vhs"}))
    with pytest.raises(WorkflowError) as err:
        ui_to_api(w, NODE_DEFS)
    msg = str(err.value)
    assert "77" in msg and "VHS_VideoCombine" in msg and "comfyui-vhs" in msg and "not installed" in msg
    w["nodes"][-1]["mode"] = 2  # a muted unknown node does not matter
    assert "77" not in ui_to_api(w, NODE_DEFS)


def test_dangling_link_names_link_and_nodes():
    w = basic()
    w["links"][0] = [1, 404, 0, 3, 0, "MODEL"]
    with pytest.raises(WorkflowError) as err:
        ui_to_api(w, NODE_DEFS)
    msg = str(err.value)
    assert "link 1" in msg and "404" in msg and "3" in msg and "model" in msg
    w = basic()
    w["links"] = w["links"][1:]  # input points at a link id that is gone
    with pytest.raises(WorkflowError, match="link 1"):
        ui_to_api(w, NODE_DEFS)


def test_node_classes_are_accepted_as_definitions():
    class LoadImage:
        @classmethod
        def INPUT_TYPES(cls):
            return NODE_DEFS["LoadImage"]

    w = wf([node(1, "LoadImage", ["x.png", "image"])], [])
    assert ui_to_api(w, {"LoadImage": LoadImage})["1"]["inputs"] == {"image": "x.png"}


def test_load_workflow_from_files(tmp_path):
    ui_file = tmp_path / "ui.json"
    ui_file.write_text(json.dumps(basic()))
    assert load_workflow(ui_file, NODE_DEFS)["3"]["inputs"]["seed"] == 42
    with pytest.raises(WorkflowError, match="node_defs"):
        load_workflow(ui_file)
    api_file = tmp_path / "api.json"
    api_file.write_text(json.dumps({"prompt": {"1": {"class_type": "X", "inputs": {}}}}))
    assert load_workflow(api_file) == {"1": {"class_type": "X", "inputs": {}}}
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(WorkflowError, match="not valid JSON"):
        load_workflow(bad)


def test_overrides_by_id_title_and_class_type():
    api = ui_to_api(basic(), NODE_DEFS)
    new = apply_overrides(api, ["3.seed=7", "My Sampler.sampler_name=euler", "EmptyLatentImage.width=1024",
                                "9.filename_prefix=hello world", "3.cfg=2.5"])
    assert new["3"]["inputs"]["seed"] == 7
    assert new["3"]["inputs"]["sampler_name"] == "euler"
    assert new["3"]["inputs"]["cfg"] == 2.5
    assert new["5"]["inputs"]["width"] == 1024
    assert new["9"]["inputs"]["filename_prefix"] == "hello world"
    assert api["3"]["inputs"]["seed"] == 42  # input untouched
    assert apply_overrides(api, ["9.images=[\"4\", 0]"])["9"]["inputs"]["images"] == ["4", 0]
    assert apply_overrides(api, ["9.filename_prefix=[1, 2]"])["9"]["inputs"]["filename_prefix"] == {
        "__value__": [1, 2]}


def test_override_errors():
    api = ui_to_api(basic(), NODE_DEFS)
    with pytest.raises(WorkflowError, match="no node with id, title or type 'Nope'"):
        apply_overrides(api, ["Nope.seed=1"])
    with pytest.raises(WorkflowError, match="has no input 'sed'") as err:
        apply_overrides(api, ["3.sed=1"])
    assert "seed" in str(err.value)  # lists the valid inputs
    with pytest.raises(WorkflowError, match="NODE.INPUT=VALUE"):
        apply_overrides(api, ["3seed=1"])
    api["11"] = dict(api["3"])
    with pytest.raises(WorkflowError, match="several nodes"):
        apply_overrides(api, ["KSampler.seed=1"])
    # Declared but absent optional input: allowed when node_defs are given.
    blend = {"1": {"class_type": "Blend", "inputs": {"factor": 1.0}}}
    with pytest.raises(WorkflowError):
        apply_overrides(blend, ["1.label=x"])
    assert apply_overrides(blend, ["1.label=x"], NODE_DEFS)["1"]["inputs"]["label"] == "x"


def test_explicit_control_after_generate_false_means_no_control_widget():
    """Frontend rule: ``control_after_generate ?? name in (seed, noise_seed)``; the trainers declare False."""
    from comfy_finetune.headless.workflow import widget_slots

    spec = {"required": {"seed": ("INT", {"default": 0, "control_after_generate": False}),
                         "steps": ("INT", {"default": 1})}}
    assert widget_slots("X", spec) == [("widget", "seed"), ("widget", "steps")]
    plain = {"required": {"seed": ("INT", {"default": 0}), "steps": ("INT", {"default": 1})}}
    assert widget_slots("X", plain) == [("widget", "seed"), ("control", "seed"), ("widget", "steps")]
    forced = {"required": {"n": ("INT", {"default": 0, "control_after_generate": True})}}
    assert widget_slots("X", forced) == [("widget", "n"), ("control", "n")]


def test_training_examples_keep_widget_positions():
    """A trainer's seed has no control value in the saved examples, so later widgets stay in place."""
    import json
    from pathlib import Path

    import comfy_finetune
    from comfy_finetune.headless.runner import node_classes
    from comfy_finetune.headless.workflow import load_workflow

    path = Path(comfy_finetune.__file__).parent / "example_workflows" / "Train a LoRA.json"
    api = load_workflow(json.loads(path.read_text()), node_classes())
    train = next(n for n in api.values() if n["class_type"] == "FinetuneTrainLoRA")["inputs"]
    assert train["validation_prompt"] == "a striped purple cross on a white background"
    assert train["validate_every"] == 100


def test_old_node_ids_become_current_ones_and_overrides_find_them():
    """``current_node_types`` gives nodes saved under an old id the current one (nothing else changes);
    ``apply_overrides`` with ``renamed`` finds those nodes by the old id as well as by the current one."""
    from comfy_finetune.headless.workflow import apply_overrides, current_node_types

    renamed = {"OldTrainer": "NewTrainer"}
    api = {"1": {"class_type": "OldTrainer", "inputs": {"steps": 5}, "_meta": {"title": "Trainer"}},
           "2": {"class_type": "Other", "inputs": {"x": ["1", 0]}}}
    out, changed = current_node_types(api, renamed)
    assert changed == {"1": "OldTrainer"} and api["1"]["class_type"] == "OldTrainer"  # the input is not changed
    assert out == {"1": {"class_type": "NewTrainer", "inputs": {"steps": 5}, "_meta": {"title": "Trainer"}},
                   "2": api["2"]}
    assert apply_overrides(out, ["OldTrainer.steps=2"], renamed=renamed)["1"]["inputs"]["steps"] == 2
    assert apply_overrides(out, ["NewTrainer.steps=3"], renamed=renamed)["1"]["inputs"]["steps"] == 3
    with pytest.raises(WorkflowError, match="no node with id, title or type 'OldTrainer'"):
        apply_overrides(out, ["OldTrainer.steps=2"])
