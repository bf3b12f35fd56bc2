"""Model families and the facts that differ between them.

:data:`FAMILIES` holds what differs per family; :data:`MODELSPECS` what differs per family *and* prediction type
(the names ModelSpec and kohya give a base model, and its native resolution). Every file the pack writes takes its
``modelspec.*`` and ``ss_base_model_version`` values from :func:`modelspec_keys` / :func:`modelspec`, so a LoRA, an
embedding and a checkpoint of the same model always agree.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from .errors import FinetuneError


class Family(str, enum.Enum):
    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"
    KOLORS = "kolors"

    @property
    def label(self) -> str:
        return {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "kolors": "Kolors"}[self.value]


@dataclass(frozen=True)
class FamilyInfo:
    family: Family
    latent_scale: float  # VAE scaling factor (diffusers `vae.config.scaling_factor` default)
    # Which hidden state of each text encoder conditions the UNet: -1 last (+final LN), -2 penultimate.
    te_layers: tuple[int, ...]
    te_final_norm: bool  # apply final layer norm to the chosen hidden state
    te_pad_ids: tuple[str, ...]  # per encoder: "eos" pads with the end token, "zero" pads with id 0
    # The prediction type assumed where a caller does not know it: SD 2.x means its 768-v models (SD 2.0/2.1).
    v_default: bool
    # SDXL-style added conditioning (pooled text embedding + size/crop time ids) into the UNet.
    size_conditioning: bool = False

    @property
    def default_size(self) -> int:
        """Native resolution in pixels of the family's usual model (SD 2.x: 768, the v models)."""
        return default_resolution(self.family)


FAMILIES: dict[Family, FamilyInfo] = {
    Family.SD1: FamilyInfo(Family.SD1, 0.18215, (-1,), True, ("eos",), v_default=False),
    Family.SD2: FamilyInfo(Family.SD2, 0.18215, (-1,), True, ("zero",), v_default=True),
    Family.SDXL: FamilyInfo(Family.SDXL, 0.13025, (-2, -2), False, ("eos", "zero"), v_default=False,
                            size_conditioning=True),
    # Kolors: the SDXL VAE and UNet layout; one ChatGLM3 encoder whose second-to-last hidden state conditions the
    # UNet (through its encoder_hid_proj) and whose last state at the last position is the pooled embedding.
    Family.KOLORS: FamilyInfo(Family.KOLORS, 0.13025, (-2,), False, ("zero",), v_default=False,
                              size_conditioning=True),
}


def info(family: Family | str) -> FamilyInfo:
    return FAMILIES[Family(family)]


# ---------------------------------------------------------------------------------------------- ModelSpec
@dataclass(frozen=True)
class Modelspec:
    """How ModelSpec (spec 1.0.1, ``modelspec.*`` metadata) and kohya's ``ss_*`` metadata name one base model."""

    architecture: str  # ``modelspec.architecture`` of the model; adapters append "/lora" or "/textual-inversion"
    resolution: int  # native size in pixels; ``modelspec.resolution`` is "<n>x<n>"
    kohya_version: str  # kohya's ``ss_base_model_version``


# (family, v-prediction) -> names. ModelSpec's architecture ids are stable-diffusion-v1, -v2-512, -v2-768-v and
# -xl-v1-base, at 512x512, 512x512, 768x768 and 1024x1024; kohya writes sd_v1, sd_v2 (+ "_v" for v-prediction) and
# sdxl_base_v1-0. SD 2.x epsilon models are the 512 ones (SD 2.0/2.1-base), its v models the 768 ones.
MODELSPECS: dict[tuple[Family, bool], Modelspec] = {
    (Family.SD1, False): Modelspec("stable-diffusion-v1", 512, "sd_v1"),
    (Family.SD1, True): Modelspec("stable-diffusion-v1", 512, "sd_v1_v"),
    (Family.SD2, False): Modelspec("stable-diffusion-v2-512", 512, "sd_v2"),
    (Family.SD2, True): Modelspec("stable-diffusion-v2-768-v", 768, "sd_v2_v"),
    (Family.SDXL, False): Modelspec("stable-diffusion-xl-v1-base", 1024, "sdxl_base_v1-0"),
    (Family.SDXL, True): Modelspec("stable-diffusion-xl-v1-base", 1024, "sdxl_base_v1-0"),
    # ModelSpec defines no Kolors id and kohya does not train Kolors: both are named "kolors" (as the model's own
    # repository and SimpleTuner's model family name it).
    (Family.KOLORS, False): Modelspec("kolors", 1024, "kolors"),
    (Family.KOLORS, True): Modelspec("kolors", 1024, "kolors"),
}

