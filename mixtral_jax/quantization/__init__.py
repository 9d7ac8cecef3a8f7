"""NF4 (QLoRA's 4-bit NormalFloat), bit-exact with bitsandbytes: the codes and their (double) quantisation,
and `NF4Weight`, a weight stored that way with its logical axes. Imports JAX only, never the model."""
