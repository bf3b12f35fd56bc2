"""Data-parallel training (training/distributed.py): 2 ranks x batch 1 equals 1 rank x batch 2; only rank 0 writes.

The two-process test starts the real runner with ``--processes 2`` (torchrun, gloo on the CPU) on the tiny SD 1.x
model; every rank records the files it opens for writing (a ``sitecustomize`` on its path), so the test sees
which rank wrote what.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from comfy_finetune.core.errors import FinetuneError
from comfy_finetune.headless.executor import Executor
from comfy_finetune.headless.runner import node_classes
from comfy_finetune.training import distributed
from comfy_finetune.training.data import Batch
from comfy_finetune.training.dreambooth import PairedBatch

TRAIN = dict(rank=4, alpha=4.0, targets="attention", train_text_encoder=False, text_learning_rate=5e-5, steps=1,
             learning_rate=1e-3, batch_size=2, grad_accum=1, lr_schedule="constant", warmup_steps=0,
             optimizer="adamw", precision="fp32", gradient_checkpointing=False, min_snr_gamma=5.0,
             noise_offset=0.05, seed=3)


def graph(batch_size: int, lora_name: str, *, save_every: int = 0) -> dict:
    return {
        "1": {"class_type": "LoadBase", "inputs": {"ckpt_name": "diffusers/tiny-sd1", "dtype": "fp32",
                                                   "device": "cpu"}},
        "2": {"class_type": "FinetuneTrainingData", "inputs": {"folder": "[example] striped-style", "resolution": 64,
                                                               "crop": "random", "flip": True, "repeats": 1,
                                                               "caption_prefix": "", "caption_dropout": 0.3,
                                                               "bucketing": False}},
        "3": {"class_type": "FinetuneTrainLoRA", "inputs": {"pipe": ["1", 0], "dataset": ["2", 0], **TRAIN,
                                                            "batch_size": batch_size, "save_every": save_every}},
        "4": {"class_type": "FinetuneSaveLoRA", "inputs": {"lora": ["3", 0], "pipe": ["1", 0], "name": lora_name,
                                                           "layout": "kohya", "overwrite": False}},
        "5": {"class_type": "AddLoRA", "inputs": {"pipe": ["1", 0], "lora_name": "None", "strength_unet": 1.0,
                                                  "strength_text": 1.0, "lora": ["3", 0]}},
        "6": {"class_type": "Sample", "inputs": {"pipe": ["5", 0], "prompt": "a red circle", "seed": 1, "steps": 1,
                                                 "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
                                                 "width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "dp/img"}},
    }


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ---------------------------------------------------------------------------------------------- unit level
@pytest.fixture
def as_rank(monkeypatch):
    def set_rank(rank: int, size: int) -> None:
        monkeypatch.setattr(distributed, "_world", distributed.World(rank, size, rank, "gloo"))

    return set_rank


def test_single_process_is_untouched():
    assert distributed.world_size() == 1 and distributed.is_main() and distributed.writes_allowed()
    b = Batch(indices=[0, 1], pixels=torch.zeros(2, 3, 8, 8), captions=["a", "b"], flipped=[False, True])
    assert distributed.shard_batch(b, 2) is b
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    with distributed.sharded_draws():
        assert torch.equal(distributed.randn((2, 4, 3, 3), g1), torch.randn((2, 4, 3, 3), generator=g2))


def test_ranks_draw_their_rows_of_the_global_batch(as_rank):
    whole = torch.Generator().manual_seed(9)
    noise = torch.randn((4, 4, 3, 3), generator=whole)
    steps = torch.randint(0, 1000, (4,), generator=whole)
    for r in range(2):
        as_rank(r, 2)
        g = torch.Generator().manual_seed(9)
        with distributed.sharded_draws():
            assert torch.equal(distributed.randn((2, 4, 3, 3), g), noise[2 * r:2 * r + 2])
            assert torch.equal(distributed.randint(1000, 2, g), steps[2 * r:2 * r + 2])
        g, h = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)  # outside a loss: plain draws
        assert torch.equal(distributed.randn((2, 4, 3, 3), g), torch.randn((2, 4, 3, 3), generator=h))
    assert not torch.equal(torch.randn((2, 4, 3, 3), generator=torch.Generator().manual_seed(9)), noise[:2]), \
        "a prefix of a larger draw is not the smaller draw: slicing the global draw is needed"


def test_shard_batch_slices_every_per_sample_field_also_nested(as_rank):
    pixels = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    inst = Batch(indices=[7, 8, 9, 10], pixels=pixels, captions=list("abcd"), flipped=[True, False, True, False],
                 step=5, epoch=1)
    klass = Batch(indices=[0, 1, 2, 3], pixels=pixels + 10, captions=list("wxyz"), flipped=[False] * 4, step=5)
    as_rank(1, 2)
    part = distributed.shard_batch(PairedBatch(inst, klass), 4)
    assert part.instance.indices == [9, 10] and part.instance.captions == ["c", "d"]
    assert part.instance.flipped == [True, False] and part.instance.step == 5
    assert torch.equal(part.instance.pixels, pixels[2:]) and torch.equal(part.klass.pixels, pixels[2:] + 10)
    assert part.klass.captions == ["y", "z"]


def test_batch_that_does_not_split_names_node_and_fix(as_rank):
    as_rank(0, 2)
    assert distributed.local_batch_size(4, node="TrainLoRA") == 2
    with pytest.raises(FinetuneError) as err:
        distributed.local_batch_size(3, node="TrainLoRA")
    assert err.value.node == "TrainLoRA" and err.value.input == "batch_size"
    assert "2 or 4" in err.value.fix


def test_only_rank_0_may_write(as_rank, tmp_path):
    from comfy_finetune.core.atomic import atomic_write

    as_rank(1, 2)
    atomic_write(tmp_path / "x.bin", lambda p: p.write_bytes(b"1"))
    assert not any(tmp_path.iterdir())
    as_rank(0, 2)
    atomic_write(tmp_path / "x.bin", lambda p: p.write_bytes(b"1"))
    assert (tmp_path / "x.bin").read_bytes() == b"1"


def test_processes_refused_inside_a_launched_run(monkeypatch, capsys):
    from comfy_finetune.headless.runner import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["run", "x.json", "--processes", "2"]) == 2
    assert "already launched" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- two processes
_AUDIT = '''
import atexit, builtins, json, os
_roots = [os.path.realpath(p) for p in os.environ["DP_AUDIT_ROOTS"].split(os.pathsep)]
_seen = []
def _note(path):
    try:
        real = os.path.realpath(os.fspath(path))
    except TypeError:
        return
    if any(real == r or real.startswith(r + os.sep) for r in _roots):
        _seen.append(real)
_open, _os_open, _replace, _rename, _link = builtins.open, os.open, os.replace, os.rename, os.link
def open_(file, mode="r", *a, **k):
    if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
        _note(file)
    return _open(file, mode, *a, **k)
def os_open(path, flags, *a, **k):
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
        _note(path)
    return _os_open(path, flags, *a, **k)
def replace(src, dst, *a, **k):
    _note(dst)
    return _replace(src, dst, *a, **k)
def rename(src, dst, *a, **k):
    _note(dst)
    return _rename(src, dst, *a, **k)
def link(src, dst, *a, **k):  # how a file that must not replace another one is put in place
    _note(dst)
    return _link(src, dst, *a, **k)
builtins.open, os.open, os.replace, os.rename, os.link = open_, os_open, replace, rename, link
@atexit.register
def _dump():
    rank = os.environ.get("RANK", "single")
    with _open(os.path.join(os.environ["DP_AUDIT_OUT"], "writes-" + rank + ".json"), "w") as f:
        json.dump(_seen, f)
'''


def test_two_ranks_batch_1_equal_one_rank_batch_2_and_only_rank_0_writes(models_dir, tmp_path, one_thread):
    # a private models folder (with a copy of the tiny SD 1.x model) and output folder for the two-process run
    models, out, audit = tmp_path / "models", tmp_path / "output", tmp_path / "audit"
    for sub in ("checkpoints", "loras", "embeddings", "diffusers"):
        (models / sub).mkdir(parents=True)
    shutil.copytree(models_dir / "diffusers" / "tiny-sd1", models / "diffusers" / "tiny-sd1")
    out.mkdir()
    audit.mkdir()
    (audit / "sitecustomize.py").write_text(_AUDIT)
    workflow = tmp_path / "dp.json"
    workflow.write_text(json.dumps(graph(2, "dp/trained", save_every=1)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DP_AUDIT_OUT": str(audit),
           "DP_AUDIT_ROOTS": os.pathsep.join([str(models), str(out)]),
           "PYTHONPATH": os.pathsep.join([str(audit), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "comfy_finetune", "run", str(workflow), "--models", str(models),
                           "--output", str(out), "--input", str(tmp_path), "--quiet", "--processes", "2"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("img_") == 1 and proc.stdout.count("trained") == 1, proc.stdout  # rank 0 reports

    # the same step in this process: 1 rank x batch 2 (the reference) and 1 rank x batch 1 (must differ)
    tag = uuid.uuid4().hex[:8]
    ex = Executor(node_classes())
    ex.execute(graph(2, f"dp-{tag}/b2"))
    ex.execute(graph(1, f"dp-{tag}/b1"))
    dp = _tensors(models / "loras" / "dp" / "trained.safetensors")
    b2 = _tensors(models_dir / "loras" / f"dp-{tag}" / "b2.safetensors")
    b1 = _tensors(models_dir / "loras" / f"dp-{tag}" / "b1.safetensors")
    assert dp.keys() == b2.keys() and dp
    ups = [k for k in dp if k.endswith("lora_up.weight")]  # B starts at zero: its value is the step's update
    update = max(float(b2[k].abs().max()) for k in ups)
    assert update > 1e-4
    # AdamW's first step is lr * g / (|g| + eps). Where |g| is well above eps (1e-8) the update is ~lr and the
    # all-reduce's rounding of g (relative ~1e-7) cannot move it visibly. Where g nearly cancels (|g| ~ eps) the
    # update is a fraction of lr and moves by lr * dg / eps: a rounding of ~1e-10 (summands ~1e-3, summed in another
    # order) shows as ~1e-2 of lr there. So: tight where the update is large, loose and rare where it is small.
    n = sum(dp[k].numel() for k in ups)
    large = [(dp[k] - b2[k])[b2[k].abs() >= 0.5 * update] for k in ups]
    small = [(dp[k] - b2[k])[b2[k].abs() < 0.5 * update] for k in ups]
    large_diff = max(float(d.abs().max()) if d.numel() else 0.0 for d in large)
    small_diff = max(float(d.abs().max()) if d.numel() else 0.0 for d in small)
    off = sum(int((d.abs() > 1e-8).sum()) for d in small)
    assert sum(d.numel() for d in large) > 0.5 * n, "most of the step's updates must sit at ~lr (|g| >> eps)"
    assert large_diff <= 1e-3 * update, (large_diff, update)
    assert small_diff <= 5e-2 * update and off <= 0.01 * n, (small_diff, update, off, n)
    rest = max((float((dp[k] - b2[k]).abs().max()) for k in dp if k not in ups), default=0.0)
    assert rest <= 1e-3 * update, rest  # the A factors (no gradient while B is zero) and any alphas
    apart = sum(int(((b1[k] - b2[k]).abs() > 1e-5).sum()) for k in ups)
    assert apart > 0.1 * n, "a batch-1 step must differ widely (else the test could not see a missing all-reduce " \
                            "or a wrong shard)"

    # only rank 0 wrote: the LoRA, the image, the checkpoint, each once
    writes = {r: json.loads((audit / f"writes-{r}.json").read_text()) for r in ("0", "1")}
    assert writes["1"] == [], writes["1"]
    written = {Path(p).name for p in writes["0"]}
    assert "trained.safetensors" in written and any(n.startswith("img_") for n in written)
    assert any(n.startswith("lora-") and n.endswith(".pt") for n in written)
    assert sorted(p.name for p in (models / "loras" / "dp").iterdir()) == ["trained.safetensors"]
    assert len(list((out / "dp").glob("*.png"))) == 1
    assert len(list((out / "finetune_checkpoints").glob("*.pt"))) == 1


def test_accelerate_launch_runs_the_workflow_data_parallel(models_dir, tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2 -m comfy_finetune run WF.json`` (CPU: gloo) gives the
    same LoRA as one process with the same global batch."""
    pytest.importorskip("accelerate")
    models = tmp_path / "models"
    for sub in ("checkpoints", "loras", "embeddings", "diffusers"):
        (models / sub).mkdir(parents=True)
    shutil.copytree(models_dir / "diffusers" / "tiny-sd1", models / "diffusers" / "tiny-sd1")
    wf = {k: v for k, v in graph(2, "acc/trained").items() if k in ("1", "2", "3", "4")}
    (tmp_path / "wf.json").write_text(json.dumps(wf))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(_free_port()), "-m", "comfy_finetune", "run",
                           str(tmp_path / "wf.json"), "--models", str(models), "--output", str(tmp_path / "out"),
                           "--input", str(tmp_path), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 1 of 2" in proc.stderr or "rank 0 of 2" in proc.stderr, proc.stderr[-2000:]
    tag = uuid.uuid4().hex[:8]
    Executor(node_classes()).execute({**wf, "4": {**wf["4"], "inputs": {**wf["4"]["inputs"],
                                                                         "name": f"acc-{tag}/b2"}}})
    dp = _tensors(models / "loras" / "acc" / "trained.safetensors")
    b2 = _tensors(models_dir / "loras" / f"acc-{tag}" / "b2.safetensors")
    assert dp.keys() == b2.keys()
    assert max(float((dp[k] - b2[k]).abs().max()) for k in dp) <= 1e-5
    assert sorted(p.name for p in (models / "loras" / "acc").iterdir()) == ["trained.safetensors"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
