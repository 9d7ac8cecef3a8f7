"""Device kernels: the experts' grouped products on Hopper GPUs (Pallas Mosaic GPU) and TPUs (Pallas megablox)
and which kernels "auto" picks for the default device. Imports JAX only, never the model."""
