"""Personalization benchmark on the built-in shapes-tiny model: DreamBooth, Textual Inversion and LoRA, judged.

    python benchmarks/personalization.py [--out bench-out] [--fast] [--samples 8] [--only dreambooth,ti,lora]
        [--methods lora,full,pivotal] [--json r.json]

Prints a table of each measure next to its target and writes bench-out/grid.png. The measures live in
``comfy_finetune.shapes.personalization`` (the tests run fast versions of them).
"""

import sys

from comfy_finetune.shapes.personalization import main

if __name__ == "__main__":
    sys.exit(main())
