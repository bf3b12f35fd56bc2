"""The headless tier: run ComfyUI workflow files without ComfyUI.

* :mod:`.runner`: the command line (``python -m comfy_finetune run|nodes``, the ``comfy-finetune`` script) and
  :func:`.runner.run_workflow`;
* :mod:`.workflow`: reads workflow files and converts the UI format to an API-format prompt as the frontend does;
* :mod:`.executor`: validates and runs API-format prompts with ComfyUI's semantics;
* :mod:`.native_nodes`: stand-ins for the ComfyUI core nodes the example workflows use (LoadImage, SaveImage,
  PreviewImage).

The node classes are the pack's own (:mod:`..nodes`), the same ones ComfyUI runs. Loading the pack in ComfyUI
(the package ``__init__``, :mod:`..nodes`) never imports this package.
"""
