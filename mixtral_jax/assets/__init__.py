"""Files shipped with the package: the bundled tiny model (an HF directory, random weights from a fixed seed,
made by `mixtral-jax convert init --preset tiny --seed 0 --dtype bfloat16`)."""

import os

TINY_MODEL_DIR = os.path.join(os.path.dirname(__file__), "tiny")
