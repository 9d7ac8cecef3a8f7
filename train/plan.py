"""Memory plans: compile (never run) the real-size train step on a simulated mesh and read its memory analysis.

The model is built abstractly (`nnx.eval_shape`), parameters, optimizer state and batch reach `.lower()` as
`jax.ShapeDtypeStruct`s carrying their shardings, and XLA's buffer assignment of the compiled step gives the
bytes each device needs. The figures are per device. They are checked against a count by hand: the
library's parameter shapes (`checkpoints.name_map.param_shapes`), divided by the shards their partition specs
make. The optimizer is the trainer's own (`train.optim.make_optimizer`), so its state is what a run holds.

The communication of a step is counted too, per device, as a TPU would run it (`parallel.collectives`): the
collectives XLA's SPMD partitioner inserts from this CPU compilation, the explicit ones (the expert exchange)
from the step lowered for TPU, traced with what "auto" picks there.

On CPU a mesh of N devices needs `XLA_FLAGS=--xla_force_host_platform_device_count=N` before jax starts its
backends; `ensure_cpu_devices` sets it when it still can (see `train/cli.py` for the re-run when it cannot).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import resource
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from mixtral_jax.checkpoints.name_map import param_shapes
from mixtral_jax.checkpoints.orbax_keys import is_expert
from mixtral_jax.config import MixtralConfig
from mixtral_jax.kernels.select import expert_exchange_kind
from mixtral_jax.model.lora import LoraConfig, LoRAParam
from mixtral_jax.model.nf4_base import quantize_base
from mixtral_jax.model.targets import LINEAR_WEIGHTS
from mixtral_jax.model.transformer import Mixtral
from mixtral_jax.parallel.collectives import compile_partitioned, retarget
from mixtral_jax.parallel.sharding import (
    MESH_AXES,
    MeshError,
    make_mesh,
    mesh_device_count,
)
from mixtral_jax.quantization.nf4 import DQ_BLOCKSIZE
from mixtral_jax.quantization.nf4_weight import BLOCK
from train.config import OptimizerConfig
from train.data import batch_split
from train.optim import make_optimizer, master_dtype
from train.step import BATCH_KEYS, TrainStep, make_train_step, master_weights

GiB = 2 ** 30
# HBM per chip, as the vendors state it (GiB: these are binary sizes). Runtimes keep a little for themselves.
CHIPS = (("TPU v4", 32), ("TPU v5e", 16), ("TPU v5p", 95), ("TPU v6e", 32), ("H100", 80), ("H200", 141))
HAND_COUNT_TOLERANCE = 0.03  # compiled argument bytes vs the hand count (relative)
OPTIMIZER = "adamw"  # train.optim.make_optimizer's, the only one
STEP_COUNT_BYTES = 8  # the optimizer's two int32 step counts: Adam's (bias correction) and the schedule's
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


# ------------------------------------------------------------------------------------------------ devices
def _requested_cpu_devices() -> int:
    match = re.search(rf"{_DEVICE_COUNT_FLAG}=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(match.group(1)) if match else 1


def with_device_count(flags: str, count: int) -> str:
    """XLA_FLAGS text with the simulated CPU device count set to `count`."""
    flags = re.sub(rf"{_DEVICE_COUNT_FLAG}=\S*", "", flags).strip()
    return f"{flags} {_DEVICE_COUNT_FLAG}={count}".strip()


def ensure_cpu_devices(count: int) -> list[jax.Device] | None:
    """`count` CPU devices. Before jax has started its backends this raises the simulated device count in
    XLA_FLAGS (never lowers it) and so always succeeds; afterwards it returns None when there are too few."""
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized() and _requested_cpu_devices() < count:
        os.environ["XLA_FLAGS"] = with_device_count(os.environ.get("XLA_FLAGS", ""), count)
    devices = jax.devices("cpu")
    return devices[:count] if len(devices) >= count else None


# ------------------------------------------------------------------------------------------------ hand count
def config_param_count(config: MixtralConfig) -> int:
    """V*D + D*V (untied) + L*(q, k, v, o + router D*E + experts 3*E*D*F + two norms D) + final norm D, from the
    library's parameter shapes (checkpoints.name_map, checked against the model's in its tests)."""
    return sum(math.prod(shape) for shape in param_shapes(config).values())


def _shards(sharding: NamedSharding) -> int:
    """Distinct pieces a sharded array is cut into: the product of the mesh axes its partition spec names."""
    axes = [a for entry in sharding.spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)]
    return math.prod(sharding.mesh.shape[a] for a in axes)


def _per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard, per array)."""
    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
               for leaf in jax.tree.leaves(tree))


