"""The last stage: the released HF directory loads in transformers and gives our logits."""

from __future__ import annotations

import importlib.util

import numpy as np

from mixtral_jax.data.corpora import hsk_english, peoples_daily
from mixtral_jax.io.output_dir import write_json

SENTENCES = 2  # held-out sentences of each language, one batch each


def check_release(release: str, out: str, atol: float) -> dict:
    """Logits of transformers' MixtralForCausalLM (fp32, torch on CPU) against ours on held-out Chinese and
    English; the largest difference must be within `atol`. Without torch the check is recorded as skipped."""
    import mixtral_jax as mj
    from mixtral_jax.data.tokenizer import load_tokenizer

    if importlib.util.find_spec("torch") is None:
        result = {"release": release, "transformers": "skipped: torch is not installed (pip install torch)"}
    else:
        import torch
        from transformers import MixtralForCausalLM

        tokenizer = load_tokenizer(model=release)
        theirs_model = MixtralForCausalLM.from_pretrained(release, dtype=torch.float32).eval()
        ours_model = mj.from_pretrained(release, "float32", moe_backend="dense")
        largest = 0.0
        for lines in (peoples_daily("heldout")[:SENTENCES], hsk_english("heldout")[:SENTENCES]):
            for line in lines:
                ids = np.asarray([tokenizer.encode(line, add_bos=True)], np.int32)
                with torch.no_grad():
                    theirs = theirs_model(torch.from_numpy(ids).long()).logits.numpy()
                ours = np.asarray(ours_model(ids).logits)
                largest = max(largest, float(np.abs(ours - theirs).max()))
        result = {"release": release, "transformers": "MixtralForCausalLM.from_pretrained",
                  "max_abs_logit_difference": largest, "atol": atol, "passed": largest <= atol}
    write_json(out, result)
    if result.get("passed") is False:
        from pipeline.errors import PipelineError

        raise PipelineError(f"{release}: transformers' logits differ from ours by {largest:.3g} (> {atol}); "
                            f"see {out}")
    return result
