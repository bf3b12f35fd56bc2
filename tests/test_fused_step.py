"""The fused optimizer step (training/loop.py FusedStep): the optimizer steps each tensor inside the backward pass and
frees its gradient, so at most one gradient exists at a time; the result equals the plain step's; resume is exact;
fused_step on refuses the settings where it would not be exact."""

from __future__ import annotations

import pytest
import torch

from comfy_finetune.core.errors import FinetuneError
from comfy_finetune.nodes.data import find_dataset_folder
from comfy_finetune.training import dreambooth as db
from comfy_finetune.training import loop
from comfy_finetune.training.data import prepare, read_folder
from comfy_finetune.training.settings import TrainSettings

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def red(models_dir):
    return prepare(read_folder(find_dataset_folder("[example] red-circle")), resolution=64)


def _spec() -> db.DreamBoothSpec:
    return db.DreamBoothSpec(instance_prompt="a photo of sks circle", class_prompt="a photo of a circle",
                             prior_preservation=False, method="full")


def _settings(**kw) -> TrainSettings:
    base = dict(steps=3, learning_rate=1e-4, seed=5, batch_size=2, cache_to_disk=False, precision="fp32")
    base.update(kw)
    return TrainSettings(**base)


def _unet(handle) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in handle.base.unet.state_dict().items()}


