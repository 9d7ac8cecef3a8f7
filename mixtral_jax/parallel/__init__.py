"""Devices: the mesh, the one table of logical-axis rules that maps parameter and activation axes onto it,
and multi-host start-up. Imports config and quantization (an NF4 weight shards by its own axes), never the
model."""
