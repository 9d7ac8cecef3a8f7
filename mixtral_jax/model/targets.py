"""The linear weights of a decoder layer by name: those LoRA may adapt and NF4 quantises. No JAX here, so the
checkpoint name map and the train config read the same list without importing the model.

The order is part of the numerics: each adapter's dropout stream is drawn from its index in this tuple.
"""

LINEAR_WEIGHTS = ("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3", "gate")
