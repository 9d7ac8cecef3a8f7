"""The Flax NNX Mixtral: the transformer, attention, the sparse MoE (router and experts), LoRA adapters, the
NF4 base, the loss with its router auxiliary loss, decoding with a KV cache, and FLOP counts. Imports
kernels/, quantization/, parallel/ and config; knows nothing of files (checkpoints/ does)."""
