"""Faults during training (issue 7, item 3): kill, disk full, NaN/inf loss, out of memory.

* SIGKILL at a random step: the last checkpoint is whole and loads weights-only; resume in a fresh process reaches
  the weights of an uninterrupted run.
* Disk full while writing a checkpoint or a LoRA: the previous file is intact, no temp file remains, and the error
  names the folder and the fix.
* NaN/inf loss: stop naming the step, or roll back to the last good state with a halved learning rate.
* Out of memory: an error naming the node and the settings to lower; optimizer, gradients and graph released; the
  base handle restored; the next run works.

The loop tests use a tiny quadratic objective (the loop only needs param_groups/loss/trainable_state/
load_trainable_state); the LoRA tests use the tiny SD1 model.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import io
import itertools
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from comfy_finetune import host
from comfy_finetune.core.errors import FinetuneError, Interrupted
from comfy_finetune.nodes.data import find_dataset_folder
from comfy_finetune.training import loop
from comfy_finetune.training.data import prepare, read_folder
from comfy_finetune.training.lora_trainer import LoraObjective, LoraSpec, train_lora
from comfy_finetune.training.settings import MAX_ROLLBACKS, TrainSettings

CPU = torch.device("cpu")
NODE = "FaultTest"


# ============================================================================================== helpers

class Quadratic:
    """Fit ``w`` to a target through noisy losses; inject NaN/inf or out-of-memory at chosen (1-based) steps."""

    def __init__(self, *, bad_at: dict[int, int] | None = None, bad_value: float = float("nan"),
                 oom_at: int | None = None) -> None:
        self.w = torch.nn.Parameter(torch.zeros(16))
        self.target = torch.linspace(-1.0, 1.0, 16)
        self.bad_at = dict(bad_at or {})  # step -> how many more times the loss there is bad
        self.bad_value = bad_value
        self.oom_at = oom_at
        self.refs: dict[str, weakref.ref] = {}

    def param_groups(self) -> list[dict]:
        return [{"params": [self.w]}]

    def loss(self, step: int, batch, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(16, generator=generator) * 0.1
        activation = (self.w.unsqueeze(0) * torch.ones(256, 1)) - (self.target + noise)  # a "big" graph tensor
        loss = (activation ** 2).mean()
        if self.oom_at == step + 1:
            self.refs["activation"] = weakref.ref(activation)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 24.00 GiB total)")
        if self.bad_at.get(step + 1, 0) > 0:
            self.bad_at[step + 1] -= 1
            return loss * self.bad_value
        return loss

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {"w": self.w.detach()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.w.copy_(state["w"])


def batches(first: int):
    return itertools.count(first)


def quad_settings(**kw) -> TrainSettings:
    return TrainSettings(**{"steps": 12, "learning_rate": 0.05, "seed": 3, **kw})


def run_quad(objective: Quadratic, settings: TrainSettings, checkpoint: Path | None = None) -> loop.TrainResult:
    return loop.train(objective, batches, settings, node=NODE, device=CPU, checkpoint=checkpoint)


@contextlib.contextmanager
def event_sink(fn):
    host.add_event_sink(fn)
    try:
        yield
    finally:
        host._settings.event_sinks.remove(fn)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(autouse=True)
def own_output_dir(models_dir, tmp_path, monkeypatch):
    """Checkpoints of these tests go to a folder of their own (other test files count the shared one's files)."""
    out = tmp_path / "output"
    out.mkdir()
    monkeypatch.setattr(host._settings, "output_dir", out)
    host._settings.interrupted.clear()
    yield out
    host._settings.interrupted.clear()


@pytest.fixture(scope="module")
def dataset(models_dir):
    return prepare(read_folder(find_dataset_folder("[example] red-circle")), resolution=64)


# ============================================================================================== 1. SIGKILL

_CHILD = textwrap.dedent('''
    import os, sys
    from dataclasses import replace
    from pathlib import Path

    import torch

    from comfy_finetune import host
    from comfy_finetune.core.loading import load_base
    from comfy_finetune.core.tiny import build_tiny_pipeline_folder
    from comfy_finetune.nodes.data import find_dataset_folder
    from comfy_finetune.training.data import prepare, read_folder
    from comfy_finetune.training.lora_trainer import LoraSpec, train_lora
    from comfy_finetune.training.settings import TrainSettings

    mode, root, steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    host.configure(models_dir=root / "models", output_dir=root / "out", input_dir=root / "in", progress=False)
    os.environ["COMFY_FINETUNE_CACHE"] = str(root / "cache")
    if not (root / "models" / "diffusers" / "tiny-sd1").exists():
        build_tiny_pipeline_folder(root / "models" / "diffusers" / "tiny-sd1", "sd1", seed=0)
    handle = load_base("diffusers/tiny-sd1", "fp32", "cpu")
    data = prepare(read_folder(find_dataset_folder("[example] red-circle")), resolution=64)
    settings = TrainSettings(steps=steps, learning_rate=1e-3, seed=5, save_every=2, lr_schedule="cosine",
                             warmup_steps=2)
    spec = LoraSpec(rank=2, alpha=2)

    def dump(lora, name):
        torch.save({f"{c}|{p}|{w}": getattr(m, w) for (c, p), m in lora.modules.items() for w in ("down", "up")},
                   root / name)

    if mode == "victim":
        host.add_event_sink(lambda e, d: print(f"STEP {d['step']}", flush=True) if e == "comfy_finetune.train"
                            else None)
        print("READY", flush=True)
        train_lora(handle, data, settings, spec)
        print("DONE", flush=True)
    else:
        lora, result = train_lora(handle, data, replace(settings, resume=True), spec)
        dump(lora, "resumed.pt")
        print(f"RESUMED {result.resumed_from} {result.steps_done}", flush=True)
        host.configure(output_dir=root / "out_reference")
        lora, _ = train_lora(handle, data, settings, spec)  # uninterrupted, same seed
        dump(lora, "reference.pt")
''')


def _child_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    return env


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_sigkill_at_a_random_step_then_resume_reaches_the_uninterrupted_weights(tmp_path):
    seed = int(os.environ.get("FT_FAULT_SEED", time.time_ns() % 100_000))
    rng = random.Random(seed)
    steps = 20
    kill_at = rng.randint(3, 12)  # >= 3: the step-2 checkpoint is written before step 3 is reported
    delay = rng.uniform(0.0, 0.04)  # lands the kill anywhere in the next step, also inside a checkpoint write
    why = f"FT_FAULT_SEED={seed} kill_at={kill_at} delay={delay:.3f}"
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    root = tmp_path / "run"
    root.mkdir()
    with open(tmp_path / "victim.err", "w") as err:
        proc = subprocess.Popen([sys.executable, str(script), "victim", str(root), str(steps)], stdout=subprocess.PIPE,
                                stderr=err, text=True, env=_child_env())
        watchdog = threading.Timer(90, proc.kill)
        watchdog.start()
        seen: list[int] = []
        try:
            for line in proc.stdout:
                if line.startswith("STEP"):
                    seen.append(int(line.split()[1]))
                    if seen[-1] >= kill_at:
                        time.sleep(delay)
                        os.kill(proc.pid, signal.SIGKILL)
                        break
            seen += [int(x.split()[1]) for x in proc.stdout.read().splitlines() if x.startswith("STEP")]
            proc.wait(30)
        finally:
            watchdog.cancel()
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, (why, proc.returncode, (tmp_path / "victim.err").read_text()[-2000:])

    folder = root / "out" / "finetune_checkpoints"
    files = sorted(folder.iterdir())
    kept = [f for f in files if not f.name.startswith(".")]
    assert len(kept) == 1 and kept[0].name.startswith("lora-") and kept[0].suffix == ".pt", (why, files)
    ckpt = kept[0]
    # a kill inside a write can leave only the dead process's temp file (never the checkpoint's own name)
    assert all(f.name.startswith(f".{ckpt.name}.tmp-{proc.pid}-") for f in files if f not in kept), (why, files)
    state = torch.load(ckpt, weights_only=True)
    last_even_reported = max(s for s in seen if s % 2 == 0 and s < kill_at) if kill_at > 2 else 2
    assert state["step"] % 2 == 0 and last_even_reported <= state["step"] <= max(seen), (why, state["step"], seen)
    assert len(state["losses"]) == state["step"] and state["trainable"]
    assert all(torch.isfinite(t).all() for t in state["trainable"].values())

    done = subprocess.run([sys.executable, str(script), "finish", str(root), str(steps)], capture_output=True,
                          text=True, env=_child_env(), timeout=120)
    assert done.returncode == 0, (why, done.stderr[-3000:])
    assert f"RESUMED {state['step']} {steps}" in done.stdout, (why, done.stdout)
    assert _hidden(folder) == [], "the resumed run removes temp files left by the killed one"
    resumed, reference = torch.load(root / "resumed.pt"), torch.load(root / "reference.pt")
    assert resumed.keys() == reference.keys() and resumed
    for key in reference:
        assert torch.allclose(resumed[key], reference[key], atol=1e-6), (why, key)


_WRITE_VICTIM = """
import io, itertools, sys, time, weakref
from pathlib import Path

import torch

from comfy_finetune import host
from comfy_finetune.training import loop
from comfy_finetune.training.settings import TrainSettings

{source}

host.configure(progress=False)
real_save = torch.save


def slow_save(obj, f, *args, **kwargs):
    if obj.get("step") == 6:  # half of the step-6 checkpoint is on disk when the kill comes
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        print("WRITING", flush=True)
        time.sleep(60)
    return real_save(obj, f, *args, **kwargs)


torch.save = slow_save
loop.train(Quadratic(), lambda first: itertools.count(first),
           TrainSettings(steps=10, learning_rate=0.05, seed=3, save_every=2), node="Victim",
           device=torch.device("cpu"), checkpoint=Path(sys.argv[1]))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_sigkill_inside_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    import inspect

    script = tmp_path / "victim.py"
    script.write_text(_WRITE_VICTIM.replace("{source}", inspect.getsource(Quadratic)))
    ckpt = tmp_path / "ck" / "run.pt"
    proc = subprocess.Popen([sys.executable, str(script), str(ckpt)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=_child_env())
    try:
        for line in proc.stdout:
            if line.strip() == "WRITING":
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    names = sorted(p.name for p in ckpt.parent.iterdir())
    assert len(names) == 2 and names[0].startswith(f".run.pt.tmp-{proc.pid}-") and names[1] == "run.pt", names
    assert torch.load(ckpt, weights_only=True)["step"] == 4, "the checkpoint before the killed write is whole"

    settings = quad_settings(steps=10, save_every=2)
    resumed = Quadratic()
    result = run_quad(resumed, replace(settings, resume=True), ckpt)
    assert result.resumed_from == 4 and _hidden(ckpt.parent) == [], "the half-written temp file is removed"
    reference = Quadratic()
    run_quad(reference, settings, tmp_path / "ref" / "run.pt")
    assert torch.allclose(resumed.w, reference.w, atol=1e-6, rtol=0)


def test_stale_temp_files_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    ckpt = tmp_path / "ck" / "run.pt"
    run_quad(Quadratic(), quad_settings(steps=4, save_every=2), ckpt)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = ckpt.with_name(f".{ckpt.name}.tmp-{dead.pid}-0badf00d")
    live = ckpt.with_name(f".{ckpt.name}.tmp-{os.getppid()}-0000cafe")  # a running process (pytest's parent)
    other = ckpt.with_name(".unrelated.tmp-1-00")
    ours_old = ckpt.with_name(f".{ckpt.name}.tmp-{os.getpid()}-00c0ffee")  # same pid, before this process started
    ours_new = ckpt.with_name(f".{ckpt.name}.tmp-{os.getpid()}-11c0ffee")  # same pid, written now: in progress
    for f in (stale, live, other, ours_old, ours_new):
        f.write_bytes(b"partial")
    os.utime(ours_old, (time.time() - 86400 * 365, time.time() - 86400 * 365))
    result = run_quad(Quadratic(), quad_settings(steps=6, save_every=2, resume=True), ckpt)
    assert result.resumed_from == 4 and result.steps_done == 6
    assert not stale.exists() and not ours_old.exists()
    assert live.exists() and other.exists() and ours_new.exists()
    assert torch.load(ckpt, weights_only=True)["step"] == 6


# ============================================================================================== 2. disk full

def _partial_then(exc_factory):
    """A torch.save that writes half the bytes and then fails like a full disk does."""
    real = torch.save
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            return real(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        raise exc_factory()

    return save


def _enospc():
    return OSError(errno.ENOSPC, "No space left on device")


def _wrapped_enospc():  # what torch.save really raises: its writer's RuntimeError, raised while the OSError was
    err = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    err.__context__ = _enospc()
    return err


@pytest.mark.parametrize("failure", [_enospc, _wrapped_enospc], ids=["oserror", "torch-wrapped"])
def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    folder = tmp_path / "full disk"
    ckpt = folder / "run.pt"
    monkeypatch.setattr(torch, "save", _partial_then(failure))
    with pytest.raises(FinetuneError) as info:
        run_quad(Quadratic(), quad_settings(steps=6, save_every=2), ckpt)
    msg = str(info.value)
    assert msg.startswith(f"[{NODE}]") and "the disk is full" in msg and str(folder) in msg, msg
    assert "checkpoint of step 2 is kept" in msg and "Fix: free space" in msg and "another disk" in msg, msg
    assert [p.name for p in folder.iterdir()] == ["run.pt"], "no temp file may remain"
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 2 and len(state["losses"]) == 2

    monkeypatch.undo()  # space freed: resume goes on from the kept checkpoint
    result = run_quad(Quadratic(), quad_settings(steps=6, save_every=2, resume=True), ckpt)
    assert result.resumed_from == 2 and result.steps_done == 6 and len(result.losses) == 6


@pytest.fixture(scope="module")
def small_lora(tiny_handles, dataset):
    lora, _ = train_lora(tiny_handles["sd1"], dataset, TrainSettings(steps=2, learning_rate=1e-3), LoraSpec(rank=2))
    return lora


def _st_enospc():
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("failure", [_enospc, _st_enospc], ids=["oserror", "safetensors"])
def test_disk_full_while_saving_a_lora_keeps_the_previous_file(tiny_handles, small_lora, tmp_path, monkeypatch,
                                                               failure):
    import safetensors.torch
    from safetensors.torch import load_file

    from comfy_finetune.nodes.saving import SaveLoRA

    models = tmp_path / "models"
    (models / "loras").mkdir(parents=True)
    monkeypatch.setattr(host._settings, "models_dir", models)
    h = tiny_handles["sd1"]
    SaveLoRA().run(small_lora, h, "faults/my_lora", "kohya", True)
    path = models / "loras" / "faults" / "my_lora.safetensors"
    before = path.read_bytes()
    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # the disk filled up midway
            f.truncate(os.path.getsize(filename) // 2)
        raise failure()

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(FinetuneError) as info:
        SaveLoRA().run(small_lora, h, "faults/my_lora", "kohya", True)
    msg = str(info.value)
    assert msg.startswith("[FinetuneSaveLoRA]") and "the disk is full" in msg, msg
    assert str(path.parent) in msg and "my_lora.safetensors" in msg, msg
    assert "Fix: free space" in msg and "another disk" in msg, msg
    assert path.read_bytes() == before, "the previous file must be intact"
    assert load_file(str(path)).keys()
    assert [p.name for p in path.parent.iterdir()] == ["my_lora.safetensors"], "no temp file may remain"


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    from comfy_finetune.core.atomic import atomic_write

    target = tmp_path / "x.bin"
    target.write_bytes(b"old")

    def fail(tmp):
        tmp.write_bytes(b"new")
        raise OSError(errno.EACCES, "Permission denied")

    with pytest.raises(OSError, match="Permission denied"):
        atomic_write(target, fail)
    assert target.read_bytes() == b"old" and _hidden(tmp_path) == []


# ============================================================================================== 3. NaN / inf loss

@pytest.mark.parametrize("value,word", [(float("nan"), "nan"), (float("inf"), "inf")])
def test_nan_stop_names_the_step(value, word):
    objective = Quadratic(bad_at={4: 1}, bad_value=value)
    with pytest.raises(FinetuneError, match=rf"\[{NODE}\] input 'learning_rate': the loss became {word} at step 4\b"
                                            r".*Fix: .*lower learning_rate, set on_nan to rollback"):
        run_quad(objective, quad_settings())


@pytest.mark.parametrize("times", [1, 2])
def test_nan_rollback_restores_the_last_good_state_halves_the_lr_and_continues(monkeypatch, times):
    settings = quad_settings(save_every=3, nan_policy="rollback")  # good states kept at steps 0, 3, 6, 9
    objective = Quadratic(bad_at={5: times})  # twice: the second rollback goes back to the same kept state
    seen: dict[int, torch.Tensor] = {}
    rollback_events = []

    def sink(event, data):
        if event == "comfy_finetune.train" and data["step"] not in seen:
            seen[data["step"]] = objective.w.detach().clone()
        elif event == "comfy_finetune.train_rollback":
            rollback_events.append((data, objective.w.detach().clone()))

    with event_sink(sink):
        result = run_quad(objective, settings)
    scale = 0.5 ** times
    assert result.rollbacks == [(5, 3, 0.5 ** (i + 1)) for i in range(times)]
    assert len(rollback_events) == times
    for i, (event, w_after) in enumerate(rollback_events):
        assert event["step"] == 5 and event["to_step"] == 3 and event["lr_scale"] == 0.5 ** (i + 1)
        assert torch.equal(w_after, seen[3]), "rolled back to exactly the state after step 3"
    assert result.steps_done == 12 and len(result.losses) == len(result.lrs) == 12
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.lrs[:3] == [0.05] * 3 and result.lrs[3:] == [0.05 * scale] * 9
    assert torch.isfinite(objective.w).all()

    # the optimizer state was restored too (untouched by the retried steps): same as a run whose learning rate
    # drops after step 3
    monkeypatch.setattr(loop, "lr_lambda", lambda s: (lambda step: 1.0 if step < 3 else scale))
    reference = Quadratic()
    run_quad(reference, quad_settings(save_every=3))
    assert torch.allclose(objective.w, reference.w, atol=1e-7, rtol=0)


def test_nan_rollback_gives_up_after_three_rollbacks():
    objective = Quadratic(bad_at={5: 99})
    with pytest.raises(FinetuneError, match=rf"loss became nan at step 5 again after {MAX_ROLLBACKS} rollbacks "
                                            r"\(learning rate now x0.125\).*Fix:"):
        run_quad(objective, quad_settings(save_every=3, nan_policy="rollback"))


def test_nan_rollback_without_a_good_state_stops():
    with pytest.raises(FinetuneError, match=r"loss became nan at step 1 \(there was no good state to roll back to\)"):
        run_quad(Quadratic(bad_at={1: 1}), quad_settings(nan_policy="rollback"))


def test_nan_rollback_survives_cancel_and_resume(tmp_path):
    settings = quad_settings(save_every=3, nan_policy="rollback")
    full = Quadratic(bad_at={5: 1})
    full_result = run_quad(full, settings)

    ckpt = tmp_path / "ck.pt"

    def cancel_at_9(event, data):
        if event == "comfy_finetune.train" and data["step"] == 9:
            host.request_interrupt()

    with event_sink(cancel_at_9), pytest.raises(Interrupted):
        run_quad(Quadratic(bad_at={5: 1}), settings, ckpt)
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 9 and state["lr_scale"] == 0.5 and state["rollbacks"] == [[5, 3, 0.5]]
    resumed = Quadratic()
    result = run_quad(resumed, replace(settings, resume=True), ckpt)
    assert result.resumed_from == 9 and result.rollbacks == full_result.rollbacks
    assert result.lrs == full_result.lrs
    assert torch.allclose(resumed.w, full.w, atol=1e-7, rtol=0)


def test_nan_policy_setting_and_node_input():
    from comfy_finetune.nodes.dreambooth import DreamBoothTrain
    from comfy_finetune.nodes.embedding_training import LearnEmbedding
    from comfy_finetune.nodes.training import TrainLoRA, settings_from

    with pytest.raises(FinetuneError, match=r"\[X\] input 'on_nan': unknown NaN policy 'retry'.*stop, rollback"):
        TrainSettings(nan_policy="retry").validate("X")
    assert TrainSettings().nan_policy == "stop"
    for node in (TrainLoRA, LearnEmbedding, DreamBoothTrain):
        optional = node.INPUT_TYPES()["optional"]
        # on_nan came last before the speed/memory options and then the recipe were appended (widget positions of
        # older workflows)
        late = {DreamBoothTrain: ["targets", "algorithm"], LearnEmbedding: ["min_timestep"],
                TrainLoRA: ["algorithm"]}.get(node, [])  # after the recipe
        # then the memory options every trainer shares, and the scorer: a link (no widget position), last
        late = [*late, "fused_step", "fp8_base", "offload_unet", "scorer"]
        assert list(optional)[-6 - len(late):] == ["on_nan", "cache_to_disk", "compile", "channels_last",
                                                   "offload_frozen", "recipe", *late], node
        choices, opts = optional["on_nan"]
        assert choices == ["stop", "rollback"] and opts["default"] == "stop", node
    required = TrainLoRA.INPUT_TYPES()["required"]
    kwargs = {k: v[1]["default"] for k, v in required.items() if "default" in v[1]}
    assert settings_from(kwargs).nan_policy == "stop"
    assert settings_from({**kwargs, "on_nan": "rollback"}).nan_policy == "rollback"


def test_lora_nan_rollback_finishes_with_finite_weights(tiny_handles, dataset, monkeypatch):
    h = tiny_handles["sd1"]
    unet_before = _state(h.base.unet)
    real = LoraObjective.loss
    injected = []

    def loss(self, step, batch, generator, denoiser):
        out = real(self, step, batch, generator, denoiser)
        if step + 1 == 4 and not injected:
            injected.append(step)
            return out * float("nan")
        return out

    monkeypatch.setattr(LoraObjective, "loss", loss)
    settings = TrainSettings(steps=8, learning_rate=1e-3, seed=2, nan_policy="rollback")
    lora, result = train_lora(h, dataset, settings, LoraSpec(rank=2, alpha=2))
    assert result.rollbacks == [(4, 2, 0.5)]  # good states every step (steps/10 < 1): step 2's loss was finite
    assert len(result.losses) == 8 and all(torch.isfinite(torch.tensor(result.losses)))
    assert result.lrs[:2] == [1e-3] * 2 and result.lrs[2:] == [5e-4] * 6
    assert all(torch.isfinite(m.down).all() and torch.isfinite(m.up).all() for m in lora.modules.values())
    assert any(float(m.up.abs().sum()) > 0 for m in lora.modules.values())
    assert _same(unet_before, _state(h.base.unet))


# ============================================================================================== 4. out of memory

def _track_optimizer(monkeypatch) -> dict:
    refs: dict[str, weakref.ref] = {}
    real = loop.make_optimizer

    def make(groups, settings, node):
        optimizer = real(groups, settings, node)
        refs["optimizer"] = weakref.ref(optimizer)
        refs["param"] = weakref.ref(groups[0]["params"][0])
        return optimizer

    monkeypatch.setattr(loop, "make_optimizer", make)
    return refs


def _assert_oom_message(msg: str, node: str, step: int) -> None:
    assert msg.startswith(f"[{node}]") and f"out of GPU memory at step {step}" in msg, msg
    assert "Tried to allocate" in msg and "released" in msg, msg
    fix = msg.split("Fix:", 1)[1]
    for setting in ("batch_size", "resolution", "enable gradient_checkpointing", "bf16 or fp16", "rank"):
        assert setting in fix, (setting, msg)


def test_out_of_memory_in_the_loop_releases_optimizer_and_graph(monkeypatch):
    refs = _track_optimizer(monkeypatch)
    objective = Quadratic(oom_at=3)
    with pytest.raises(FinetuneError) as info:
        run_quad(objective, quad_settings())
    _assert_oom_message(str(info.value), NODE, 3)
    assert info.value.__context__ is None and info.value.__cause__ is None, "no chain keeping the failed frames"
    gc.collect()
    # the error is still alive (info holds it with its traceback), yet nothing it reaches holds these
    assert refs["optimizer"]() is None, "the optimizer (and its state) must be released"
    assert objective.refs["activation"]() is None, "the autograd graph of the failed step must be released"
    assert objective.w.grad is None

    objective.oom_at = None  # memory available again: the next run works
    result = run_quad(objective, quad_settings(steps=3))
    assert result.steps_done == 3 and all(torch.isfinite(torch.tensor(result.losses)))


def test_out_of_memory_training_a_lora_through_the_node(tiny_handles, dataset, monkeypatch):
    from comfy_finetune.nodes.training import TrainLoRA

    h = tiny_handles["sd1"]
    unet_before, te_before = _state(h.base.unet), _state(h.base.text_encoders[0])
    modules_before = [n for n, _ in h.base.unet.named_modules()]
    required = TrainLoRA.INPUT_TYPES()["required"]
    kwargs = {k: v[1]["default"] for k, v in required.items() if "default" in v[1]}
    kwargs.update(steps=3, learning_rate=1e-3, rank=2, alpha=2.0, targets="attention", seed=4)
    reference, _, _, _ = TrainLoRA().run(pipe=h, dataset=dataset, **kwargs)

    refs = _track_optimizer(monkeypatch)
    real = LoraObjective.loss

    def loss(self, step, batch, generator, denoiser):
        out = real(self, step, batch, generator, denoiser)
        if step + 1 == 2:
            refs["graph"] = weakref.ref(out)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return out

    monkeypatch.setattr(LoraObjective, "loss", loss)
    with pytest.raises(FinetuneError) as info:
        TrainLoRA().run(pipe=h, dataset=dataset, **kwargs)
    _assert_oom_message(str(info.value), "FinetuneTrainLoRA", 2)
    gc.collect()
    assert refs["optimizer"]() is None and refs["graph"]() is None and refs["param"]() is None, \
        "optimizer, graph and the adapter weights must be released"
    assert [n for n, _ in h.base.unet.named_modules()] == modules_before, "peft layers must be removed"
    assert _same(unet_before, _state(h.base.unet)) and _same(te_before, _state(h.base.text_encoders[0]))
    assert all(not p.requires_grad for p in h.base.unet.parameters())

    monkeypatch.setattr(LoraObjective, "loss", real)  # memory available again: the next run works
    again, _, _, _ = TrainLoRA().run(pipe=h, dataset=dataset, **kwargs)
    assert again.modules.keys() == reference.modules.keys()
    for key, mod in reference.modules.items():
        assert torch.allclose(mod.down, again.modules[key].down, atol=1e-6)
        assert torch.allclose(mod.up, again.modules[key].up, atol=1e-6)