# ------------------------------------------------------------------------------------------------ the plan
@dataclasses.dataclass
class Plan:
    preset: str
    overrides: list[str]
    mesh: dict[str, int]
    devices: int
    mode: str                    # full, lora or qlora
    batch: int
    seq: int
    optimizer: str
    state_dtype: str
    param_dtype: str
    master_dtype: str            # the dtype the trained weights are held in (fp32 master weights by default)
    remat_policy: str
    moe_backend: str
    param_count: int
    bytes: dict[str, int]        # per device, from the abstract shapes and from the compiled memory analysis
    hand: dict[str, Any]         # the hand count, per device
    fits: dict[str, dict]
    collective_bytes: dict[str, int]  # per device and step, as lowered for TPU: parallel.collectives.KINDS
    lower_seconds: float         # lowering for this CPU and for TPU, and counting the collectives
    compile_seconds: float
    host_peak_rss_bytes: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PlanRequest:
    """What to plan: the model, the mesh spec, the global batch [batch, seq], the trainer's optimizer settings
    and, for LoRA and QLoRA, the adapters (None: full fine-tuning), over an NF4 base with `quantize` (QLoRA) or
    the model's own dtype (LoRA). `preset` and `overrides` only label the report."""

    config: MixtralConfig
    mesh: str
    batch: int
    seq: int
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    qlora: LoraConfig | None = None
    quantize: bool = True
    preset: str = ""
    overrides: tuple[str, ...] = ()

    def __post_init__(self):
        if self.batch <= 0 or self.seq <= 0:
            raise ValueError(f"--batch and --seq must be positive, got {self.batch} and {self.seq}")
        object.__setattr__(self, "overrides", tuple(self.overrides))

    @property
    def mode(self) -> str:
        return "full" if self.qlora is None else "qlora" if self.quantize else "lora"

    @property
    def state_dtype(self) -> str:
        """The dtype the optimizer's moments are kept in ('param' resolved to the parameters' dtype)."""
        state_dtype = self.optimizer.state_dtype
        return self.config.param_dtype if state_dtype == "param" else state_dtype

    @property
    def master_dtype(self) -> str:
        """The dtype the step holds the trained weights in: fp32 master weights, or the model's own."""
        held = jnp.dtype(master_dtype(self.optimizer) or self.config.param_dtype)
        return str(max(held, jnp.dtype(self.config.param_dtype), key=lambda d: d.itemsize))


class AbstractInputs(NamedTuple):
    """The train step's arguments as sharded ShapeDtypeStructs: nothing allocated, everything placed."""

    params: Any
    opt_state: Any
    batch: dict
    frozen: Any


