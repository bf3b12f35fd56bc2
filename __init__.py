"""comfyui-finetune: LoRA, Textual Inversion and DreamBooth for SD 1.x / 2.x / SDXL as ComfyUI nodes.

ComfyUI imports this folder as a package (by file path), so everything below uses relative
imports only. After ``pip install -e .`` the same code imports as ``comfy_finetune``.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
__version__ = "0.1.0"
