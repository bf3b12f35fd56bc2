"""The shapes world: a tiny synthetic text-to-image world for the ``shapes-tiny`` base model and its benchmark.

* :mod:`.world` renders 64x64 images of coloured shapes on plain backgrounds, with word captions
  ("a red circle on a white background"), and says which combinations the base model never sees
  (:data:`~.world.HELD_OUT`), to be taught later by DreamBooth, Textual Inversion and LoRA.
* :mod:`.judge` tells what a (generated) image shows: shape, colour, background and fill.

Only numpy and PIL are needed for the world; the judge also needs torch.
"""

from .world import (
                    BACKGROUNDS,
                    COLORS,
                    FILLS,
                    HELD_OUT,
                    SHAPES,
                    UNSEEN_COLORS,
                    Spec,
                    all_specs,
                    held_out_specs,
                    is_held_out,
                    render,
                    render_batch,
                    training_specs,
                    vocabulary,
)

__all__ = [
    "SHAPES", "COLORS", "UNSEEN_COLORS", "BACKGROUNDS", "FILLS", "HELD_OUT", "Spec", "render", "render_batch",
    "all_specs", "training_specs", "held_out_specs", "is_held_out", "vocabulary",
]
