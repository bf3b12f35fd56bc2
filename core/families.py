"""Model families and the facts that differ between them."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Family(str, enum.Enum):
    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"

    @property
    def label(self) -> str:
        return {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}[self.value]


@dataclass(frozen=True)
class FamilyInfo:
    family: Family
    latent_scale: float  # VAE scaling factor (diffusers `vae.config.scaling_factor` default)
    default_size: int  # native resolution in pixels
    # Which hidden state of each text encoder conditions the UNet: -1 last (+final LN), -2 penultimate.
    te_layers: tuple[int, ...]
    te_final_norm: bool  # apply final layer norm to the chosen hidden state
    te_pad_ids: tuple[str, ...]  # per encoder: "eos" pads with the end token, "zero" pads with id 0
    modelspec_arch: str


FAMILIES: dict[Family, FamilyInfo] = {
    Family.SD1: FamilyInfo(Family.SD1, 0.18215, 512, (-1,), True, ("eos",), "stable-diffusion-v1"),
    Family.SD2: FamilyInfo(Family.SD2, 0.18215, 768, (-1,), True, ("zero",), "stable-diffusion-v2-768-v"),
    Family.SDXL: FamilyInfo(Family.SDXL, 0.13025, 1024, (-2, -2), False, ("eos", "zero"), "stable-diffusion-xl-v1-base"),
}


def info(family: Family | str) -> FamilyInfo:
    return FAMILIES[Family(family)]
