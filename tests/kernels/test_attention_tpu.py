"""kernels/attention_tpu.py: splash attention against XLA's attention under `visibility_mask` (values and
q/k/v gradients), in Pallas interpret mode on this CPU; "auto" picking it on a (faked) TPU; the model's
routing to it; a whole model on it against the default path."""
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.kernels import attention_tpu
from mixtral_jax.kernels import select as kernels
from mixtral_jax.model import attention
from mixtral_jax.model.attention import grouped_query_attention, visibility_mask
from mixtral_jax.parallel import sharding

TPU = SimpleNamespace(platform="tpu", device_kind="TPU v5p")


def _segments(kind: str, length: int) -> np.ndarray:
    """[2, T] segment ids. one: a full row and a right-padded one; packed: samples 1, 2, 3 then padding, and
    a left-padded row (its first queries have no real key before them)."""
    rows = np.ones((2, length), np.int32)
    if kind == "one":
        rows[1, 2 * length // 3:] = 0
    else:
        sizes = [length // 3, length // 4, length // 4]
        rows[0] = np.repeat([1, 2, 3, 0], sizes + [length - sum(sizes)])
        rows[1, :length // 5] = 0
    return rows


def _inputs(length, heads, kv_heads, dtype, head_dim=16, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (2, length, heads, head_dim), jnp.float32).astype(dtype)
    k, v = (jax.random.normal(key, (2, length, kv_heads, head_dim), jnp.float32).astype(dtype) for key in keys[1:3])
    return q, k, v, keys[3]


def _xla(q, k, v, segments, window):
    slots = jnp.broadcast_to(jnp.arange(q.shape[1]), segments.shape)
    return grouped_query_attention(q, k, v, visibility_mask(slots, segments, segments, window), "xla")


def _value_and_grads(attend_fn, q, k, v, cotangent):
    """Output and d(sum(out * cotangent))/d(q, k, v), in one jitted program."""
    def loss(q, k, v):
        out = attend_fn(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


CASES = {  # heads, kv_heads, window, segments, length, block
    "causal_gqa2": (4, 2, None, "one", 64, None),
    "gqa4_window": (8, 2, 5, "one", 48, None),
    "mqa_packed": (4, 1, None, "packed", 64, None),
    "window_packed": (4, 2, 6, "packed", 40, None),
    "two_blocks_packed": (4, 2, None, "packed", 200, 128),  # T = 200 on 128-blocks: padded to 256
    "two_blocks_window": (2, 1, 70, "one", 150, 128),       # the window crosses a block edge
}


TOLERANCE = {"fp32": (jnp.float32, 2e-5), "bf16": (jnp.bfloat16, 3e-2)}


@pytest.mark.slow
@pytest.mark.parametrize("case, precision", [(case, "fp32") for case in CASES]
                         + [("causal_gqa2", "bf16"), ("window_packed", "bf16")])
def test_values_and_gradients_match_xla(case, precision):
    """Real query rows: output and q/k/v gradients of a loss that reads real rows only (as the LM loss
    does) equal XLA's. Padding rows see other keys than XLA's (see `splash_query_segments`) but are finite."""
    dtype, atol = TOLERANCE[precision]
    heads, kv_heads, window, kind, length, block = CASES[case]
    segments = jnp.asarray(_segments(kind, length))
    q, k, v, key = _inputs(length, heads, kv_heads, dtype)
    cotangent = jax.random.normal(key, q.shape) * (segments > 0)[:, :, None, None]
    splash = lambda q, k, v: attention_tpu.splash_attention(q, k, v, segments, segments, window, block)
    got, got_grads = _value_and_grads(splash, q, k, v, cotangent)
    want, want_grads = _value_and_grads(lambda q, k, v: _xla(q, k, v, segments, window), q, k, v, cotangent)
    real = np.asarray(segments > 0)[:, :, None, None]
    assert np.isfinite(np.asarray(got, np.float32)).all()
    np.testing.assert_allclose(np.where(real, np.asarray(got, np.float32), 0),
                               np.where(real, np.asarray(want, np.float32), 0), atol=atol, rtol=0)
    for name, g, w in zip("qkv", got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=2 * atol, rtol=0,
                                   err_msg=f"d{name}")


@pytest.mark.slow
def test_padding_rows_have_finite_gradients():
    """A cotangent on every row, padding rows included: left padding (no real key before the first
    queries) and trailing padding past a window of 4 (no real key in their window) give no NaN or inf."""
    segments = jnp.asarray(_segments("packed", 40))
    q, k, v, key = _inputs(40, 4, 2, jnp.float32)
    grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attention_tpu.splash_attention(q, k, v, segments, segments, 4)
                                                     * jax.random.normal(key, q.shape)), argnums=(0, 1, 2)))(q, k, v)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


@pytest.mark.parametrize("window", [None, 1, 3, 8])
def test_query_segments_see_what_visibility_mask_shows_and_never_nothing(window):
    """What splash sees with `splash_query_segments` (causal or local, equal ids): on real rows exactly
    `visibility_mask`; on the padding rows of a one-sample row too, wherever that row is not empty; and no
    row is empty (a NaN in splash)."""
    segments = np.concatenate([_segments("one", 30), _segments("packed", 30)])
    slots = jnp.broadcast_to(jnp.arange(30), segments.shape)
    want = np.asarray(visibility_mask(slots, jnp.asarray(segments), jnp.asarray(segments), window))
    query_ids = np.asarray(attention_tpu.splash_query_segments(jnp.asarray(segments), jnp.asarray(segments), window))
    t, s = np.arange(30)[:, None], np.arange(30)[None, :]
    static = (s <= t) & ((t - s < window) if window else True)
    got = static & (query_ids[:, :, None] == segments[:, None, :])
    real = segments > 0
    np.testing.assert_array_equal(got[real], want[real])
    one_sample = np.zeros_like(real)
    one_sample[:2] = True  # the rows of `_segments("one")`
    np.testing.assert_array_equal(got[one_sample & want.any(-1)], want[one_sample & want.any(-1)])
    assert got.any(-1).all()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_auto_picks_splash_on_tpu(monkeypatch, dtype):
    monkeypatch.setattr(kernels, "default_device", lambda: TPU)
    assert kernels.attention_implementation("auto", dtype) == "splash"
    assert kernels.attention_implementation("xla", dtype) == "xla"


def test_attend_routes_only_uncached_visibilities_to_splash(monkeypatch):
    """Splash gets a `Visibility` of a pass without a cache (chunked or not); a cache or a bool mask, and
    "auto" off TPU, stay on XLA's attention."""
    calls = []
    monkeypatch.setattr(attention, "splash_self_attention", lambda q, *_: calls.append(q.shape) or q)
    q, k, v, _ = _inputs(12, 4, 2, jnp.float32)
    segments = jnp.ones((2, 12), jnp.int32)
    vis = attention.visibility(jnp.broadcast_to(jnp.arange(12), (2, 12)), segments, segments, None)
    want = attention.attend(q, k, v, vis, None, "xla")
    for kwargs in (dict(implementation="splash", cached=True), dict(implementation="auto")):
        np.testing.assert_allclose(np.asarray(attention.attend(q, k, v, vis, **kwargs)), np.asarray(want), atol=1e-6)
    np.testing.assert_allclose(np.asarray(attention.attend(q, k, v, vis.mask(), None, "splash")), np.asarray(want),
                               atol=1e-6)
    assert calls == []
    attention.attend(q, k, v, vis, 5, "splash")  # with a chunk too: splash needs none
    assert calls == [q.shape]


@pytest.mark.slow
def test_splash_on_a_mesh_matches_xla():
    """Under a data=2, tensor=2 mesh (shard_map per shard): query and KV heads split alike (4 and 2 heads),
    and split unalike (MQA: the heads stay whole)."""
    mesh = sharding.make_mesh("data=2,tensor=2", devices=jax.devices()[:4])
    segments = jnp.asarray(_segments("packed", 24))
    vis = attention.visibility(jnp.broadcast_to(jnp.arange(24), (2, 24)), segments, segments, 5)
    real = np.asarray(segments > 0)[:, :, None, None]
    for kv_heads in (2, 1):
        q, k, v, _ = _inputs(24, 4, kv_heads, jnp.float32)

        @jax.jit
        def run(q, k, v):
            with sharding.use_mesh(mesh):
                return attention.attend(q, k, v, vis, None, "splash")

        got, want = np.asarray(run(q, k, v)), np.asarray(_xla(q, k, v, segments, 5))
        np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=2e-5)


@pytest.mark.slow
def test_model_on_splash_gives_the_default_logits(reference_dirs):
    """from_pretrained(..., attention_implementation="splash") on this CPU: a sliding window (5), GQA 4,
    a right-padded row; logits of the real tokens within 1e-4 of the default (XLA) path."""
    import mixtral_jax

    model, directory = reference_dirs("gqa4_top2_window")
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 14))
    mask = np.ones((2, 14), np.int32)
    mask[1, 9:] = 0
    splash = mixtral_jax.from_pretrained(directory, dtype="float32", attention_implementation="splash")
    default = mixtral_jax.from_pretrained(directory, dtype="float32")
    got, want = (np.asarray(m(ids, attention_mask=mask).logits) for m in (splash, default))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[mask > 0], want[mask > 0], atol=1e-4, rtol=0)