def plan(request: PlanRequest, *, devices: Sequence[jax.Device] | None = None,
         progress: Callable[[str], None] | None = None) -> Plan:
    """Lowers and compiles the train step of `request` on its mesh over `devices` (default: as many CPU devices
    as the spec names), with the trainer's own optimizer, and returns its per-device memory figures and the
    collective bytes of a step as lowered for TPU."""
    config = request.config
    devices, mesh = _plan_mesh(request, devices)
    trainable = nnx.Param if request.qlora is None else LoRAParam
    # total_steps only shapes the learning-rate schedule, not the memory.
    tx = make_optimizer(request.optimizer, total_steps=1)

    def build(model_config: MixtralConfig) -> tuple[Mixtral, TrainStep]:
        model = _abstract_model(model_config, request.qlora, request.quantize)
        return model, make_train_step(model, tx, mesh, (request.batch, request.seq), trainable=trainable,
                                      master_dtype=master_dtype(request.optimizer))

    model, step = build(config)
    tpu_step = step if as_on_tpu(config) == config else build(as_on_tpu(config))[1]
    inputs = _abstract_inputs(model, trainable, tx, step, request)
    state_dtype = request.optimizer.state_dtype
    hand = (hand_count(config, inputs.params, inputs.batch, mesh, state_dtype, request.master_dtype)
            if request.qlora is None
            else qlora_hand_count(config, request.qlora, inputs.params, inputs.frozen, inputs.batch, state_dtype,
                                  request.quantize))
    if progress:
        progress(f"compiling the {request.preset or 'model'} train step for {len(devices)} simulated devices "
                 f"(mesh {_mesh_text(mesh)}, batch {request.batch} x {request.seq}); this can take a minute ...")
    memory, collectives, lower_seconds, compile_seconds = _compile(step, tpu_step, inputs)
    figures = _figures(inputs, memory)
    _compare_with_hand_count(hand, figures)
    return Plan(preset=request.preset, overrides=list(request.overrides), mesh=dict(mesh.shape), devices=len(devices),
                mode=request.mode, batch=request.batch, seq=request.seq, optimizer=OPTIMIZER, state_dtype=request.state_dtype,
                param_dtype=config.param_dtype, master_dtype=request.master_dtype,
                remat_policy=config.remat_policy, moe_backend=config.moe_backend,
                param_count=hand["param_count"], bytes=figures, hand=hand, fits=_fits(figures["total"]),
                collective_bytes=collectives,
                lower_seconds=round(lower_seconds, 3), compile_seconds=round(compile_seconds, 3),
                host_peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _plan_mesh(request: PlanRequest, devices: Sequence[jax.Device] | None) -> tuple[Sequence[jax.Device], Mesh]:
    """The devices (simulated CPU ones unless given) and the mesh over them; a batch the batch axes cannot
    split evenly is refused here, before anything is built."""
    if devices is None:
        count = mesh_device_count(request.mesh)
        devices = ensure_cpu_devices(count)
        if devices is None:
            raise MeshError(f"{count} simulated CPU devices are needed but jax started with "
                            f"{len(jax.devices('cpu'))}; set XLA_FLAGS={_DEVICE_COUNT_FLAG}={count}")
    mesh = make_mesh(request.mesh, devices=devices, config=request.config)
    batch_split(mesh.shape, request.batch, what="--batch", error=MeshError)  # the trainer's own check
    return devices, mesh


def _abstract_model(config: MixtralConfig, lora: LoraConfig | None, quantize: bool = True) -> Mixtral:
    """The model's shapes only, nothing allocated; with `lora`, adapters over the layers' linear weights, frozen
    in NF4 when `quantize`."""
    if lora is None:
        return nnx.eval_shape(lambda: Mixtral(config, rngs=nnx.Rngs(0)))
    if not quantize:
        return nnx.eval_shape(lambda: Mixtral(config, rngs=nnx.Rngs(0), lora=lora))
    return nnx.eval_shape(lambda: quantize_base(Mixtral(config, rngs=nnx.Rngs(0), lora=lora)))


def _abstract_inputs(model, trainable, tx: optax.GradientTransformation, step: TrainStep,
                     request: PlanRequest) -> AbstractInputs:
    _, abstract_params, abstract_frozen = nnx.split(model, trainable, ...)
    abstract_params = jax.eval_shape(lambda p: master_weights(p, master_dtype(request.optimizer)), abstract_params)

    def sharded(leaf, sharding):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    return AbstractInputs(
        params=jax.tree.map(sharded, abstract_params, step.param_shardings),
        opt_state=jax.tree.map(sharded, jax.eval_shape(tx.init, abstract_params), step.opt_shardings),
        batch={key: jax.ShapeDtypeStruct((request.batch, request.seq), jnp.int32, sharding=step.batch_shardings[key])
               for key in BATCH_KEYS},
        frozen=jax.tree.map(sharded, abstract_frozen, step.frozen_shardings))


def as_on_tpu(config: MixtralConfig) -> MixtralConfig:
    """`config` with the choices "auto" makes at trace time on TPU where they change the collectives: the
    expert exchange (on this CPU "auto" is the padded one, on TPU the ragged one)."""
    return config.replace(expert_exchange=expert_exchange_kind(config.expert_exchange, platform="tpu"))


def _compile(step: TrainStep, tpu_step: TrainStep, inputs: AbstractInputs):
    """(XLA's memory analysis of the compiled step, its collective bytes as lowered for TPU, seconds to lower
    and count, seconds to compile)."""
    args = (inputs.params, inputs.opt_state, inputs.batch, inputs.frozen, None)
    start = time.perf_counter()
    lowered = step.step.lower(*args)
    tpu_lowered = tpu_step.step.trace(*args).lower(lowering_platforms=("tpu",))
    lower_seconds = time.perf_counter() - start
    start = time.perf_counter()
    compiled, partitioned = compile_partitioned(lowered)
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    collectives = retarget(partitioned, lowered.as_text(dialect="hlo"), tpu_lowered.as_text(dialect="hlo"))
    lower_seconds += time.perf_counter() - start
    memory = compiled.memory_analysis()
    if memory is None:
        raise RuntimeError(f"the {jax.default_backend()} compiler gives no memory analysis")
    return memory, collectives, lower_seconds, compile_seconds


def _figures(inputs: AbstractInputs, memory) -> dict[str, int]:
    """Per-device bytes, from the abstract shapes and from the compiled memory analysis."""
    figures = {
        "params": _per_device(inputs.params),
        "frozen": _per_device(inputs.frozen),
        "optimizer": _per_device(inputs.opt_state),
        "batch": _per_device(inputs.batch),
        "arguments": int(memory.argument_size_in_bytes),
        "outputs": int(memory.output_size_in_bytes),
        "aliased": int(memory.alias_size_in_bytes),
        "temporaries": int(memory.temp_size_in_bytes),
        "generated_code": int(memory.generated_code_size_in_bytes),
    }
    # Donated parameters and optimizer state are written in place: an output that aliases an argument
    # needs no buffer of its own. Live at the peak: the arguments, the temporaries, the other outputs.
    figures["outputs_not_aliased"] = figures["outputs"] - figures["aliased"]
    figures["total"] = (figures["arguments"] + figures["temporaries"] + figures["outputs_not_aliased"]
                        + figures["generated_code"])
    return figures


def _compare_with_hand_count(hand: dict[str, Any], figures: dict[str, int]) -> None:
    """Records in `hand` how far the compiled arguments are from it, and whether that is within tolerance."""
    hand["compiled_arguments"] = figures["arguments"]
    hand["relative_difference"] = abs(figures["arguments"] - hand["arguments"]) / max(hand["arguments"], 1)
    hand["matches"] = (hand["relative_difference"] <= HAND_COUNT_TOLERANCE
                       and hand["params"] == figures["params"])


def _fits(total_bytes: int) -> dict[str, dict]:
    return {name: {"hbm_gib": hbm, "fits": total_bytes <= hbm * GiB,
                   "headroom_gib": round(hbm - total_bytes / GiB, 2)} for name, hbm in CHIPS}


def nf4_base_bytes(config: MixtralConfig, double_quant: bool = True) -> int:
    """Bytes of the layers' linear weights in NF4 as `quantize_base` stores them: 4 bits per value and per block
    of 64 an fp32 scale, or double-quantised (the default) an 8-bit code, plus per bitsandbytes tensor (a
    layer's slice of a weight, or one expert's matrix) an fp32 scale per 256 blocks and an fp32 offset."""
    total = 0
    for name, shape in param_shapes(config).items():
        if name.split(".")[-1] not in LINEAR_WEIGHTS:
            continue
        tensors = shape[0] * (shape[1] if is_expert(name) else 1)
        blocks = math.prod(shape) // tensors // BLOCK
        per_tensor = blocks * BLOCK // 2 + (blocks + 4 * -(-blocks // DQ_BLOCKSIZE) + 4 if double_quant else 4 * blocks)
        total += tensors * per_tensor
    return total


def qlora_hand_count(config: MixtralConfig, lora: LoraConfig, params, frozen, batch_in: Mapping,
                     state_dtype: str, quantize: bool = True) -> dict[str, Any]:
    """(Q)LoRA per device: adapters r (in + out) per targeted weight (per expert for w1, w2, w3) in the adapter
    dtype (fp32) with AdamW moments in `state_dtype`; the frozen NF4 weights as `nf4_base_bytes` counts them
    (~4.127 bits per parameter), or with `quantize` off in the parameter dtype; embeddings, LM head and norms in
    the parameter dtype. Divided by each array's shards."""
    d, f, e = config.hidden_size, config.intermediate_size, config.num_local_experts
    h, kv, hd, layers = (config.num_attention_heads, config.num_key_value_heads, config.resolved_head_dim,
                         config.num_hidden_layers)
    sizes = {"q_proj": (d, h * hd, 1), "k_proj": (d, kv * hd, 1), "v_proj": (d, kv * hd, 1),
             "o_proj": (h * hd, d, 1), "gate": (d, e, 1), "w1": (d, f, e), "w3": (d, f, e), "w2": (f, d, e)}
    adapter_count = sum(layers * copies * lora.rank * (n_in + n_out)
                        for name, (n_in, n_out, copies) in sizes.items() if name in lora.targets)
    param_bytes = jnp.dtype(config.param_dtype).itemsize
    adapter_bytes = jnp.dtype(lora.dtype).itemsize
    state_bytes = adapter_bytes if state_dtype == "param" else jnp.dtype(state_dtype).itemsize
    leaves = jax.tree.leaves(params)
    if sum(math.prod(leaf.shape) for leaf in leaves) != adapter_count:
        raise AssertionError("the model's adapters differ from the LoRA formula")
    adapter_elements = sum(math.prod(leaf.shape) // _shards(leaf.sharding) for leaf in leaves)
    shapes = param_shapes(config)
    quantised = {n: s for n, s in shapes.items() if n.split(".")[-1] in LINEAR_WEIGHTS}
    nf4_bytes = nf4_base_bytes(config) if quantize else sum(math.prod(s) for s in quantised.values()) * param_bytes
    other_bytes = sum(math.prod(s) for n, s in shapes.items() if n not in quantised) * param_bytes
    frozen_per_device = _per_device(frozen)  # its split follows the weights' rules, checked in the tests
    batch_shards = _shards(next(iter(batch_in.values())).sharding)
    batch_per_device = len(batch_in) * math.prod(next(iter(batch_in.values())).shape) * 4 // batch_shards
    return {"param_count": config_param_count(config), "adapter_count": adapter_count,
            "params": adapter_elements * adapter_bytes,
            "optimizer": 2 * adapter_elements * state_bytes + STEP_COUNT_BYTES,
            "frozen_total": nf4_bytes + other_bytes, "frozen": frozen_per_device, "batch": batch_per_device,
            "arguments": adapter_elements * adapter_bytes + 2 * adapter_elements * state_bytes + STEP_COUNT_BYTES
            + frozen_per_device + batch_per_device,
            "gradients": adapter_elements * adapter_bytes}


def hand_count(config: MixtralConfig, params, batch_in: Mapping, mesh: Mesh, state_dtype: str,
               held_dtype: str | None = None) -> dict[str, Any]:
    """Per-device bytes counted by hand: each parameter's size from the config formula, times the bytes of the
    dtype the step holds it in (`held_dtype`: fp32 master weights; default the model's), over the number of
    shards its partition spec cuts it into; AdamW's mu and nu alike in `state_dtype`, plus the step counts;
    the batch's three int32 [B, S] arrays over the batch axes."""
    shapes = param_shapes(config)
    flat = {".".join(str(p) for p in path): leaf for path, leaf in nnx.to_flat_state(params)}
    flat = {name: (leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf) for name, leaf in flat.items()}
    if set(flat) != set(shapes) or any(tuple(flat[n].shape) != shapes[n] for n in shapes):
        mismatched = sorted(n for n in set(flat) | set(shapes)
                            if n not in flat or n not in shapes or tuple(flat[n].shape) != shapes[n])
        raise AssertionError(f"the model's parameters differ from the config formula at {', '.join(mismatched)}")
    param_bytes = jnp.dtype(held_dtype or config.param_dtype).itemsize
    state_bytes = jnp.dtype(config.param_dtype).itemsize if state_dtype == "param" else \
        jnp.dtype(state_dtype).itemsize
    # The shipped rules only split a dimension over mesh axes that divide it, so these divisions are exact.
    per_device_elements = sum(math.prod(shape) // _shards(flat[name].sharding) for name, shape in shapes.items())
    params_per_device = per_device_elements * param_bytes
    optimizer_per_device = 2 * per_device_elements * state_bytes + STEP_COUNT_BYTES  # mu, nu; step counts
    batch_shards = _shards(next(iter(batch_in.values())).sharding)
    batch_per_device = len(batch_in) * math.prod(next(iter(batch_in.values())).shape) * 4 // batch_shards
    return {"param_count": config_param_count(config), "params": params_per_device,
            "optimizer": optimizer_per_device, "batch": batch_per_device, "frozen": 0,
            "arguments": params_per_device + optimizer_per_device + batch_per_device,
            "gradients": params_per_device}  # one per parameter, sharded alike: part of the temporaries


# ------------------------------------------------------------------------------------------------ report
def _mesh_text(mesh_or_sizes) -> str:
    sizes = dict(mesh_or_sizes.shape) if isinstance(mesh_or_sizes, Mesh) else mesh_or_sizes
    return ",".join(f"{axis}={sizes[axis]}" for axis in MESH_AXES)


def _gib(value: float) -> str:
    return f"{value / GiB:9.3f}"


def _count_text(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.2f}M"


def format_plan(p: Plan) -> str:
    b, h = p.bytes, p.hand
    lines = [
        f"plan: {p.preset or 'model'}{' ' + ' '.join(p.overrides) if p.overrides else ''}: "
        f"{_count_text(p.param_count)} parameters in {p.param_dtype} (trained in {p.master_dtype}), "
        f"{p.optimizer} with {p.state_dtype} mu and nu, "
        f"remat {p.remat_policy}, moe {p.moe_backend}; {p.mode}",
        f"mesh {_mesh_text(p.mesh)} on {p.devices} simulated devices; batch {p.batch} x {p.seq} tokens",
        f"lowered in {p.lower_seconds:.1f} s, compiled in {p.compile_seconds:.1f} s; "
        f"host peak RSS {p.host_peak_rss_bytes / GiB:.2f} GiB",
        "",
        "per device                      GiB    hand count",
        f"  parameters              {_gib(b['params'])}    {_gib(h['params'])}",
        f"  optimizer state         {_gib(b['optimizer'])}    {_gib(h['optimizer'])}",
        f"  frozen base             {_gib(b['frozen'])}    {_gib(h['frozen'])}",
        f"  batch                   {_gib(b['batch'])}    {_gib(h['batch'])}",
        f"  arguments (compiled)    {_gib(b['arguments'])}    {_gib(h['arguments'])}   "
        f"difference {100 * h['relative_difference']:.2f}% ({'ok' if h['matches'] else 'MISMATCH'})",
        f"  temporaries             {_gib(b['temporaries'])}    {_gib(h['gradients'])}   (the gradients alone)",
        f"  outputs not aliased     {_gib(b['outputs_not_aliased'])}   "
        f"(outputs {b['outputs'] / GiB:.2f}, aliased {b['aliased'] / GiB:.2f})",
        f"  total                   {_gib(b['total'])}    = arguments + temporaries + outputs not aliased",
        "",
        "chip        HBM GiB   fits   headroom GiB",
    ]
    for name, fit in p.fits.items():
        lines.append(f"  {name:<10}{fit['hbm_gib']:>7}   {'yes' if fit['fits'] else 'no ':<4}{fit['headroom_gib']:>12.2f}")
    lines.append("(temporaries are XLA:CPU's buffer assignment, which keeps many bf16 values in f32; a TPU or GPU "
                 "compile fuses and schedules differently)")
    lines += ["", "collectives per device and step, as lowered for TPU     GiB"]
    lines += [f"  {kind:<22}{_gib(count)}" for kind, count in p.collective_bytes.items()]
    return "\n".join(lines)


__all__ = ["CHIPS", "Plan", "PlanRequest", "as_on_tpu", "config_param_count", "ensure_cpu_devices", "format_plan",
           "hand_count", "nf4_base_bytes", "plan", "qlora_hand_count", "with_device_count"]
