"""Training core: data, the shared loop, LoRA / Textual Inversion / DreamBooth trainers. Never imports ComfyUI."""
