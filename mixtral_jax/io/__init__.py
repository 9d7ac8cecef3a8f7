"""Files and host memory, numpy only: local and gs:// paths, atomic output directories, safetensors, O_DIRECT
writes, reused buffers and fast transposes, reading ahead of a writer. Imports nothing of the project but
errors.py; never JAX (the converters start without it)."""
