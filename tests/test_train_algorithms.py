"""TrainLoRA / DreamBoothTrain algorithms (lora, dora, loha, lokr): what peft trains is what the pack applies.

Each algorithm's extracted modules must give the UNet and text encoder exactly the outputs peft's layers gave
during training, in memory and after a kohya file round trip; resume and DreamBooth's frozen model must work with
every kind of peft layer.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from comfy_finetune import host
from comfy_finetune.core.errors import FinetuneError, Interrupted
from comfy_finetune.core.handle import LoraPatch
from comfy_finetune.core.lora_handle import lora_for_handle
from comfy_finetune.nodes.base import input_defaults
from comfy_finetune.nodes.data import find_dataset_folder
from comfy_finetune.nodes.dreambooth import DreamBoothTrain
from comfy_finetune.nodes.training import TrainLoRA
from comfy_finetune.training.data import prepare, read_folder
from comfy_finetune.training.diffusion import evaluation_loss
from comfy_finetune.training.dreambooth import DreamBoothSpec, train_dreambooth
from comfy_finetune.training.lora_trainer import ALGORITHMS, LoraObjective, LoraSpec, train_lora
from comfy_finetune.training.saving import save_lora
from comfy_finetune.training.settings import TrainSettings

KIND = {"lora": "lora", "dora": "lora", "loha": "loha", "lokr": "lokr"}


@pytest.fixture(scope="module")
def dataset(models_dir):
    return prepare(read_folder(find_dataset_folder("[example] red-circle")), resolution=64)


def _outputs(handle) -> tuple[torch.Tensor, torch.Tensor]:
    """UNet and text-encoder outputs on fixed inputs."""
    unet, te = handle.base.unet, handle.base.text_encoders[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    ids = torch.randint(0, te.config.vocab_size, (1, 77), generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), ctx).sample, te(ids)[0]


def _attach_and_perturb(objective):
    """Enter ``objective.attached()`` and move every trainable (seeded), as training would."""
    ctx = objective.attached()
    ctx.__enter__()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in objective.named_trainables():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return ctx


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_extracted_and_saved_modules_apply_what_peft_computed(tiny_handles, dataset, models_dir, one_thread,
                                                              algorithm):
    h = tiny_handles["sd1"]
    base = _outputs(h)
    spec = LoraSpec(rank=4, alpha=3.0, targets="attention+feedforward+conv", train_text_encoder=True,
                    algorithm=algorithm)
    objective = LoraObjective(h, dataset, TrainSettings(steps=1), spec, node="t")
    ctx = _attach_and_perturb(objective)
    try:
        trained = _outputs(h)
        with objective.frozen():  # DreamBooth's prior target: the model with the adapters disabled
            frozen = _outputs(h)
        again = _outputs(h)
        grads = all(p.requires_grad for _, p in objective.named_trainables())
        lora = objective.extract({"ft_algorithm": algorithm}, "t")
    finally:
        ctx.__exit__(None, None, None)
    assert _max_diff(frozen, base) < 1e-6 and _max_diff(again, trained) == 0 and grads
    assert _max_diff(trained, base) > 0.05  # the perturbed adapters change both models

    assert {m.kind for m in lora.modules.values()} == {KIND[algorithm]}
    assert {c for c, _ in lora.modules} == {"unet", "te1"}
    assert any(p.endswith("conv1") for _, p in lora.modules)
    if algorithm == "dora":
        for (comp, path), m in lora.modules.items():
            out = h.base.component(comp).get_submodule(path).weight.shape[0]
            assert m.dora_scale is not None and m.dora_scale.shape[0] == out and m.dora_scale[0].numel() == 1
    else:
        assert all(getattr(m, "dora_scale", None) is None for m in lora.modules.values())
    if algorithm == "lokr":  # rank 4: full factors where 4 >= max(b, d) / 2, a decomposed w2 on the wider layers
        assert {m.alpha is None for m in lora.modules.values()} == {True, False}
        assert all((m.w2 is None) == (m.alpha is not None) for m in lora.modules.values())

    with h.with_patch(LoraPatch(lora)).patched():
        assert _max_diff(_outputs(h), trained) < 1e-4
    assert _max_diff(_outputs(h), base) == 0

    # kohya file: every key is read back, the same outputs, the algorithm in the metadata
    path = save_lora(lora, models_dir / "loras" / f"algo_{algorithm}.safetensors", family=h.family,
                     unet_config=dict(h.base.unet.config))
    loaded, unmatched = lora_for_handle(path, h)
    assert unmatched == [] and loaded.modules.keys() == lora.modules.keys()
    with h.with_patch(LoraPatch(loaded)).patched():
        assert _max_diff(_outputs(h), trained) < 1e-4
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ft_algorithm"] == algorithm
    args = json.loads(meta.get("ss_network_args", "{}"))
    if algorithm == "lora":
        assert meta["ss_network_module"] == "networks.lora" and "algo" not in args
    else:
        assert meta["ss_network_module"] == "lycoris.kohya"
        assert args["algo"] == {"dora": "lora"}.get(algorithm, algorithm)
        assert (args.get("dora_wd") == "True") == (algorithm == "dora")
    assert (sum(k.endswith(".dora_scale") for k in keys) == len(lora.modules)) == (algorithm == "dora")


def test_lokr_diffusers_layout_loads_in_diffusers_exactly(tiny_handles, dataset, models_dir, one_thread):
    from diffusers import UNet2DConditionModel

    h = tiny_handles["sd1"]
    spec = LoraSpec(rank=4, alpha=3.0, targets="attention+feedforward+conv", algorithm="lokr")
    objective = LoraObjective(h, dataset, TrainSettings(steps=1), spec, node="t")
    ctx = _attach_and_perturb(objective)
    try:
        trained = _outputs(h)[0]
        lora = objective.extract({}, "t")
    finally:
        ctx.__exit__(None, None, None)
    path = save_lora(lora, models_dir / "loras" / "algo_lokr_peft.safetensors", family=h.family,
                     unet_config=dict(h.base.unet.config), layout="diffusers")
    with safe_open(str(path), "pt") as f:
        keys, config = list(f.keys()), json.loads(f.metadata()["lora_adapter_metadata"])
    assert keys and all(k.startswith("unet.") and ".lokr_w" in k for k in keys)
    assert config["unet.alpha"] == config["unet.r"] and config["unet.decompose_factor"] == -1

    unet = UNet2DConditionModel.from_pretrained(models_dir / "diffusers" / "tiny-sd1" / "unet")
    unet.load_lora_adapter(str(path), prefix="unet", adapter_name="lokr", use_safetensors=True)
    g = torch.Generator().manual_seed(0)
    x, ctx_ = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        assert float((unet(x, torch.tensor([10, 500]), ctx_).sample - trained).abs().max()) < 1e-4
    loaded, unmatched = lora_for_handle(path, h)  # the pack reads it back too
    assert unmatched == []
    with h.with_patch(LoraPatch(loaded)).patched():
        assert float((_outputs(h)[0] - trained).abs().max()) < 1e-4


@pytest.mark.parametrize("algorithm,te,match", [
    ("loha", False, r"a loha module has no diffusers"),
    ("lokr", True, r"diffusers loads a LoKr into the UNet only"),
])
def test_diffusers_layout_refuses_what_diffusers_cannot_load(tiny_handles, dataset, models_dir, algorithm, te,
                                                             match):
    h = tiny_handles["sd1"]
    objective = LoraObjective(h, dataset, TrainSettings(steps=1),
                              LoraSpec(rank=2, alpha=2, train_text_encoder=te, algorithm=algorithm), node="t")
    with objective.attached():
        lora = objective.extract({}, "t")
    target = models_dir / "loras" / f"refused_{algorithm}.safetensors"
    with pytest.raises(FinetuneError, match=rf"input 'lora'.*{match}.*Fix: save it in the kohya layout"):
        save_lora(lora, target, family=h.family, unet_config=dict(h.base.unet.config), layout="diffusers")
    assert not target.exists()


@pytest.mark.parametrize("algorithm", ["dora", "loha", "lokr"])
def test_each_algorithm_trains(tiny_handles, dataset, one_thread, algorithm):
    h = tiny_handles["sd1"]
    unet_before = {k: v.clone() for k, v in h.base.unet.state_dict().items()}
    modules_before = [n for n, _ in h.base.unet.named_modules()]
    before = evaluation_loss(h, dataset)
    lora, result = train_lora(h, dataset, TrainSettings(steps=30, learning_rate=2e-3, seed=0),
                              LoraSpec(rank=4, alpha=4, algorithm=algorithm))
    assert evaluation_loss(h.with_patch(LoraPatch(lora)), dataset) < before - 0.01
    assert len(result.losses) == 30
    assert [n for n, _ in h.base.unet.named_modules()] == modules_before, "peft layers must be removed"
    assert all(torch.equal(v, h.base.unet.state_dict()[k]) for k, v in unet_before.items())
    assert not hasattr(h.base.unet, "peft_config")


def _interrupt_at(step):
    def sink(event, data):
        if event == "comfy_finetune.train" and data["step"] == step:
            host.request_interrupt()
    return sink


def _tensors(module) -> list[torch.Tensor]:
    return [t for t in vars(module).values() if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("algorithm", ["dora", "loha", "lokr"])
def test_cancel_and_resume_is_exact(tiny_handles, dataset, one_thread, algorithm):
    h = tiny_handles["sd1"]
    spec = LoraSpec(rank=4, alpha=2, algorithm=algorithm)
    settings = TrainSettings(steps=5, learning_rate=1e-3, seed=3)
    full, _ = train_lora(h, dataset, settings, spec)
    folder = host.output_dir() / "finetune_checkpoints"
    earlier = set(folder.iterdir()) if folder.is_dir() else set()
    sink = _interrupt_at(2)
    host.add_event_sink(sink)
    try:
        with pytest.raises(Interrupted):
            train_lora(h, dataset, settings, spec)
    finally:
        host._settings.event_sinks.remove(sink)
    ckpt = [f for f in folder.iterdir() if f not in earlier and f.name.startswith("lora-")]
    assert len(ckpt) == 1
    names = torch.load(ckpt[0], weights_only=True)["trainable"].keys()
    assert {n.rsplit(":", 1)[1] for n in names} >= ({"magnitude"} if algorithm == "dora" else
                                                     {"hada_w2_b"} if algorithm == "loha" else {"lokr_w1"})
    resumed, result = train_lora(h, dataset, TrainSettings(**{**settings.__dict__, "resume": True}), spec)
    assert result.resumed_from == 2 and result.steps_done == 5
    for key, module in full.modules.items():
        for a, b in zip(_tensors(module), _tensors(resumed.modules[key]), strict=True):
            assert torch.allclose(a, b, atol=1e-6)
    ckpt[0].unlink()


def test_rank_checks_per_algorithm(tiny_handles, dataset):
    h = tiny_handles["sd1"]
    for algorithm in ("dora", "loha"):
        with pytest.raises(FinetuneError, match=r"input 'rank': rank 512 is larger than the layer"):
            train_lora(h, dataset, TrainSettings(steps=1), LoraSpec(rank=512, algorithm=algorithm))
    # LoKr's rank only says whether w2 is decomposed: a large one trains full factors everywhere
    objective = LoraObjective(h, dataset, TrainSettings(steps=1), LoraSpec(rank=512, algorithm="lokr"), node="t")
    with objective.attached():
        lora = objective.extract({}, "t")
    assert lora.modules and all(m.w2 is not None and m.alpha is None for m in lora.modules.values())
    with pytest.raises(FinetuneError, match=r"\[train_lora\] input 'algorithm': unknown algorithm 'oft'"):
        train_lora(h, dataset, TrainSettings(steps=1), LoraSpec(rank=2, algorithm="oft"))


def test_dreambooth_trains_each_algorithm_with_the_frozen_prior(tiny_handles, dataset, one_thread):
    h = tiny_handles["sd1"]
    for algorithm in ("dora", "lokr"):
        spec = DreamBoothSpec(instance_prompt="a photo of sks circle", class_prompt="a photo of a circle",
                              prior_mode="base_prediction", rank=4, alpha=4, algorithm=algorithm)
        out, lora, result = train_dreambooth(h, dataset, TrainSettings(steps=2, learning_rate=1e-3), spec)
        assert {m.kind for m in lora.modules.values()} == {KIND[algorithm]}
        assert lora.metadata["ft_algorithm"] == algorithm and len(result.losses) == 2
        assert out.loras[-1].lora is lora
    with pytest.raises(FinetuneError, match=r"input 'algorithm'.*unknown algorithm"):
        train_dreambooth(h, dataset, TrainSettings(steps=1), DreamBoothSpec(
            instance_prompt="a photo of sks circle", class_prompt="a photo of a circle", algorithm="boft"))


def _widgets(node_cls) -> list[str]:
    types = node_cls.INPUT_TYPES()
    return [n for s in ("required", "optional") for n, spec in types[s].items()
            if isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN")]


def test_nodes_take_the_algorithm_as_their_last_widget(tiny_handles, dataset, one_thread):
    for node_cls in (TrainLoRA, DreamBoothTrain):
        widgets = _widgets(node_cls)
        # the node's own last widget; only the memory options every trainer shares come after it
        assert widgets[widgets.index("algorithm"):] == ["algorithm", "fused_step", "fp8_base", "offload_unet"], \
            widgets[-5:]
        assert node_cls.INPUT_TYPES()["optional"]["algorithm"][0] == list(ALGORITHMS)
        assert input_defaults(node_cls)["algorithm"] == "lora"
    inputs = {k: v for k, v in input_defaults(TrainLoRA).items() if k != "negative"}
    inputs.update(steps=2, rank=2, alpha=2.0, learning_rate=1e-3, algorithm="loha", recipe="auto")
    lora, pipe, *_ = TrainLoRA().run(pipe=tiny_handles["sd1"], dataset=dataset, **inputs)
    assert {m.kind for m in lora.modules.values()} == {"loha"} and lora.metadata["ft_algorithm"] == "loha"
    assert pipe.loras[-1].lora is lora
