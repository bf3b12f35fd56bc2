"""fp8_base (training/fp8.py): frozen UNet layers in float8 e4m3 with a per-tensor scale, upcast per layer in the
forward and backward passes; in effect during LoRA training, gradients equal to the upcast layer's, resume exact, the
shared base put back bit for bit, and the memory estimate models it."""

from __future__ import annotations

import pytest
import torch

from comfy_finetune.training import fp8, memory
from comfy_finetune.training.data import from_image_batch
from comfy_finetune.training.frame import prepared
from comfy_finetune.training.lora_trainer import LoraObjective, LoraSpec, train_lora
from comfy_finetune.training.settings import TrainSettings

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(models_dir):
    g = torch.Generator().manual_seed(0)
    return from_image_batch(torch.rand((2, 64, 64, 3), generator=g), ["a red circle", "a blue square"],
                            resolution=64)


def _settings(**kw) -> TrainSettings:
    base = dict(steps=3, learning_rate=1e-3, batch_size=2, seed=4, cache_to_disk=False, precision="fp32")
    base.update(kw)
    return TrainSettings(**base)


def test_quantize_error_is_within_e4m3s_rounding():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 48, generator=g) * 0.05
    q, scale = fp8.quantize(w)
    assert q.dtype == torch.float8_e4m3fn and q.element_size() == 1
    back = fp8.dequantize(q, scale, torch.float32)
    assert float(back.abs().max()) == pytest.approx(float(w.abs().max()), rel=1e-6)  # the largest is exact
    normal = w.abs() / scale >= 2.0 ** -6  # e4m3's normal range: 3 mantissa bits, round to nearest
    rel = ((back - w).abs() / w.abs())[normal]
    assert float(rel.max()) <= 2.0 ** -4 + 1e-6
    assert 0.005 < float(rel.mean()) < 0.05  # it is not exact either


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("autocast", [False, True])
def test_layer_function_gives_the_upcast_layers_output_and_input_gradient(kind, autocast):
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 24) if kind == "linear" else torch.nn.Conv2d(8, 12, 3, padding=1, stride=2)
    layer.requires_grad_(False)
    x = torch.randn((3, 5, 16) if kind == "linear" else (2, 8, 9, 9), requires_grad=True)
    reference = type(layer)(*((16, 24) if kind == "linear" else (8, 12, 3)),
                            **({} if kind == "linear" else {"padding": 1, "stride": 2})).requires_grad_(False)
    original = layer.weight.detach().clone()
    with fp8.layers_outside([layer], torch.device("cpu"), fp8=True) as layers:
        reference.weight.copy_(layers[0].weight())
        reference.bias.copy_(layer.bias)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
        with ctx:
            out = layer(x)
            ref = reference(x)
        assert out.dtype == ref.dtype
        torch.testing.assert_close(out, ref)
        g = torch.randn_like(out)
        (gx,) = torch.autograd.grad(out, x, g)
        (gr,) = torch.autograd.grad(ref, x, g)
        tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx, gr, **tol)
        assert layers[0].fetches == 3  # the reference's copy, the forward, the backward
    assert "forward" not in vars(layer) and torch.equal(layer.weight, original)


def test_fp8_lora_training_is_in_effect_resumes_exactly_and_leaves_the_base(tiny_handles, dataset, monkeypatch):
    h = tiny_handles["sd1"]
    before = {k: (v.dtype, v.clone()) for k, v in h.base.unet.state_dict().items()}
    fetched: list[int] = []
    calls: list[int] = []
    real, real_call = fp8.Layer.weight, fp8._call

    def counting(self, backward=False):
        fetched.append(1)
        return real(self, backward)

    def call(layer, x, w):
        calls.append(1)
        return real_call(layer, x, w)

    monkeypatch.setattr(fp8.Layer, "weight", counting)
    monkeypatch.setattr(fp8, "_call", call)
    lora8, r8 = train_lora(h, dataset, _settings(fp8_base=True), LoraSpec(rank=4, alpha=4.0))
    n = len(fp8.frozen_layers(h.base.unet))
    assert n > 10
    # every frozen layer runs through its float8 weight once a step, and the backward pass materialises it again
    # for the layers whose input needs a gradient (not conv_in, the time embedding, the text's k/v projections)
    assert len(calls) == 3 * n
    assert 3 * n + 3 * n // 3 < len(fetched) < 6 * n
    fetched.clear()
    lora, r = train_lora(h, dataset, _settings(), LoraSpec(rank=4, alpha=4.0))
    assert not fetched and len(calls) == 3 * n  # off: untouched
    assert r8.losses != r.losses and r8.losses == pytest.approx(r.losses, rel=0.05)  # close, not the same
    after = h.base.unet.state_dict()
    assert all(after[k].dtype == d and torch.equal(after[k], v) for k, (d, v) in before.items())
    assert not any("forward" in vars(m) for m in h.base.unet.modules())
    # resume: 2 steps with checkpoints, then the third from the checkpoint = the uninterrupted run
    train_lora(h, dataset, _settings(steps=2, fp8_base=True, save_every=1), LoraSpec(rank=4, alpha=4.0))
    again, r2 = train_lora(h, dataset, _settings(fp8_base=True, resume=True), LoraSpec(rank=4, alpha=4.0))
    assert r2.resumed_from == 2 and r2.losses == r8.losses
    assert _same_lora(lora8, again)


def _same_lora(a, b) -> bool:
    flat_a, flat_b = _flatten(a.modules), _flatten(b.modules)
    return flat_a.keys() == flat_b.keys() and len(flat_a) > 0 and all(torch.equal(flat_a[k], flat_b[k])
                                                                    for k in flat_a)


