"""posenc's Gradio app: ``python app.py`` (from any working directory).

Environment: ``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT`` pick the address (Gradio reads them itself),
``POSENC_CHECKPOINTS`` the bundled checkpoints folder, ``POSENC_MODELS`` extra local model folders
(separated by the OS path separator; listed under their folder names), ``POSENC_CACHE_SIZE`` how many
models stay loaded, ``POSENC_FIRST_MODEL`` the Hub model fetched at start-up for first visits (DeiT-Tiny by
default; ``off`` turns it off).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

from posenc.registry import HUB_MODELS, checkpoints_dir
from posenc.app import QUEUE_OPTIONS, create_demo, first_model_from_env, launch_options

EXAMPLES = Path(__file__).resolve().parent / "assets" / "examples"

demo = create_demo(
    checkpoints_dir=checkpoints_dir(),
    registry=HUB_MODELS,
    cache_size=int(os.environ.get("POSENC_CACHE_SIZE", "4")),
    examples_dir=EXAMPLES,
    extra_models=[p for p in os.environ.get("POSENC_MODELS", "").split(os.pathsep) if p],
    first_model=first_model_from_env(),
)

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # exit cleanly, so the temporary files are removed
    demo.queue(**QUEUE_OPTIONS).launch(**launch_options(EXAMPLES))