class _Tiny:
    """A two-tensor least-squares objective for the loop itself (no model)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(8, 4, generator=g).requires_grad_(True)
        self.b = torch.zeros(8).requires_grad_(True)
        self.x, self.y = torch.randn(16, 4, generator=g), torch.randn(16, 8, generator=g)

    def param_groups(self):
        return [{"params": [self.w]}, {"params": [self.b], "lr": 1e-2}]

    def loss(self, step, batch, generator):
        return ((self.x @ self.w.T + self.b - self.y) ** 2).mean()

    def trainable_state(self):
        return {"w": self.w.detach(), "b": self.b.detach()}

    def load_trainable_state(self, state):
        with torch.no_grad():
            self.w.copy_(state["w"])
            self.b.copy_(state["b"])


def _batches(first):
    while True:
        yield None


def test_fused_step_matches_the_plain_step_and_its_state_is_the_standard_format():
    runs = {}
    for mode in ("off", "on"):
        obj = _Tiny()
        settings = TrainSettings(steps=5, learning_rate=1e-2, fused_step=mode, lr_schedule="cosine",
                                 cache_to_disk=False)
        result = loop.train(obj, _batches, settings, node="t", device=torch.device("cpu"))
        assert result.fused_step is (mode == "on")
        runs[mode] = (obj, result)
    (plain, r0), (fused, r1) = runs["off"], runs["on"]
    assert r0.losses == pytest.approx(r1.losses, rel=1e-6)
    assert torch.allclose(plain.w, fused.w, atol=1e-6) and torch.allclose(plain.b, fused.b, atol=1e-6)
    assert fused.w.grad is None and fused.b.grad is None  # every gradient freed in backward
    # the state dict a FusedStep writes loads into torch's AdamW (and back): checkpoints resume either way
    obj = _Tiny()
    step = loop.FusedStep(obj.param_groups(), TrainSettings(learning_rate=1e-2), "t")
    obj.loss(0, None, None).backward()
    assert step.steps_in_backward == 2
    sd = step.state_dict()
    adamw = torch.optim.AdamW(obj.param_groups(), lr=1e-2, weight_decay=1e-2)
    adamw.load_state_dict(sd)
    assert torch.equal(adamw.state[obj.w]["exp_avg"], sd["state"][0]["exp_avg"])
    step.load_state_dict(adamw.state_dict())
    assert torch.equal(step.state_dict()["state"][1]["exp_avg_sq"], sd["state"][1]["exp_avg_sq"])
    step.close()
    obj.loss(0, None, None).backward()  # hooks removed: gradients stay
    assert obj.w.grad is not None and step.steps_in_backward == 2


def test_full_dreambooth_fused_one_gradient_at_a_time_same_result_and_exact_resume(tiny_handles, red, monkeypatch):
    h = tiny_handles["sd1"]
    params: list[torch.Tensor] = []
    alive: list[int] = []
    real_setup = loop._Loop.setup

    def setup(self):  # hooks registered before the loop's: they see each gradient before the step frees it
        params[:] = [p for g in self.objective.param_groups() for p in g["params"]]
        self._test_hooks = [p.register_post_accumulate_grad_hook(
            lambda p: alive.append(sum(q.grad is not None for q in params))) for p in params]
        return real_setup(self)

    with monkeypatch.context() as m:
        m.setattr(loop._Loop, "setup", setup)
        fused_out, _, r_fused = db.train_dreambooth(h, red, _settings(fused_step="on"), _spec())
    assert r_fused.fused_step
    assert len(alive) == 3 * len(params)  # one hook call per tensor per step
    assert max(alive) == 1  # never two gradients at once
    plain_out, _, r_plain = db.train_dreambooth(h, red, _settings(fused_step="off"), _spec())
    assert not r_plain.fused_step
    assert r_fused.losses == pytest.approx(r_plain.losses, rel=1e-5)
    a, b = _unet(fused_out), _unet(plain_out)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert any(not torch.equal(a[k], v) for k, v in _unet(h).items())  # it trained
    # 2 steps with a checkpoint, then resumed to 3 (fused_step is not part of the run's key: the plain run's
    # optimizer state format is the same): the same weights as the uninterrupted fused run
    db.train_dreambooth(h, red, _settings(steps=2, fused_step="on", save_every=1), _spec())
    again, _, r_again = db.train_dreambooth(h, red, _settings(fused_step="on", resume=True), _spec())
    assert r_again.resumed_from == 2 and r_again.losses == r_fused.losses
    c = _unet(again)
    assert all(torch.equal(v, c[k]) for k, v in a.items())


def test_fused_resume_mid_run_is_exact(tmp_path):
    """Stop after 2 of 4 steps (checkpoint), resume fused: the same weights as an uninterrupted fused run."""
    ckpt = tmp_path / "fused.pt"
    straight = _Tiny()
    settings = TrainSettings(steps=4, learning_rate=1e-2, fused_step="on", cache_to_disk=False, save_every=2)
    loop.train(straight, _batches, settings, node="t", device=torch.device("cpu"))
    first = _Tiny()
    loop.train(first, _batches, TrainSettings(**{**settings.__dict__, "steps": 2}), node="t",
               device=torch.device("cpu"), checkpoint=ckpt)
    resumed = _Tiny()
    r = loop.train(resumed, _batches, TrainSettings(**{**settings.__dict__, "resume": True}), node="t",
                   device=torch.device("cpu"), checkpoint=ckpt)
    assert r.resumed_from == 2 and r.fused_step
    assert torch.equal(resumed.w, straight.w) and torch.equal(resumed.b, straight.b)


def test_fused_step_plan_auto_and_refusals():
    big, small = loop.FUSED_AUTO_BYTES, 40
    cpu = torch.device("cpu")
    assert loop.fused_step_plan(TrainSettings(), big, cpu, "n")[0]
    assert not loop.fused_step_plan(TrainSettings(), small, cpu, "n")[0]  # adapters: off
    assert not loop.fused_step_plan(TrainSettings(grad_accum=2), big, cpu, "n")[0]  # saves nothing
    assert loop.fused_step_plan(TrainSettings(grad_accum=2, fused_step="on"), small, cpu, "n")[0]
    assert not loop.fused_step_plan(TrainSettings(optimizer="prodigy"), big, cpu, "n")[0]
    with pytest.raises(FinetuneError) as err:
        loop.fused_step_plan(TrainSettings(optimizer="prodigy", fused_step="on"), small, cpu, "n")
    assert err.value.input == "optimizer" and "fused_step auto" in err.value.fix
    with pytest.raises(FinetuneError) as err:
        loop.fused_step_plan(TrainSettings(precision="fp16", fused_step="on"), small, cpu, "n")
    assert err.value.input == "precision"


def test_fused_with_grad_accum_and_rollback_match_the_plain_step():
    out = {}
    for mode in ("off", "on"):
        obj = _Tiny()
        calls = {"n": 0}
        real = obj.loss

        def loss(step, batch, generator, real=real, calls=calls):  # step 3's second micro-batch is NaN once
            calls["n"] += 1
            value = real(step, batch, generator)
            return value * float("nan") if calls["n"] == 8 else value

        obj.loss = loss
        settings = TrainSettings(steps=5, learning_rate=1e-2, grad_accum=2, fused_step=mode, nan_policy="rollback",
                                 cache_to_disk=False, save_every=1)
        out[mode] = (obj, loop.train(obj, _batches, settings, node="t", device=torch.device("cpu")))
    (p, r0), (f, r1) = out["off"], out["on"]
    assert r1.fused_step and r0.rollbacks == r1.rollbacks and len(r1.rollbacks) == 1
    assert r0.losses == pytest.approx(r1.losses, rel=1e-6)
    assert torch.allclose(p.w, f.w, atol=1e-6)
