"""Headless runner: execute ComfyUI workflow files (UI or API format) without ComfyUI.

``python -m comfy_finetune run WORKFLOW.json [--set NODE.INPUT=VALUE ...] [--models DIR] [--output DIR]
[--processes N]``

Data-parallel training: ``--processes N`` starts N ranks through torchrun (torch.distributed.run, the launcher
accelerate uses too); ``accelerate launch --multi_gpu --num_processes N -m comfy_finetune run WF.json`` and
``torchrun --nproc-per-node N -m comfy_finetune run WF.json`` work as well (see :mod:`..training.distributed`).

The same node classes as inside ComfyUI run here, plus headless stand-ins for the core nodes
our example workflows use (LoadImage, SaveImage, PreviewImage).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

from .. import host
from ..core.errors import FinetuneError, Interrupted
from ..nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, RENAMED_NODE_IDS
from ..training import distributed
from .executor import Executor
from .native_nodes import NATIVE_NODE_CLASSES
from .workflow import apply_overrides, current_node_types, is_ui_workflow, load_workflow, read_workflow_json

log = logging.getLogger("comfy_finetune")


def node_classes() -> dict[str, type]:
    """Every class the headless runner can execute: ours (old ids included) plus the native stand-ins."""

    return {**NATIVE_NODE_CLASSES, **NODE_CLASS_MAPPINGS}


def load_prompt(path_or_dict, overrides: list[str] | None = None) -> tuple[dict, dict]:
    """The API-format prompt a workflow runs as, and the workflow's JSON as read.

    UI-format files are converted; nodes saved under an old id of this pack (``nodes.RENAMED_NODE_IDS``) get the
    current id, so the current class runs them; then the ``--set`` overrides apply (an old id names the nodes of
    its current id there too).
    """

    classes = node_classes()
    raw = read_workflow_json(path_or_dict)
    api, changed = current_node_types(load_workflow(raw, classes), RENAMED_NODE_IDS)
    for nid, old in changed.items():
        log.info("node %s has the old id %s; it runs as %s", nid, old, RENAMED_NODE_IDS[old])
    if overrides:
        api = apply_overrides(api, overrides, classes, renamed=RENAMED_NODE_IDS)
    return api, raw


def run_workflow(path_or_dict, overrides: list[str] | None = None, *, executor=None):
    """Load, override and execute a workflow; returns the executor's result."""

    api, raw = load_prompt(path_or_dict, overrides)
    executor = executor or Executor(node_classes())
    return executor.execute(api, workflow=raw if is_ui_workflow(raw) else None)


def _print_outputs(result) -> None:
    for node_id, ui in result.ui.items():
        for img in ui.get("images", []) if isinstance(ui, dict) else []:
            folder = host.output_dir() if img.get("type") == "output" else host.temp_dir()
            print(f"node {node_id}: wrote {folder / img.get('subfolder', '') / img['filename']}")
        for text in ui.get("text", []) if isinstance(ui, dict) else []:
            print(f"node {node_id}: {text}")


def _quiet_libraries() -> None:
    """Headless only: keep diffusers/transformers load chatter out of the runner's output."""
    try:
        import diffusers.utils.logging as dlog  # noqa: PLC0415
        import transformers.utils.logging as tlog  # noqa: PLC0415

        dlog.set_verbosity_error()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except Exception:  # pragma: no cover - cosmetic only
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m comfy_finetune",
                                     description="Run comfyui-finetune workflows headless, without ComfyUI.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute a workflow JSON (UI or API format)")
    run.add_argument("workflow", help="path to the workflow .json")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.INPUT=VALUE",
                     help="override an input; NODE is a node id, title or unique type (repeatable)")
    run.add_argument("--models", help="models folder with checkpoints/, loras/, embeddings/, diffusers/ "
                                      "(default: $COMFY_FINETUNE_MODELS or ./models)")
    run.add_argument("--output", help="output folder (default: ./output)")
    run.add_argument("--input", help="input folder for LoadImage (default: ./input)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--processes", type=int, default=1, metavar="N",
                     help="data-parallel training over N processes (one per GPU; gloo on CPU); batch_size stays "
                          "the global batch and must divide by N")
    sub.add_parser("nodes", help="list the nodes this pack provides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "nodes":
        width = max(map(len, NODE_CLASS_MAPPINGS))
        names = max(map(len, NODE_DISPLAY_NAME_MAPPINGS.values()))
        for node_id, cls in NODE_CLASS_MAPPINGS.items():
            if node_id not in RENAMED_NODE_IDS:
                print(f"{node_id:{width}} {NODE_DISPLAY_NAME_MAPPINGS[node_id]:{names}} {cls.CATEGORY}")
        print("\nOld ids, still loaded from saved workflows:")
        for old, new in RENAMED_NODE_IDS.items():
            print(f"{old:{width}} -> {new}")
        return 0

    if args.processes != 1:
        return _launch_processes(args.processes, sys.argv[1:] if argv is None else list(argv))
    _quiet_libraries()
    try:
        world = distributed.init_from_env()
    except FinetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not distributed.is_main():  # the other ranks train silently; rank 0 reports
        logging.getLogger().setLevel(logging.WARNING)
    host.configure(models_dir=args.models, output_dir=args.output, input_dir=args.input,
                   progress=not args.quiet and distributed.is_main())
    try:
        result = run_workflow(Path(args.workflow), args.overrides)
    except (KeyboardInterrupt, Interrupted):
        print("cancelled", file=sys.stderr)
        return 130
    except FinetuneError as exc:
        print(f"error: {exc}" if world.size == 1 else f"error (rank {world.rank}): {exc}", file=sys.stderr)
        return 1
    except (OSError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()
    if world.rank == 0:  # the other ranks computed the same result; rank 0 reports it
        _print_outputs(result)
    return 0


def _launch_processes(n: int, argv: list[str]) -> int:
    """``run ... --processes N``: start N ranks of the same command through torchrun and wait for them."""

    if n < 1:
        print(f"error: --processes must be at least 1 (got {n})", file=sys.stderr)
        return 2
    if distributed.env_world()[1] > 1:
        print("error: --processes cannot be used inside an already launched data-parallel run (WORLD_SIZE is "
              "set); drop --processes or the outer launcher", file=sys.stderr)
        return 2
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            rest.append(arg)
    pack = __package__.rpartition(".")[0]  # this module lives in <pack>.headless; `-m <pack>` is __main__.py
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           "-m", pack, *rest]
    return subprocess.call(cmd)
