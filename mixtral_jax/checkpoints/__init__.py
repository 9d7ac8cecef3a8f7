"""Models on disk. name_map (our names and shapes against HF's), hf_files (HF safetensors directories),
orbax_files/orbax_keys/orbax_format (Orbax model checkpoints), sources (one layer-tensor at a time from any of
them), hf_model/orbax_load (onto devices), hf_to_orbax/orbax_to_hf (the converters), run_manifest/run_state
(training runs), peft (adapters), kinds and pretrained (`from_pretrained`: one entry for every path). The
no-JAX modules (name_map, hf_files, orbax_*, sources, kinds, run_manifest) must stay so: the converters start
without JAX."""
