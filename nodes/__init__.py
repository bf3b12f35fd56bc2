"""Node registry: every node class of the pack, by id."""

from __future__ import annotations

from .generation import NODES as _GENERATION

ALL_NODES = [*_GENERATION]

NODE_CLASS_MAPPINGS = {cls.NODE_ID: cls for cls in ALL_NODES}
NODE_DISPLAY_NAME_MAPPINGS = {cls.NODE_ID: cls.DISPLAY_NAME for cls in ALL_NODES}
