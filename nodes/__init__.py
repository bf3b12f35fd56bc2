"""Node registry: every node class of the pack, by id.

ComfyUI keeps the node classes of every pack in one dict keyed by id, so an id another pack (or ComfyUI itself)
also uses would replace one of the two nodes. Generic ids therefore carry the pack's ``Finetune`` prefix. Ids the
pack used before a rename stay loadable (:data:`RENAMED_NODE_IDS`): ComfyUI gets each old id as a subclass of the
current class that only sets ``DEPRECATED = True`` (same schema; ComfyUI loads such nodes in saved workflows and
leaves them out of search and the node menu), and the headless runner runs the current class for them.
"""

from __future__ import annotations

from .bridges import NODES as _BRIDGES
from .data import NODES as _DATA
from .dreambooth import NODES as _DREAMBOOTH
from .embedding_training import NODES as _EMBEDDING_TRAINING
from .generation import NODES as _GENERATION
from .image_prompt import NODES as _IMAGE_PROMPT
from .images import NODES as _IMAGES
from .instantid import NODES as _INSTANTID
from .pivotal import NODES as _PIVOTAL
from .saving import NODES as _SAVING
from .scoring import NODES as _SCORING
from .training import NODES as _TRAINING

ALL_NODES = [*_GENERATION, *_DATA, *_TRAINING, *_EMBEDDING_TRAINING, *_DREAMBOOTH, *_PIVOTAL, *_SAVING, *_BRIDGES,
             *_IMAGES, *_SCORING, *_IMAGE_PROMPT, *_INSTANTID]

# Old id -> current id, for workflows saved before the rename.
RENAMED_NODE_IDS: dict[str, str] = {
    "TrainingData": "FinetuneTrainingData",
    "TrainingDataFromImages": "FinetuneTrainingDataFromImages",
    "TrainLoRA": "FinetuneTrainLoRA",
    "ApplyLoRAToModel": "FinetuneApplyLoRAToModel",
    "EmbeddingToPrompt": "FinetuneEmbeddingToPrompt",
}


def _deprecated_alias(old_id: str, cls: type) -> type:
    """A subclass of ``cls`` that only sets ``DEPRECATED = True``: the node behind the old id ``old_id``."""
    return type(f"Deprecated{old_id}", (cls,), {
        "DEPRECATED": True,
        "__module__": cls.__module__,
        "__doc__": f"The old id {old_id!r} of {cls.NODE_ID!r}, kept so saved workflows load; hidden from search.",
    })


NODE_CLASS_MAPPINGS = {cls.NODE_ID: cls for cls in ALL_NODES}
NODE_DISPLAY_NAME_MAPPINGS = {cls.NODE_ID: cls.DISPLAY_NAME for cls in ALL_NODES}
NODE_CLASS_MAPPINGS.update({old: _deprecated_alias(old, NODE_CLASS_MAPPINGS[new])
                            for old, new in RENAMED_NODE_IDS.items()})
NODE_DISPLAY_NAME_MAPPINGS.update({old: NODE_DISPLAY_NAME_MAPPINGS[new] for old, new in RENAMED_NODE_IDS.items()})
