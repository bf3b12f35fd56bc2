"""comfyui-finetune: LoRA, Textual Inversion and DreamBooth for SD 1.x / 2.x / SDXL as ComfyUI nodes.

ComfyUI imports this folder as a package (by file path), so everything below uses relative
imports only. After ``pip install -e .`` the same code imports as ``comfy_finetune``.
"""

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
# else: the file was imported bare, as ``__init__`` (pytest sets up the checkout folder as a package and imports this
# file under the folder's name, or bare when that name is no identifier, e.g. ``comfyui-finetune``); there are no
# relative imports then, and nothing there uses the node mappings.

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
__version__ = "0.1.0"