FileKind = Literal["checkpoint", "lora", "textual-inversion"]
SGM_URL = "https://github.com/Stability-AI/generative-models"
MODELSPEC_VERSION = "1.0.1"  # the current ModelSpec version, as kohya writes it


def _is_v(family: Family, v_prediction: bool | None) -> bool:
    return info(family).v_default if v_prediction is None else bool(v_prediction)


def modelspec(family: Family | str, v_prediction: bool | None = None) -> Modelspec:
    """The ModelSpec/kohya names of a ``family`` model; ``v_prediction`` None: the family's usual prediction."""
    family = Family(family)
    return MODELSPECS[(family, _is_v(family, v_prediction))]


def default_resolution(family: Family | str, v_prediction: bool | None = None) -> int:
    """Native resolution in pixels: SD 1.x 512, SD 2.x 512 (epsilon) or 768 (v), SDXL 1024."""
    return modelspec(family, v_prediction).resolution


def modelspec_implementation(family: Family | str, kind: FileKind) -> str:
    """``modelspec.implementation`` as the usual writers set it: ``sgm`` for checkpoints (ComfyUI's), the
    generative-models URL for textual inversions and SDXL LoRAs, ``diffusers`` for SD 1.x/2.x LoRAs (kohya's) and
    for every Kolors file (a diffusers-only model: no sgm implementation exists)."""
    if Family(family) is Family.KOLORS:
        return "diffusers"
    if kind == "checkpoint":
        return "sgm"
    if kind == "lora" and Family(family) is not Family.SDXL:
        return "diffusers"
    return SGM_URL


def modelspec_keys(family: Family | str, kind: FileKind, v_prediction: bool | None = None) -> dict[str, str]:
    """The ModelSpec MUST keys but the title (``sai_model_spec``, ``architecture``, ``implementation``,
    ``resolution``) for a ``kind`` file of a ``family`` model."""
    spec = modelspec(family, v_prediction)
    suffix = "" if kind == "checkpoint" else f"/{kind}"
    return {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": spec.architecture + suffix,
        "modelspec.implementation": modelspec_implementation(family, kind),
        "modelspec.resolution": f"{spec.resolution}x{spec.resolution}",
    }


def default_scheduler_config(family: Family, prediction_type: str) -> dict:
    """The noise schedule every SD 1.x / 2.x / SDXL model was trained with: DDPM, betas 0.00085..0.012 on a
    scaled_linear schedule, 1000 steps; Kolors' (its scheduler_config.json): betas 0.00085..0.014, 1100 steps."""
    kolors = Family(family) is Family.KOLORS
    return {
        "_class_name": "EulerDiscreteScheduler",
        "num_train_timesteps": 1100 if kolors else 1000,
        "beta_start": 0.00085,
        "beta_end": 0.014 if kolors else 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": prediction_type,
        "timestep_spacing": "leading",
        "steps_offset": 1,
        "clip_sample": False,
        "set_alpha_to_one": False,
    }


# ---------------------------------------------------------------------------------------------- mismatches
def family_mismatch(what: str, have: Family | str, model: Family | str, *, why: str = "", input: str | None = None,
                    node: str | None = None) -> FinetuneError:
    """The one error for a ``what`` (``"LoRA"``, ``"embedding"``) made for family ``have`` used on a ``model``
    model; ``why`` says how ``have`` was found (e.g. "its metadata says so")."""
    have, model = Family(have), Family(model)
    because = f" ({why})" if why else ""
    return FinetuneError(f"this {what} is for {have.label} but the model is {model.label}{because}", node=node,
                         input=input, fix=f"use a {what} made for {model.label}, or load the {have.label} model "
                                          f"it was made for")


def check_family(what: str, have: Family | str | None, model: Family | str, *, why: str = "",
                 input: str | None = None, node: str | None = None) -> None:
    """Raise :func:`family_mismatch` unless ``have`` (None: unknown, accepted) is ``model``'s family."""
    if have is not None and Family(have) is not Family(model):
        raise family_mismatch(what, have, model, why=why, input=input, node=node)


def sgm_unet_names(family: Family | str) -> bool:
    """Whether kohya-layout files name this family's UNet modules by SGM (``input_blocks_4_1_...``): SDXL, and
    Kolors, whose UNet is SDXL's."""
    return Family(family) in (Family.SDXL, Family.KOLORS)