def _flatten(obj, prefix="") -> dict:
    out = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}/{i}"))
    elif hasattr(obj, "__dict__"):
        out.update(_flatten(vars(obj), prefix))
    return out


def test_the_estimate_models_fp8(tiny_handles, dataset):
    h = tiny_handles["sd1"]
    settings = _settings()
    objective = LoraObjective(h, dataset, settings, LoraSpec(rank=4, alpha=4.0), node="t")
    with prepared(objective, h, settings, node="t"):
        work = memory.describe(objective.workload(), objective.param_groups(), torch.device("cpu"))
    layers = fp8.frozen_layers(h.base.unet)
    assert work.frozen_layer_values == sum(m.weight.numel() for m in layers) > 0
    assert work.frozen_layer_bytes == 4 * work.frozen_layer_values  # fp32 tiny model
    plain = memory.estimate(work, memory.Choice(2, False, "fp32", "adamw", 64, 64))
    on = memory.estimate(work, memory.Choice(2, False, "fp32", "adamw", 64, 64, fp8_base=True))
    assert on.weights == plain.weights + work.frozen_layer_values  # on the CPU the float8 copies come on top
    gpu = memory.Workload(**{**vars(work), "device": torch.device("cuda")})
    on_gpu = memory.estimate(gpu, memory.Choice(2, False, "fp32", "adamw", 64, 64, fp8_base=True))
    assert on_gpu.weights == plain.weights - 3 * work.frozen_layer_values  # 4 bytes -> 1 on a GPU
    assert on_gpu.workspace == plain.workspace + 2 * 4 * work.largest_frozen_layer  # the upcast layer


# ------------------------------------------------------------------------------------------------ offload_unet
def test_offload_unet_streams_each_layer_with_prefetch_and_resumes_exactly(tiny_handles, dataset, monkeypatch):
    """On the CPU the weights are where they are, but the schedule runs: every frozen layer's weight comes through
    the streamer, once per forward and again in backward where needed, and after the first step (which learns the
    order) nearly every fetch finds its copy already started by the previous layer's."""
    from comfy_finetune.training import offload

    h = tiny_handles["sd1"]
    streamers: list = []
    real_init = offload.Streamer.__init__

    def init(self, layers, device):
        real_init(self, layers, device)
        streamers.append(self)

    monkeypatch.setattr(offload.Streamer, "__init__", init)
    lora_s, r_s = train_lora(h, dataset, _settings(offload_unet="on"), LoraSpec(rank=4, alpha=4.0))
    (st,) = streamers
    n = len(st.layers)
    assert n == len(fp8.frozen_layers(h.base.unet)) and st.layers[0].fetch is None  # closed after the run
    assert len(st.orders[False]) == n and 0 < len(st.orders[True]) < n  # forward: all; backward: those needing it
    fetches = sum(layer.fetches for layer in st.layers)
    assert fetches == 3 * (n + len(st.orders[True]))
    assert st.prefetched >= 2 * (n + len(st.orders[True])) - 8  # steps 2 and 3: served by the prefetch
    assert st.copies <= fetches + 3 * 2 + 2  # at most one copy in flight beyond the ones used
    # the same training as without streaming (the same weights, the input gradient computed by the layer function)
    lora, r = train_lora(h, dataset, _settings(offload_unet="off"), LoraSpec(rank=4, alpha=4.0))
    assert len(streamers) == 1
    assert r_s.losses == pytest.approx(r.losses, rel=1e-5)
    # resume: 2 steps with checkpoints, the third from the checkpoint = the uninterrupted streamed run
    train_lora(h, dataset, _settings(steps=2, offload_unet="on", save_every=1), LoraSpec(rank=4, alpha=4.0))
    again, r2 = train_lora(h, dataset, _settings(offload_unet="on", resume=True), LoraSpec(rank=4, alpha=4.0))
    assert r2.resumed_from == 2 and r2.losses == r_s.losses and _same_lora(lora_s, again)


def test_offload_unet_auto_follows_the_estimate(tiny_handles, dataset, monkeypatch):
    import dataclasses

    h = tiny_handles["sd1"]
    real = memory.describe
    # a GPU run as the estimate sees it: the same workload on a "cuda" device
    monkeypatch.setattr(memory, "describe", lambda shape, groups, device: dataclasses.replace(
        real(shape, groups, torch.device("cpu")), device=torch.device(device)))
    cuda = torch.device("cuda")
    settings = _settings()
    objective = LoraObjective(h, dataset, settings, LoraSpec(rank=4, alpha=4.0), node="t")
    with prepared(objective, h, settings, node="t"):
        shape, groups = objective.workload(), objective.param_groups()
        work = memory.describe(shape, groups, cuda)
        now = memory.current_choice(work, settings)
        est = memory.estimate(work, now)
        streamed = memory.estimate(work, dataclasses.replace(now, offload_unet=True))
        need = est.total - est.weights
        assert streamed.weights == est.weights - work.frozen_layer_bytes + 2 * 4 * work.largest_frozen_layer
        assert memory.wants_offload(shape, groups, settings, cuda, free_bytes=int(need / 2))
        assert not memory.wants_offload(shape, groups, settings, cuda, free_bytes=int(need * 2))
        assert not memory.wants_offload(shape, groups, settings, torch.device("cpu"), free_bytes=1)  # CPU: no gain
        off, on = _settings(offload_unet="off"), _settings(offload_unet="on")
        assert not memory.wants_offload(shape, groups, off, cuda, free_bytes=1)
        assert memory.wants_offload(shape, groups, on, torch.device("cpu"), free_bytes=10**12)
        # the check offers it as a change (on a GPU), with what it saves
        alone = [alt for _, alt, changes in memory.alternatives(work, now) if changes == ["offload_unet on"]]
        assert len(alone) == 1 and memory.estimate(work, alone[0]).total == streamed.total
