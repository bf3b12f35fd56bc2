"""Textual inversion: learn new token vectors for a frozen model.

The vectors are ``torch.nn.Parameter`` s ``[N, width]`` (one per text encoder: ``te1``, and ``te2`` for SDXL),
carried by an :class:`~..core.embeddings.Embedding` in an :class:`~..core.handle.EmbeddingPatch` on a training
copy of the handle. Prompts name them ``embedding:<name>``, so :class:`~..core.conditioning.PromptEncoder`
injects them through the forward hook of :func:`~..core.embeddings.inject`, and gradients reach them through
the frozen text encoders and UNet. The tokenizer and the token-embedding table are never changed; every
weight of the model is frozen for the run (and its ``requires_grad`` flags put back afterwards).

Prompts come from the classic textual-inversion templates ("a photo of a {}", ... for objects, "a painting in
the style of {}", ... for styles; the lists of the original implementation and diffusers' example), from the
dataset captions with the token in them, or both.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..core.conditioning import substitute_tokens
from ..core.embeddings import Embedding
from ..core.errors import FinetuneError
from ..core.fields import node_input
from ..core.handle import EmbeddingPatch, ModelHandle
from ..scoring.scorers import Scorer
from . import distributed
from .data import TrainingSet
from .diffusion import Cache, LatentCache, NoiseSchedule, TextCache, conditioning_for, denoise_loss
from .frame import run_training, scored
from .memory import RunShape
from .settings import TrainSettings

log = logging.getLogger("comfy_finetune")

OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a good painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}",
    "a large painting in the style of {}",
)
# "object" / "style": templates only; "captions": the dataset captions with the token in them (prepended where
# missing); "object+captions" / "style+captions": a template followed by the caption.
TEMPLATE_MODES = ("object", "style", "captions", "object+captions", "style+captions")
_PROMPT_SYNTAX = set('(),:\\"')


@dataclass(frozen=True)
class TISpec:
    """What makes a run textual inversion; each field is also the LearnEmbedding widget of that name."""

    token: str = node_input(tooltip="The new prompt word, e.g. <my-dog>. Must not be an existing word; no spaces. "
                                    "The embedding's name is the token without <> (my-dog).")
    initializer: str = node_input("", tooltip="A word describing the concept (dog, style, ...); the vectors start "
                                              "from its embedding. Empty: start from '*'.")
    num_vectors: int = node_input(1, min=1, max=64,
                                  tooltip="Vectors (prompt tokens) the embedding uses: more learn more detail but "
                                          "take more steps and prompt space.")
    # The node offers the three plain modes of TEMPLATE_MODES.
    templates: str = node_input("object", choices=TEMPLATE_MODES[:3],
                                tooltip="Training prompts: object ('a photo of a <token>', ...), style ('a painting "
                                        "in the style of <token>', ...) or the dataset captions (the token is "
                                        "prepended where a caption lacks it).")
    min_timestep: int = node_input(0, min=0, max=999,
                                   tooltip="Train only at timesteps from this one up (0: all). Colour and layout are "
                                           "decided at high noise; the low-noise steps, which refine edges, carry "
                                           "most of the loss and can pull the token away from the colour (the "
                                           "shapes-tiny recipe uses 800).")


def embedding_name(token: str) -> str:
    """A name usable as ``embedding:<name>`` and as a file name: ``<my-dog>`` → ``my-dog``."""
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "", token).strip(".-")
    return name or "embedding"


def templates_for(mode: str) -> tuple[str, ...]:
    if mode.startswith("object"):
        return OBJECT_TEMPLATES
    if mode.startswith("style"):
        return STYLE_TEMPLATES
    return ()


def _token_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, truncation=False).input_ids)


def check_spec(handle: ModelHandle, spec: TISpec, node: str) -> None:
    """Refuse tokens the prompt syntax or the vocabulary would swallow, and impossible settings."""
    token = spec.token if isinstance(spec.token, str) else ""
    if not token.strip():
        raise FinetuneError("the token is empty", node=node, input="token",
                            fix="type a new word such as <my-concept>")
    if any(c.isspace() for c in token):
        raise FinetuneError(f"the token {token!r} contains whitespace; it must be one word", node=node,
                            input="token", fix="use a single new word such as <my-concept>")
    bad = sorted({c for c in token if c in _PROMPT_SYNTAX})
    if bad or token.lower().startswith("embedding"):
        what = f"contains {' '.join(bad)}, which prompts use for weights and embeddings" if bad else \
            "starts with 'embedding', which prompts use for embedding files"
        raise FinetuneError(f"the token {token!r} {what}", node=node, input="token",
                            fix="use a new word such as <my-concept>")
    if int(spec.num_vectors) < 1:
        raise FinetuneError(f"num_vectors must be at least 1 (got {spec.num_vectors})", node=node,
                            input="num_vectors", fix="use 1-8 (more vectors learn more detail, but need more steps)")
    num_timesteps = int(handle.base.scheduler_config.get("num_train_timesteps", 1000))
    if not 0 <= int(spec.min_timestep) < num_timesteps:
        raise FinetuneError(f"min_timestep must be 0 to {num_timesteps - 1} (got {spec.min_timestep})", node=node,
                            input="min_timestep",
                            fix="use 0 to train at every timestep, or e.g. 800 to teach a colour")
    if spec.templates not in TEMPLATE_MODES:
        raise FinetuneError(f"unknown templates '{spec.templates}'", node=node, input="templates",
                            fix=f"use one of {', '.join(TEMPLATE_MODES)}")
    for i, tok in enumerate(handle.base.tokenizers):
        ids = _token_ids(tok, token)
        if len(ids) == 1:
            raise FinetuneError(f"the token {token!r} is already a word of text encoder {i + 1}'s vocabulary, so "
                                "every prompt using it would change", node=node, input="token",
                                fix="use a new word such as <my-dog>")


def initial_vectors(handle: ModelHandle, spec: TISpec, seed: int, node: str) -> dict[str, torch.Tensor]:
    """fp32 ``[N, width]`` per encoder from the initializer word's token rows (averaged or cycled to N)."""
    n = int(spec.num_vectors)
    word = (spec.initializer or "").strip() or "*"
    out: dict[str, torch.Tensor] = {}
    for i, (te, tok) in enumerate(zip(handle.base.text_encoders, handle.base.tokenizers)):
        table = te.get_input_embeddings().weight
        ids = [t for t in _token_ids(tok, word) if 0 <= t < table.shape[0]]
        if not ids:
            if spec.initializer.strip():
                raise FinetuneError(f"the initializer {spec.initializer!r} gives no tokens for text encoder {i + 1}",
                                    node=node, input="initializer",
                                    fix="use an ordinary word that describes the concept (e.g. dog, style), or "
                                        "leave it empty")
            gen = torch.Generator("cpu").manual_seed(int(seed) + i)
            std = float(table.detach().float().std())
            out[f"te{i + 1}"] = torch.randn(n, table.shape[1], generator=gen) * std
            continue
        rows = table.detach().float().cpu()[torch.tensor(ids)]
        if len(ids) > n:  # several tokens per vector: vector k averages the rows k, k + n, k + 2n ...
            vecs = torch.stack([rows[k::n].mean(dim=0) for k in range(n)])
        else:  # cycle the rows
            vecs = torch.stack([rows[k % len(ids)] for k in range(n)])
        out[f"te{i + 1}"] = vecs.clone()
    return out


