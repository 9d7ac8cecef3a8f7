"""Device kernels: the experts' grouped products on Hopper GPUs (Pallas Mosaic GPU) and which kernels "auto"
picks for the default device. Imports JAX only, never the model."""
