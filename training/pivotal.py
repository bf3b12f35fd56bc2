"""Pivotal tuning: new token vectors and a LoRA learned together.

The subject gets a new prompt word (``<sks>``) whose vectors are trained as in textual inversion, while a LoRA on
the UNet (and optionally the text encoders) trains beside them, at a learning rate of its own. The word carries
what an embedding can say (colour, overall look); the LoRA the detail no token of the base can reach. This is the
recipe of diffusers' advanced DreamBooth LoRA script ("pivotal tuning": the token's embedding is the pivot the
LoRA is tuned around) and of cloneofsimo's lora, which introduced it; both train the new tokens and the LoRA in
one run and save the vectors beside the LoRA.

:class:`PivotalObjective` is a DreamBooth inner objective (:class:`~.dreambooth.Denoising`): DreamBooth's
instance prompt names the token and its prior preservation works as with a plain LoRA. It builds a
:class:`~.lora_trainer.LoraObjective` on a handle carrying the trainable embedding (an
:class:`~..core.handle.EmbeddingPatch` whose ``token`` is the new word), so the prompts read the word as the
vectors; the captions are encoded afresh each step since their gradients reach the vectors.

The result is one :class:`~..core.lora.LoraWeights` with the embedding bundled (``embeddings``): a kohya file
then holds it as ``bundle_emb.<name>.*`` (what A1111 reads), and Add LoRA applies it with the LoRA.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from ..core.embeddings import Embedding
from ..core.errors import FinetuneError
from ..core.families import Family
from ..core.fields import node_input
from ..core.handle import EmbeddingPatch, ModelHandle
from ..core.lora import LoraWeights
from .data import TrainingSet
from .diffusion import Cache, LatentCache, TextCache
from .lora_trainer import FrozenModel, LoraObjective, LoraSpec
from .memory import RunShape
from .settings import TrainSettings
from .ti_trainer import TISpec, check_spec, embedding_name, fresh_vectors, initial_vectors


@dataclass(frozen=True)
class PivotalSpec:
    """The new word of pivotal tuning; each field is also the Pivotal Tuning widget of that name."""

    token: str = node_input("<sks>", tooltip="The new prompt word for the subject; the instance prompt must contain "
                                             "it (e.g. 'a photo of <sks> dog'). Not an existing word; no spaces. "
                                             "The bundled embedding's name is the token without <> (sks).")
    initializer: str = node_input("", tooltip="A word describing the subject (dog, shape, ...); the vectors start "
                                              "from its embedding. Empty: the class word is not guessed, the "
                                              "vectors start from '*'.")
    num_vectors: int = node_input(2, min=1, max=16,
                                  tooltip="Vectors (prompt tokens) the word uses; diffusers' advanced script uses 2.")
    embedding_fraction: float = node_input(
        1.0, min=0.0, max=1.0, step=0.05,
        tooltip="Share of the steps the word's vectors train; after it they stay fixed and the LoRA trains around "
                "them (the pivot). 1.0: together to the end; diffusers' advanced script stops them at 0.5.")
    embedding_learning_rate: float = node_input(
        5e-3, min=0.0, max=10.0, step=1e-4, round=False,
        tooltip="Learning rate of the word's vectors (textual inversion's usual 5e-3; the LoRA uses learning_rate).")

    def ti_spec(self) -> TISpec:
        return TISpec(token=self.token, initializer=self.initializer, num_vectors=int(self.num_vectors),
                      templates="captions", min_timestep=0)


def check(handle: ModelHandle, spec: PivotalSpec, instance_prompt: str | None, node: str) -> None:
    """Refuse a token the prompts cannot read, a learning rate that teaches nothing, and an instance prompt
    without the token (the vectors would never get a gradient)."""
    if handle.family is Family.KOLORS:
        raise FinetuneError("pivotal tuning needs token embeddings of CLIP text encoders; Kolors' ChatGLM3 has no "
                            "embedding layout others read", node=node, input="pipe",
                            fix="use DreamBooth Train (method lora) for Kolors, or an SD 1.x / 2.x / SDXL model")
    check_spec(handle, spec.ti_spec(), node)
    if not float(spec.embedding_learning_rate) > 0:
        raise FinetuneError(f"embedding_learning_rate must be positive (got {spec.embedding_learning_rate})",
                            node=node, input="embedding_learning_rate", fix="use e.g. 5e-3")
    if instance_prompt is not None and spec.token not in instance_prompt.replace(",", " ").split():
        raise FinetuneError(f"the instance prompt '{instance_prompt}' does not contain the token '{spec.token}' as "
                            "a word, so the token would learn nothing", node=node, input="instance_prompt",
                            fix=f"put the token in the prompt, e.g. 'a photo of {spec.token} dog'")


class PivotalObjective:
    """Token vectors plus a LoRA, on ``handle``; the frame's :class:`~.frame.Objective` and DreamBooth's
    :class:`~.dreambooth.Denoising`."""

    def __init__(self, handle: ModelHandle, dataset: TrainingSet, settings: TrainSettings, lora: LoraSpec,
                 spec: PivotalSpec, *, node: str, extra_prompts: Sequence[str] = (),
                 frozen_prompts: Sequence[str] = ()) -> None:
        ti = spec.ti_spec()
        check(handle, spec, None, node)
        self.spec, self.settings, self.node, self.source = spec, settings, node, handle
        self.name = embedding_name(spec.token)
        device = handle.base.device
        self.params: dict[str, torch.nn.Parameter] = {
            comp: torch.nn.Parameter(v.to(device=device, dtype=torch.float32))
            for comp, v in initial_vectors(handle, ti, settings.seed, node).items()}
        self.embedding = Embedding(self.name, dict(self.params), token=spec.token)
        trained = handle.with_patch(EmbeddingPatch(self.embedding))
        self.lora = LoraObjective(trained, dataset, settings, lora, node=node, extra_prompts=extra_prompts,
                                  frozen_prompts=frozen_prompts)
        # The vectors' gradients run through the text encoders: every caption is encoded afresh each step. The
        # frozen model's prompts (the class prompt of DreamBooth's prior) do not name the token: cached.
        self.lora.text = TextCache(trained, node, cache=False)
        self.lora.frozen_text = TextCache(trained, node, prompts=frozen_prompts)

    # ------------------------------------------------------------------ what DreamBooth reads
    @property
    def latents(self) -> LatentCache:
        return self.lora.latents

    @property
    def frozen_text(self) -> TextCache:
        return self.lora.frozen_text

    def denoise(self, denoiser, latents: torch.Tensor, captions: list[str], h: int, w: int,
                generator: torch.Generator, target_fn=None) -> torch.Tensor:
        return self.lora.denoise(denoiser, latents, captions, h, w, generator, target_fn)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[FrozenModel]:
        with self.lora.frozen() as frozen:
            yield frozen

    # ------------------------------------------------------------------ the frame's contract
    @contextlib.contextmanager
    def attached(self) -> Iterator[PivotalObjective]:
        """The LoRA layers and fresh vectors for the block. The host runs nodes under inference mode, where a
        Parameter made in ``__init__`` can never get a gradient: the frame enters this after leaving it."""
        with self.lora.attached():
            fresh_vectors(self.params, self.embedding)
            yield self

    @property
    def train_handle(self) -> ModelHandle:
        return self.lora.train_handle

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        base = self.source.base  # the vectors' gradients run through the text encoders: they stay on the device
        return {"unet": base.unet, **{f"te{i + 1}": te for i, te in enumerate(base.text_encoders)}}

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.source.base.vae]

    def denoiser(self) -> torch.nn.Module:
        return self.lora.denoiser()

    def caches(self) -> list[Cache]:
        return [self.lora.latents, self.lora.text]

    def workload(self) -> RunShape:
        return replace(self.lora.workload(), grad_text_encoders=tuple(self.source.base.text_encoders))

    def param_groups(self) -> list[dict]:
        until = math.ceil(float(self.spec.embedding_fraction) * self.settings.steps)
        return [*self.lora.param_groups(),
                {"params": list(self.params.values()), "lr": float(self.spec.embedding_learning_rate),
                 "until": until}]

    def loss(self, step: int, batch, generator: torch.Generator, denoiser) -> torch.Tensor:
        return self.lora.loss(step, batch, generator, denoiser)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {**self.lora.trainable_state(), **{f"embedding:{c}": p.detach() for c, p in self.params.items()}}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        self.lora.load_trainable_state({k: v for k, v in state.items() if not k.startswith("embedding:")})
        with torch.no_grad():
            for comp, p in self.params.items():
                p.copy_(state[f"embedding:{comp}"])

    # ------------------------------------------------------------------ result
    def extract(self, metadata: dict[str, str] | None = None, name: str = "pivotal") -> LoraWeights:
        """The LoRA with the learned word bundled (``embeddings``); the metadata names the word."""
        meta = {**(metadata or {}), "ft_pivotal_token": self.spec.token, "ft_pivotal_embedding": self.name,
                "ft_pivotal_vectors": str(int(self.spec.num_vectors))}
        lora = self.lora.extract(meta, name=name)
        vectors = {comp: p.detach().float().cpu().clone() for comp, p in self.params.items()}
        lora.embeddings = {self.name: Embedding(self.name, vectors, {"token": self.spec.token},
                                                token=self.spec.token)}
        return lora
