"""`python -m mixtral_jax.cli`, the same as the `mixtral-jax` console script."""

import sys

from mixtral_jax.cli.main import main

sys.exit(main())
