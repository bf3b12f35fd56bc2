"""``python -m comfy_finetune``: the headless runner."""

import sys

from .headless.runner import main

if __name__ == "__main__":
    sys.exit(main())
