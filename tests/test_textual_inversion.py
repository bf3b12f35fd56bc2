"""Textual inversion (LearnEmbedding): only the new vectors learn; the token works in ordinary prompts."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from comfy_finetune import host
from comfy_finetune.core.conditioning import encode_prompt, substitute_tokens
from comfy_finetune.core.embeddings import Embedding, inject
from comfy_finetune.core.errors import FinetuneError, Interrupted
from comfy_finetune.core.handle import EmbeddingPatch
from comfy_finetune.nodes.data import find_dataset_folder
from comfy_finetune.nodes.embedding_training import LearnEmbedding
from comfy_finetune.training import ti_trainer
from comfy_finetune.training.data import prepare, read_folder
from comfy_finetune.training.diffusion import evaluation_loss
from comfy_finetune.training.settings import TrainSettings
from comfy_finetune.training.ti_trainer import (
    OBJECT_TEMPLATES,
    STYLE_TEMPLATES,
    TISpec,
    caption_prompt,
    embedding_name,
    initial_vectors,
    train_embedding,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(models_dir):
    return prepare(read_folder(find_dataset_folder("[example] red-circle")), resolution=64)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _flags(handle):
    base = handle.base
    return [p.requires_grad for m in (base.unet, base.vae, *base.text_encoders) for p in m.parameters()]


# ---------------------------------------------------------------------------------------------- training
def test_training_lowers_the_loss_and_only_the_vectors_change(tiny_handles, dataset):
    h = tiny_handles["sd1"]
    te = h.base.text_encoders[0]
    tok = h.base.tokenizers[0]
    te_before, unet_before = _state(te), _state(h.base.unet)
    table_before = te.get_input_embeddings().weight.detach().clone()
    vocab_before, flags_before = dict(tok.get_vocab()), _flags(h)
    spec = TISpec(token="<red-thing>", initializer="circle", num_vectors=4, templates="object")
    initial = initial_vectors(h, spec, seed=0, node="test")

    emb, result = train_embedding(h, dataset, TrainSettings(steps=40, learning_rate=1e-2, seed=0), spec)

    # evaluated on the captions with the token in front (substituted by the handle's PromptEncoder)
    evalset = dataclasses.replace(dataset, caption_prefix="<red-thing>, ")
    start = h.with_patch(EmbeddingPatch(Embedding(emb.name, initial, token=spec.token)))
    before = evaluation_loss(start, evalset)
    after = evaluation_loss(h.with_patch(EmbeddingPatch(emb)), evalset)
    assert after < before - 1e-3, (before, after)
    assert len(result.losses) == 40 and all(torch.isfinite(torch.tensor(result.losses)))

    # the model, its token-embedding table and its tokenizer are bit-identical; flags are put back
    assert _same(te_before, _state(te)) and _same(unet_before, _state(h.base.unet))
    assert torch.equal(table_before, te.get_input_embeddings().weight)
    assert dict(tok.get_vocab()) == vocab_before and len(tok) == len(vocab_before)
    assert _flags(h) == flags_before and h.patches == ()

    assert emb.name == "red-thing" and emb.token == "<red-thing>" and set(emb.vectors) == {"te1"}
    vec = emb.vectors["te1"]
    assert vec.shape == (4, 32) and vec.dtype == torch.float32 and vec.device.type == "cpu"
    assert not vec.requires_grad and not isinstance(vec, torch.nn.Parameter)
    assert not torch.equal(vec, initial["te1"])
    meta = emb.metadata
    assert meta["token"] == "<red-thing>" and meta["initializer"] == "circle" and meta["num_vectors"] == "4"
    assert meta["steps"] == "40" and float(meta["learning_rate"]) == 1e-2
    assert all(isinstance(v, str) for v in meta.values())


def test_gradients_reach_the_vectors_through_inject(tiny_handles):
    h = tiny_handles["sd1"]
    te = h.base.text_encoders[0]
    param = torch.nn.Parameter(torch.randn(2, 32) * 0.02)
    train = h.with_patch(EmbeddingPatch(Embedding("grad", {"te1": param})))
    with torch.enable_grad():
        cond = encode_prompt(train, "a photo of embedding:grad").cond
        cond.square().sum().backward()
    assert param.grad is not None and float(param.grad.abs().sum()) > 0
    assert all(p.grad is None for p in te.parameters())
    # the hook itself: replaced rows carry the vector (and its gradient path)
    layer = te.get_input_embeddings()
    with inject(layer, [(0, 1, param[0])]):
        out = layer(torch.tensor([[1, 2, 3]]))
    assert torch.equal(out[0, 1], param[0]) and out.requires_grad


def test_sdxl_trains_both_encoders_with_checkpointing_and_bf16(tiny_handles, dataset):
    h = tiny_handles["sdxl"]
    states = [_state(te) for te in h.base.text_encoders]
    spec = TISpec(token="<xl-thing>", initializer="red circle", num_vectors=3, templates="captions")
    initial = initial_vectors(h, spec, seed=0, node="test")
    emb, result = train_embedding(h, dataset, TrainSettings(steps=3, learning_rate=5e-2, precision="bf16",
                                                            gradient_checkpointing=True), spec)
    assert set(emb.vectors) == {"te1", "te2"} and len(result.losses) == 3
    for comp in ("te1", "te2"):
        assert emb.vectors[comp].shape == (3, 32) and emb.vectors[comp].dtype == torch.float32
        assert not torch.equal(emb.vectors[comp], initial[comp]), comp
    assert all(_same(s, _state(te)) for s, te in zip(states, h.base.text_encoders))
    assert not any(getattr(te, "is_gradient_checkpointing", False) for te in h.base.text_encoders)


# ---------------------------------------------------------------------------------------------- set-up
def test_initial_vectors_come_from_the_initializer(tiny_handles):
    h = tiny_handles["sd1"]
    table = h.base.text_encoders[0].get_input_embeddings().weight.detach()
    tok = h.base.tokenizers[0]
    circle = tok("circle", add_special_tokens=False).input_ids
    assert len(circle) == 1
    one = initial_vectors(h, TISpec("<a>", "circle", 3), 0, "t")["te1"]
    assert torch.equal(one, table[circle[0]].repeat(3, 1))
    red_circle = tok("red circle", add_special_tokens=False).input_ids
    avg = initial_vectors(h, TISpec("<a>", "red circle", 1), 0, "t")["te1"]
    assert torch.allclose(avg[0], table[red_circle].mean(0))
    cyc = initial_vectors(h, TISpec("<a>", "red circle", 3), 0, "t")["te1"]
    assert torch.equal(cyc, table[[red_circle[0], red_circle[1], red_circle[0]]])
    star = tok("*", add_special_tokens=False).input_ids
    empty = initial_vectors(h, TISpec("<a>", "", 2), 0, "t")["te1"]
    assert torch.equal(empty, table[star].repeat(2, 1))


def test_initializer_without_tokens_is_an_error(tiny_handles, monkeypatch):
    monkeypatch.setattr(ti_trainer, "_token_ids", lambda tokenizer, text: [])
    with pytest.raises(FinetuneError, match=r"input 'initializer'.*no tokens.*Fix:"):
        initial_vectors(tiny_handles["sd1"], TISpec("<a>", "zzz", 1), 0, "LearnEmbedding")
    assert initial_vectors(tiny_handles["sd1"], TISpec("<a>", "", 2), 0, "t")["te1"].shape == (2, 32)


@pytest.mark.parametrize("spec,input_name,fix", [
    (TISpec("dog"), "token", "<my-dog>"),
    (TISpec("Circle"), "token", "<my-dog>"),
    (TISpec("<my dog>"), "token", "single new word"),
    (TISpec(""), "token", "<my-concept>"),
    (TISpec("(dog)"), "token", "<my-concept>"),
    (TISpec("embedding:x"), "token", "<my-concept>"),
    (TISpec("<ok>", num_vectors=0), "num_vectors", "1-8"),
    (TISpec("<ok>", templates="poems"), "templates", "object"),
    (TISpec("<ok>", min_timestep=1000), "min_timestep", "800"),
    (TISpec("<ok>", min_timestep=-1), "min_timestep", "800"),
])
def test_bad_specs_are_clear_errors(tiny_handles, dataset, spec, input_name, fix):
    with pytest.raises(FinetuneError, match=rf"\[train_embedding\] input '{input_name}'") as err:
        train_embedding(tiny_handles["sd1"], dataset, TrainSettings(steps=1), spec)
    assert fix in str(err.value)


def test_prompts_and_names():
    assert len(OBJECT_TEMPLATES) >= 20 and len(STYLE_TEMPLATES) >= 15
    assert all(t.count("{}") == 1 and " {}" in t for t in OBJECT_TEMPLATES + STYLE_TEMPLATES)
    assert embedding_name("<my-dog>") == "my-dog" and embedding_name("<>") == "embedding"
    ph = "embedding:t"
    assert caption_prompt("object", "x", "<t>", ph, "a photo of a {}") == "a photo of a embedding:t"
    assert caption_prompt("captions", "a red circle", "<t>", ph, None) == "embedding:t, a red circle"
    assert caption_prompt("captions", "a <t> on white", "<t>", ph, None) == "a embedding:t on white"
    assert caption_prompt("captions", "", "<t>", ph, None) == "embedding:t"
    assert caption_prompt("style+captions", "stripes", "<t>", ph, "art in the style of {}") == \
        "art in the style of embedding:t, stripes"


# ---------------------------------------------------------------------------------------------- prompts
def test_token_substitution_rules():
    emb = {"tok": Embedding("tok", {}, token="<t>")}
    assert substitute_tokens("a photo of <t>", emb) == "a photo of embedding:tok"
    assert substitute_tokens("<T>, red", emb) == "embedding:tok, red"
    assert substitute_tokens("(<t>:1.2)", emb) == "( embedding:tok:1.2)"
    assert substitute_tokens("a <t>. b", emb) == "a embedding:tok . b"
    for untouched in ("a<t>", "a <t>x", "embedding:<t>", "x-<t>", "a <tt>"):
        assert substitute_tokens(untouched, emb) == untouched
    assert substitute_tokens("a <t>", {"tok": Embedding("tok", {})}) == "a <t>"  # no token: nothing to do
    regex = {"e": Embedding("e", {}, token="a.b")}
    assert substitute_tokens("a.b axb", regex) == "embedding:e axb"


def test_token_works_in_prompts(tiny_handles, family):
    h = tiny_handles[family]
    vectors = {f"te{i + 1}": torch.randn(2, 32) for i in range(len(h.base.text_encoders))}
    h2 = h.with_patch(EmbeddingPatch(Embedding("my-thing", vectors, token="<my-thing>")))

    def enc(handle, text):
        c = encode_prompt(handle, text)
        return c.cond, c.pooled

    for plain, explicit in [("a photo of <my-thing>", "a photo of embedding:my-thing"),
                            ("(<my-thing>:1.2), red", "(embedding:my-thing:1.2), red"),
                            ("<my-thing>. circle", "embedding:my-thing . circle")]:
        got, want = enc(h2, plain), enc(h2, explicit)
        assert torch.equal(got[0], want[0]), plain
        assert got[1] is None or torch.equal(got[1], want[1])
    assert not torch.allclose(enc(h2, "a photo of <my-thing>")[0], enc(h, "a photo of <my-thing>")[0])
    assert torch.equal(enc(h2, "a photo of a circle")[0], enc(h, "a photo of a circle")[0])


# ---------------------------------------------------------------------------------------------- node
def _node_kwargs(**overrides):
    types = LearnEmbedding.INPUT_TYPES()
    kwargs = {}
    for section in ("required", "optional"):
        for name, spec in types[section].items():
            opts = spec[1] if len(spec) > 1 else {}
            if "default" in opts:
                kwargs[name] = opts["default"]
            elif isinstance(spec[0], list):
                kwargs[name] = spec[0][0]
    kwargs.update(overrides)
    return kwargs


def test_node_runs_end_to_end(tiny_handles, dataset):
    h = tiny_handles["sd1"]
    types = LearnEmbedding.INPUT_TYPES()
    assert list(types["required"])[:6] == ["pipe", "dataset", "token", "initializer", "num_vectors", "templates"]
    assert types["required"]["learning_rate"][1]["default"] == 5e-3
    assert LearnEmbedding.RETURN_TYPES == ("FT_EMBEDDING", "FT_PIPE", "IMAGE", "IMAGE")
    kwargs = _node_kwargs(pipe=h, dataset=dataset, token="<node-thing>", initializer="circle", num_vectors=2,
                          templates="captions", steps=2, validation_prompt="a photo of <node-thing>",
                          validation_size=64, validation_steps=2, negative=None)
    emb, pipe, plot, grid = LearnEmbedding().run(**kwargs)
    assert emb.name == "node-thing" and emb.vectors["te1"].shape == (2, 32)
    assert plot.dim() == 4 and plot.shape[-1] == 3 and grid.dim() == 4 and grid.shape[-1] == 3
    assert h.patches == () and pipe.embeddings == {"node-thing": emb}
    got = encode_prompt(pipe, "a photo of <node-thing>").cond
    assert torch.equal(got, encode_prompt(pipe, "a photo of embedding:node-thing").cond)
    assert not torch.allclose(got, encode_prompt(h, "a photo of <node-thing>").cond)
    with pytest.raises(FinetuneError, match=r"\[LearnEmbedding\] input 'token'.*Fix: use a new word"):
        LearnEmbedding().run(**{**kwargs, "token": "dog"})


# ---------------------------------------------------------------------------------------------- cancel
def test_cancel_keeps_a_checkpoint_and_resume_is_exact(tiny_handles, dataset):
    h = tiny_handles["sd1"]
    spec = TISpec(token="<cancel-thing>", initializer="circle", num_vectors=2, templates="object")
    settings = TrainSettings(steps=4, learning_rate=1e-2, seed=5)
    te_before, flags_before = _state(h.base.text_encoders[0]), _flags(h)
    full, _ = train_embedding(h, dataset, settings, spec)

    def sink(event, data):
        if event == "comfy_finetune.train" and data["step"] == 2:
            host.request_interrupt()

    host.add_event_sink(sink)
    try:
        with pytest.raises(Interrupted):
            train_embedding(h, dataset, settings, spec)
    finally:
        host._settings.event_sinks.remove(sink)
    folder = host.output_dir() / "finetune_checkpoints"
    files = list(folder.iterdir())
    assert [f for f in files if f.name.startswith(".")] == [], "no partial/temp file may remain"
    ckpt = [f for f in files if f.name.startswith("embedding-")]
    assert len(ckpt) == 1
    state = torch.load(ckpt[0], weights_only=True)
    assert state["step"] == 2 and set(state["trainable"]) == {"te1"}
    assert _same(te_before, _state(h.base.text_encoders[0])) and _flags(h) == flags_before

    resumed, result = train_embedding(h, dataset, dataclasses.replace(settings, resume=True), spec)
    assert result.resumed_from == 2 and result.steps_done == 4
    assert torch.allclose(full.vectors["te1"], resumed.vectors["te1"], atol=1e-6)
    ckpt[0].unlink()


def test_min_timestep_draws_only_high_noise_and_zero_keeps_every_timestep(tiny_handles):
    from comfy_finetune.training.diffusion import NoiseSchedule, denoise_loss

    base = tiny_handles["sd1"].base
    schedule = NoiseSchedule(base.scheduler_config, base.prediction_type)
    seen = []

    class Recorder(torch.nn.Module):  # records the timesteps it is asked for
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, noisy, t, **kwargs):
            seen.append(t.clone())
            return type("Out", (), {"sample": noisy * self.w})()

    latents, context = torch.randn(64, 4, 2, 2), torch.zeros(64, 3, 8)
    for min_t in (0, 0, 600):
        denoise_loss(Recorder(), latents, context, schedule, generator=torch.Generator().manual_seed(5),
                     min_timestep=min_t)
    assert torch.equal(seen[0], seen[1]) and int(seen[0].min()) < 600  # 0: the whole range, seeded
    assert int(seen[2].min()) >= 600 and int(seen[2].max()) < schedule.num_timesteps