def caption_prompt(mode: str, caption: str, token: str, placeholder: str, template: str | None) -> str:
    """The training prompt for one image, with the placeholder (``embedding:<name>``) standing for the token."""
    caption = (caption or "").strip()
    probe = Embedding(name=placeholder.split(":", 1)[1], vectors={}, token=token)
    with_token = substitute_tokens(caption, {probe.name: probe}) if caption else ""
    has_token = placeholder in with_token
    if mode == "captions":
        if has_token:
            return with_token
        return f"{placeholder}, {caption}" if caption else placeholder
    prompt = template.format(placeholder)
    if mode.endswith("+captions") and caption:
        return with_token if has_token else f"{prompt}, {caption}"
    return prompt


def fresh_vectors(params: dict[str, torch.nn.Parameter], embedding: Embedding) -> None:
    """Replace each trainable vector of ``params`` (and of the ``embedding`` that carries them) by a new Parameter
    with its values: one made under the host's inference mode can never get a gradient."""
    for comp, p in list(params.items()):
        fresh = torch.nn.Parameter(p.detach().clone())
        params[comp] = fresh
        embedding.vectors[comp] = fresh


class TIObjective:
    """Trainable token vectors for ``handle`` with everything else frozen."""

    def __init__(self, handle: ModelHandle, dataset: TrainingSet, settings: TrainSettings, spec: TISpec,
                 *, node: str) -> None:
        check_spec(handle, spec, node)
        self.handle, self.dataset, self.settings, self.spec, self.node = handle, dataset, settings, spec, node
        self.name = embedding_name(spec.token)
        self.placeholder = f"embedding:{self.name}"
        device = handle.base.device
        self.initial = initial_vectors(handle, spec, settings.seed, node)
        self.params: dict[str, torch.nn.Parameter] = {
            comp: torch.nn.Parameter(v.to(device=device, dtype=torch.float32).clone())
            for comp, v in self.initial.items()}
        self.embedding = Embedding(self.name, dict(self.params), token=spec.token)
        self._train_handle = handle.with_patch(EmbeddingPatch(self.embedding))
        self.templates = templates_for(spec.templates)
        self.schedule = NoiseSchedule(handle.base.scheduler_config, handle.base.prediction_type)
        self.latents = LatentCache(handle, dataset)
        # the text encoders carry the trained vectors' gradients: encoded afresh every step, never offloaded
        self.text = TextCache(self._train_handle, node, cache=False)

    # ------------------------------------------------------------------ what the frame sets up
    @contextlib.contextmanager
    def attached(self) -> Iterator[TIObjective]:
        """Fresh trainable vectors for the block. The host runs nodes under inference mode, where a Parameter made
        in ``__init__`` can never get a gradient: the frame enters this after leaving it."""
        fresh_vectors(self.params, self.embedding)
        yield self

    @property
    def train_handle(self) -> ModelHandle:
        return self._train_handle

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        base = self.handle.base  # gradients reach the vectors through the UNet and the text encoders
        return {"unet": base.unet, **{f"te{i + 1}": te for i, te in enumerate(base.text_encoders)}}

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.handle.base.vae]

    def denoiser(self) -> torch.nn.Module:
        return self.handle.base.unet

    def caches(self) -> list[Cache]:
        return [self.latents, self.text]

    def workload(self) -> RunShape:
        base = self.handle.base
        return RunShape(denoiser=base.unet, modules=(base.unet, base.vae, *base.text_encoders),
                        grad_text_encoders=tuple(base.text_encoders), sizes=tuple(self.dataset.buckets),
                        encode_batches=self.dataset.random_crop, vae=base.vae)

    # ------------------------------------------------------------------ training
    def param_groups(self) -> list[dict]:
        return [{"params": list(self.params.values()), "lr": self.settings.learning_rate}]

    def prompts(self, captions: list[str], generator: torch.Generator) -> list[str]:
        templates = [None] * len(captions)
        if self.templates:  # data-parallel ranks draw for the global batch and slice
            templates = [self.templates[i] for i in distributed.per_sample(
                len(captions), lambda: int(torch.randint(len(self.templates), (1,), generator=generator)))]
        return [caption_prompt(self.spec.templates, caption, self.spec.token, self.placeholder, template)
                for caption, template in zip(captions, templates)]

    def loss(self, step: int, batch, generator: torch.Generator, denoiser) -> torch.Tensor:
        latents = self.latents.latents(batch)
        h, w = batch.pixels.shape[-2:]
        prompts = self.prompts(list(batch.captions), generator)
        context, added = conditioning_for(self._train_handle, self.text, prompts, int(h), int(w))
        return denoise_loss(denoiser, latents, context, self.schedule, generator=generator, added=added,
                            noise_offset=self.settings.noise_offset,
                            min_snr_gamma=self.settings.min_snr_gamma, min_timestep=int(self.spec.min_timestep)).mean()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {comp: p.detach() for comp, p in self.params.items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for comp, p in self.params.items():
                p.copy_(state[comp])

    def extract(self, metadata: dict[str, str] | None = None) -> Embedding:
        vectors = {comp: p.detach().float().cpu().clone() for comp, p in self.params.items()}
        return Embedding(self.name, vectors, dict(metadata or {}), token=self.spec.token)


def train_embedding(handle: ModelHandle, dataset: TrainingSet, settings: TrainSettings, spec: TISpec, *,
                    node: str = "train_embedding", validation=None, scorer: Scorer | None = None):
    """Learn ``spec.num_vectors`` vectors for ``spec.token`` on ``handle`` (its patches applied, all frozen).

    Returns ``(Embedding, TrainResult)``; the embedding's ``token`` is set, so a handle carrying it in an
    :class:`~..core.handle.EmbeddingPatch` understands the token in ordinary prompts. Validation prompts may use
    the token too. With a ``scorer`` the embedding is the best-scoring checkpoint's.
    """
    dataset, score = scored(dataset, scorer, node)
    objective = TIObjective(handle, dataset, settings, spec, node=node)
    metadata = {"token": spec.token, "initializer": spec.initializer, "num_vectors": str(int(spec.num_vectors)),
                "templates": spec.templates, "steps": str(settings.steps),
                "learning_rate": str(settings.learning_rate), "seed": str(settings.seed),
                "batch_size": str(settings.batch_size), "optimizer": settings.optimizer,
                "lr_schedule": settings.lr_schedule, "num_train_images": str(len(dataset)),
                "base_model": handle.base.label, "family": handle.family.value,
                "training_comment": f"trained with comfyui-finetune {node}"}
    return run_training("embedding", objective.train_handle, dataset, settings, objective, node=node,
                        config={"token": spec.token, "initializer": spec.initializer,
                                "num_vectors": int(spec.num_vectors), "templates": spec.templates},
                        validation=validation, finish=lambda: objective.extract(metadata), score=score,
                        metadata=metadata)
