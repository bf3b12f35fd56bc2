"""Shared plumbing for node classes: error attribution and small schema helpers.

Nodes are thin: a schema (``INPUT_TYPES`` with a tooltip on everything) and one call into the
core. Every exception leaving a node names the node; cancel passes through untouched.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from ..core.errors import FinetuneError

log = logging.getLogger("comfy_finetune")

CATEGORY = "finetune"

# Custom link types. Namespaced so they never clash with ComfyUI's MODEL/CLIP or another pack's.
PIPE = "FT_PIPE"
LORA = "FT_LORA"
NEGATIVE = "FT_NEGATIVE"
EMBEDDING = "FT_EMBEDDING"


def _wrap(node_id: str, fn):
    @functools.wraps(fn)
    def run(self, *args: Any, **kwargs: Any):
        from .. import host  # noqa: PLC0415

        try:
            return fn(self, *args, **kwargs)
        except host.interrupt_exception_types():
            raise
        except FinetuneError as exc:
            if exc.node:
                raise
            raise exc.with_node(node_id) from exc
        except MemoryError as exc:
            raise FinetuneError("out of memory", node=node_id,
                                fix="use a smaller size or batch, fp16/bf16, or free other models") from exc
        except Exception as exc:
            if type(exc).__name__ == "OutOfMemoryError":
                import torch  # noqa: PLC0415

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                raise FinetuneError(f"out of GPU memory ({exc})".split("\n")[0], node=node_id,
                                    fix="use a smaller size or batch, fp16/bf16, or free other models") from exc
            raise

    return run


class FTNode:
    """Base class: sets FUNCTION and attributes errors raised by ``run`` to the node."""

    NODE_ID: str = ""
    DISPLAY_NAME: str = ""
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "run" in cls.__dict__ and cls.NODE_ID:
            cls.run = _wrap(cls.NODE_ID, cls.__dict__["run"])


def file_signature(path) -> str:
    """Cheap change marker for a file-backed input (mtime + size), for IS_CHANGED."""
    try:
        st = path.stat()
    except (OSError, AttributeError):
        return ""
    return f"{st.st_mtime_ns}:{st.st_size}"
