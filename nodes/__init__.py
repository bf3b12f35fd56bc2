"""Node registry: every node class of the pack, by id."""

from __future__ import annotations

from .bridges import NODES as _BRIDGES
from .data import NODES as _DATA
from .dreambooth import NODES as _DREAMBOOTH
from .embedding_training import NODES as _EMBEDDING_TRAINING
from .generation import NODES as _GENERATION
from .images import NODES as _IMAGES
from .saving import NODES as _SAVING
from .training import NODES as _TRAINING

ALL_NODES = [*_GENERATION, *_DATA, *_TRAINING, *_EMBEDDING_TRAINING, *_DREAMBOOTH, *_SAVING, *_BRIDGES, *_IMAGES]

NODE_CLASS_MAPPINGS = {cls.NODE_ID: cls for cls in ALL_NODES}
NODE_DISPLAY_NAME_MAPPINGS = {cls.NODE_ID: cls.DISPLAY_NAME for cls in ALL_NODES}
