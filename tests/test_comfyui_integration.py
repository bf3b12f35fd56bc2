"""Integration test against a real ComfyUI: the pack loads, its nodes are served, its example workflows run.

Runs only when ``COMFYUI_DIR`` points at a ComfyUI checkout (skipped otherwise)::

    COMFYUI_DIR=/path/to/ComfyUI pytest tests/test_comfyui_integration.py

ComfyUI runs with ``$COMFYUI_PYTHON``, else ``<COMFYUI_DIR>/../venv/bin/python`` if it exists, else this python.
One server is started for the whole module (see ``comfyui_harness.py``); nothing is written into the checkout.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

_COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
if not _COMFYUI_DIR:
    pytest.skip("COMFYUI_DIR is not set (point it at a ComfyUI checkout to run the integration test)",
                allow_module_level=True)
if not (Path(_COMFYUI_DIR) / "main.py").is_file():
    pytest.skip(f"COMFYUI_DIR={_COMFYUI_DIR!r} is not a ComfyUI checkout (no main.py)", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfyui_harness as harness  # noqa: E402

from comfy_finetune.core.workflow import apply_overrides, ui_to_api  # noqa: E402
from comfy_finetune.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

pytestmark = pytest.mark.comfyui

REPO_ROOT = harness.REPO_ROOT
EXAMPLES = sorted((REPO_ROOT / "example_workflows").glob("*.json"))
PACK = harness.PACK_FOLDER_NAME
PROMPT_TIMEOUT_S = 120.0
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    srv = harness.ComfyServer(Path(_COMFYUI_DIR).resolve(), tmp_path_factory.mktemp("comfyui"))
    try:
        srv.start()
    except harness.ServerError as exc:
        srv.stop()
        pytest.fail(str(exc), pytrace=False)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def object_info(server):
    return server.get_json("/object_info", timeout=60)


@pytest.fixture(scope="session")
def node_defs(object_info):
    return harness.node_defs_from_object_info(object_info)


def _fail_with_log(server, message: str) -> None:
    pytest.fail(f"{message}\n--- ComfyUI log tail ({server.log_path}) ---\n{server.log_tail(80)}", pytrace=False)


def _run(server, prompt, what: str) -> harness.PromptResult:
    result = server.run_prompt(prompt, timeout=PROMPT_TIMEOUT_S)
    if result.status != "success":
        err = result.error or {}
        detail = {k: err.get(k) for k in ("node_id", "node_type", "exception_type", "exception_message")}
        tb = "".join(err.get("traceback") or [])
        _fail_with_log(server, f"{what}: prompt {result.prompt_id} ended with status {result.status!r} after "
                               f"{result.seconds:.1f} s: {json.dumps(detail, indent=1)}\n{tb}")
    return result


def _example_api(path: Path, node_defs) -> dict:
    return ui_to_api(json.loads(path.read_text(encoding="utf-8")), node_defs)


# ---------------------------------------------------------------------------------------------- 1. import
def test_pack_imports_without_errors(server):
    log = server.log_text()
    bad = [line for line in log.splitlines()
           if PACK in line and ("Cannot import" in line or "IMPORT FAILED" in line or "Skip" in line)]
    assert not bad, "ComfyUI failed to import the pack:\n" + "\n".join(bad) + "\n--- log tail ---\n" + \
        server.log_tail(80)
    loaded = [line for line in log.splitlines() if re.search(r"seconds.*:\s.*" + re.escape(PACK) + r"\s*$", line)]
    assert loaded, f"the pack is not in ComfyUI's 'Import times for custom nodes' table\n{server.log_tail(80)}"


# ---------------------------------------------------------------------------------------------- 2. object_info
def _input_names(spec: dict) -> dict[str, list[str]]:
    return {section: list((spec.get(section) or {}).keys()) for section in ("required", "optional")}


@pytest.mark.parametrize("node_id", sorted(NODE_CLASS_MAPPINGS))
def test_object_info_matches_node_classes(object_info, node_id):
    cls = NODE_CLASS_MAPPINGS[node_id]
    assert node_id in object_info, f"{node_id} is missing from /object_info"
    info = object_info[node_id]

    assert _input_names(info["input"]) == _input_names(cls.INPUT_TYPES()), f"{node_id}: input names differ"
    assert info["output"] == list(cls.RETURN_TYPES), f"{node_id}: output types differ"
    assert info["display_name"] == NODE_DISPLAY_NAME_MAPPINGS[node_id]
    assert str(info["category"]).startswith("finetune"), f"{node_id}: category {info['category']!r}"
    assert info.get("python_module") == f"custom_nodes.{PACK}"

    for section in ("required", "optional"):
        for name, spec in (info["input"].get(section) or {}).items():
            opts = spec[1] if isinstance(spec, list) and len(spec) > 1 and isinstance(spec[1], dict) else {}
            assert str(opts.get("tooltip") or "").strip(), f"{node_id}: input {section}.{name} has no tooltip"
    tooltips = info.get("output_tooltips")
    assert tooltips is not None, f"{node_id}: no output_tooltips"
    assert len(tooltips) == len(info["output"]), f"{node_id}: {len(tooltips)} output tooltips for " \
                                                 f"{len(info['output'])} outputs"
    assert all(str(t).strip() for t in tooltips), f"{node_id}: empty output tooltip in {tooltips}"


# ---------------------------------------------------------------------------------------------- 3. templates
def test_example_workflows_are_served(server):
    assert EXAMPLES, "the pack ships no example_workflows/*.json"
    templates = server.get_json("/workflow_templates")
    assert sorted(templates.get(PACK, [])) == sorted(p.stem for p in EXAMPLES), templates
    for path in EXAMPLES:
        served = server.get_json(f"/api/workflow_templates/{PACK}/{path.stem}.json")
        assert served == json.loads(path.read_text(encoding="utf-8")), f"{path.name} served differently"


# ---------------------------------------------------------------------------------------------- 4. run examples
@pytest.mark.parametrize("workflow", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_workflow_runs(server, node_defs, workflow):
    prompt = _example_api(workflow, node_defs)
    save_nodes = [nid for nid, n in prompt.items() if n["class_type"] == "SaveImage"]
    assert save_nodes, f"{workflow.name} has no SaveImage node"

    result = _run(server, prompt, workflow.name)

    assert (result.history.get("status") or {}).get("status_str") == "success", result.history.get("status")
    saved = server.saved_images(prompt, result)
    for nid in save_nodes:
        paths = saved.get(nid) or []
        assert paths, f"{workflow.name}: SaveImage node {nid} saved nothing (outputs: {result.history.get('outputs')})"
        source = prompt[nid]["inputs"].get("images")
        batch = prompt[source[0]]["inputs"].get("batch_size") if isinstance(source, list) else None
        if isinstance(batch, int):
            assert len(paths) == batch, f"{workflow.name}: node {nid} saved {len(paths)} images, expected {batch}"
        for p in paths:
            assert p.suffix == ".png" and p.is_file(), f"{workflow.name}: node {nid} reported {p}, which is missing"
            assert p.read_bytes()[:8] == PNG_MAGIC, f"{p} is not a PNG"
            assert server.output_dir in p.parents


# ---------------------------------------------------------------------------------------------- 5. errors
def test_bad_input_is_reported_and_server_recovers(server, node_defs):
    good = _example_api(REPO_ROOT / "example_workflows" / "generate.json", node_defs)
    bad = apply_overrides(good, ["Sample.width=100"], node_defs)

    result = server.run_prompt(bad, timeout=PROMPT_TIMEOUT_S)
    assert result.status == "error", f"expected an execution_error, got {result.status}: {result.history}"
    err = result.error
    msg = str(err.get("exception_message"))
    assert err.get("node_type") == "Sample", err
    assert "Sample" in msg and "width" in msg, msg
    assert re.search(r"\bfix\b", msg, re.IGNORECASE), f"no fix suggested in: {msg}"
    assert "100" in msg, msg

    # the server keeps working: a good prompt (new seed, so Sample really runs again) succeeds
    again = apply_overrides(good, ["Sample.seed=7"], node_defs)
    result = _run(server, again, "good prompt after the error")
    assert any(server.saved_images(again, result).values())
