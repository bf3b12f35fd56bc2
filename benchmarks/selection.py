"""In-loop checkpoint selection on the personalization benchmark: does the kept step beat the last one?

    python benchmarks/selection.py [--out DIR] [--seeds 1] [--fast] [--only dreambooth,ti,lora] [--threads N]
                                   [--independent-samples N] [--evaluations K]

Trains every personalization concept through the trainer nodes with a Shapes Judge scorer (what a user would wire)
and a weight-0 independent part measuring the benchmark's own figure on other seeds; prints, per run, the
independent figure at the kept step, the last step and its best step, and the scoring overhead, against the targets
(kept >= last on every run, mean oracle - kept <= 3 points, overhead <= 15 %). The measures live in
``comfy_finetune.shapes.selection_bench``.
"""

import sys

from comfy_finetune.shapes.selection_bench import main

if __name__ == "__main__":
    sys.exit(main())
