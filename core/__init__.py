"""Plain-Python core of comfyui-finetune. Nothing in this package imports ComfyUI."""
