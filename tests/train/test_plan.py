"""`mixtral-jax plan`: compiled per-device memory of the train step on a simulated mesh, against a hand count."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import pytest
from flax import nnx

from mixtral_jax.cli.main import main
from mixtral_jax.config import MixtralConfig
from mixtral_jax.parallel.sharding import MeshError, mesh_device_count
from train.plan import config_param_count, nf4_base_bytes, with_device_count

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def hand_count_fsdp2_expert4(config: MixtralConfig) -> tuple[int, int]:
    """(parameter count, parameter elements per device) on data=1,fsdp=2,expert=4,tensor=1 with the shipped
    rules: the embedding dimension is split over fsdp (2), the experts over expert (4), norms replicated."""
    v, d, f, layers = config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers
    h, kv, hd, e = (config.num_attention_heads, config.num_key_value_heads, config.resolved_head_dim,
                    config.num_local_experts)
    embeddings = v * d + d * v                       # embed_tokens, lm_head: [*, embed/2]
    attention = layers * (d * h * hd + 2 * d * kv * hd + h * hd * d)  # q, k, v, o: embed/2
    router = layers * d * e                          # embed/2
    experts = layers * 3 * e * d * f                 # experts/4 x embed/2
    norms = layers * 2 * d + d                       # replicated
    count = embeddings + attention + router + experts + norms
    per_device = (embeddings + attention + router) // 2 + experts // 8 + norms
    return count, per_device


def run_plan_subprocess(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixtral_jax.cli", "plan", *argv], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


def check_against_hand_count(plan: dict, config: MixtralConfig, param_bytes: int) -> None:
    count, per_device = hand_count_fsdp2_expert4(config)
    assert plan["param_count"] == count == config_param_count(config)
    assert plan["bytes"]["params"] == plan["hand"]["params"] == per_device * param_bytes
    # AdamW: mu and nu in fp32, sharded like the parameters, and a scalar step count.
    assert 8 * per_device <= plan["bytes"]["optimizer"] <= 8 * per_device + 64
    assert plan["hand"]["optimizer"] == plan["bytes"]["optimizer"]
    arguments = plan["bytes"]["arguments"]
    assert abs(arguments - plan["hand"]["arguments"]) <= 0.03 * arguments and plan["hand"]["matches"]
    b = plan["bytes"]
    assert b["total"] == b["arguments"] + b["temporaries"] + b["outputs"] - b["aliased"] + b["generated_code"]
    assert b["temporaries"] > 0 and plan["compile_seconds"] > 0
    assert set(plan["fits"]) == {"TPU v4", "TPU v5e", "TPU v5p", "TPU v6e", "H100", "H200"}
    for fit in plan["fits"].values():
        assert fit["fits"] == (b["total"] <= fit["hbm_gib"] * 2**30)


@pytest.mark.slow
def test_tiny_plan_in_process_matches_the_hand_count(tmp_path, capsys):
    jax.devices()  # backends started here (8 simulated devices, conftest), so the plan uses them as they are
    out = tmp_path / "tiny.json"
    assert main(["plan", "--preset", "tiny", "--mesh", "fsdp=2,expert=4", "--batch", "8", "--seq", "128",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr()
    assert "parameters" in printed.out and "H100" in printed.out and "compiling" in printed.err
    plan = json.loads(out.read_text())
    assert plan["devices"] == 8 and plan["mesh"] == {"data": 1, "fsdp": 2, "expert": 4, "tensor": 1}
    check_against_hand_count(plan, MixtralConfig.from_preset("tiny"), param_bytes=4)
    assert plan["bytes"]["batch"] == 3 * 8 * 128 * 4 // 8
    assert set(plan["collective_bytes"]) == {"all-to-all", "all-gather", "reduce-scatter", "all-reduce"}
    assert "collectives per device and step, as lowered for TPU" in printed.out


@pytest.mark.slow
def test_mixtral_8x7b_plans_on_eight_simulated_devices(tmp_path):
    out = tmp_path / "8x7b.json"
    result = run_plan_subprocess("--preset", "mixtral-8x7b", "--mesh", "data=1,fsdp=2,expert=4,tensor=1",
                                 "--batch", "8", "--seq", "1024", "--json", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    plan = json.loads(out.read_text())
    config = MixtralConfig.from_preset("mixtral-8x7b")
    assert plan["devices"] == 8 and plan["param_dtype"] == "bfloat16" and plan["remat_policy"] == "full"
    assert 46.6e9 < plan["param_count"] < 46.8e9  # Mixtral-8x7B's 46.7B
    assert plan["master_dtype"] == "float32"  # bf16 compute, the trained weights held as fp32 masters
    check_against_hand_count(plan, config, param_bytes=4)
    assert plan["bytes"]["params"] / 2**30 == pytest.approx(24.0, abs=0.1)   # 186.8 GB of fp32 over 8, ~2x
    assert not plan["fits"]["H100"]["fits"]  # full AdamW fine-tuning needs more than 8 x 80 GB


@pytest.mark.slow
def test_qlora_plan_of_mixtral_8x7b_counts_adapters_and_the_nf4_base(tmp_path):
    out = tmp_path / "qlora.json"
    result = run_plan_subprocess("--preset", "mixtral-8x7b", "--mesh", "fsdp=2,expert=4", "--batch", "8",
                                 "--seq", "1024", "--qlora", "--json", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    plan = json.loads(out.read_text())
    hand, b = plan["hand"], plan["bytes"]
    assert hand["matches"] and b["params"] == hand["params"] and b["frozen"] == hand["frozen"]
    # r 64 on q, k, v, o, router and every expert's w1, w2, w3: 0.97B adapter parameters, 2.1% of the model.
    assert 0.96e9 < hand["adapter_count"] < 0.98e9
    # The NF4 base: ~4.127 bits (bitsandbytes' double quantisation) for the layers' linear weights (46.4B), bf16
    # embeddings and LM head: 24.5 GB (plain NF4's 4.5 bits: 26.6 GB).
    assert hand["frozen_total"] == nf4_base_bytes(MixtralConfig.from_preset("mixtral-8x7b")) + 2 * 2 * 32000 * 4096 \
        + 2 * (2 * 32 + 1) * 4096
    assert 24.4e9 < hand["frozen_total"] < 24.6e9
    assert b["optimizer"] == 2 * b["params"] + 8  # fp32 moments of fp32 adapters; Adam's and the schedule's counts
    assert plan["fits"]["TPU v5e"]["fits"]  # QLoRA of Mixtral-8x7B fits eight 16 GB chips


@pytest.mark.slow
def test_plan_counts_the_state_of_the_optimizer_train_steps_with(monkeypatch):
    """One factory, train.optim.make_optimizer: the trainer and the plan both build their optimizer with it, so
    the plan counts what a run holds (here bf16 moments of fp32 parameters, asked for by optimizer.state_dtype)."""
    from train import loop, optim
    from train import plan as plan_module
    from train.config import OptimizerConfig

    assert loop.make_optimizer is optim.make_optimizer and plan_module.make_optimizer is optim.make_optimizer
    calls = []

    def recording(config, total_steps):
        calls.append(config)
        return optim.make_optimizer(config, total_steps)

    monkeypatch.setattr(plan_module, "make_optimizer", recording)
    jax.devices()
    request = plan_module.PlanRequest(MixtralConfig.from_preset("tiny"), "fsdp=2", 2, 16,
                                      optimizer=OptimizerConfig(state_dtype="bfloat16"))
    result = plan_module.plan(request, devices=jax.devices("cpu")[:2])
    assert calls == [request.optimizer] and result.state_dtype == "bfloat16" and result.optimizer == "adamw"
    # mu and nu in bf16 are together the fp32 parameters' bytes; plus the two int32 step counts.
    assert result.bytes["optimizer"] == result.hand["optimizer"] == result.bytes["params"] + 8


def test_qlora_hand_count_counts_the_double_quantised_nf4_base():
    """The frozen NF4 weights the plan compiles with are quantize_base's (double-quantised): nf4_base_bytes,
    the hand count's figure, is their size exactly."""
    from mixtral_jax.model.lora import LoraConfig
    from mixtral_jax.quantization.nf4_weight import NF4Weight
    from train.plan import _abstract_model

    config = MixtralConfig.from_preset("tiny")
    model = _abstract_model(config, LoraConfig())
    weights = [v.get_value() for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)
               and isinstance(v.get_value(), NF4Weight)]
    assert weights and all(w.double_quant for w in weights)
    assert sum(w.nbytes for w in weights) == nf4_base_bytes(config) < nf4_base_bytes(config, double_quant=False)


def test_plan_request_refuses_an_empty_batch():
    from train.plan import PlanRequest

    with pytest.raises(ValueError, match="--batch and --seq must be positive"):
        PlanRequest(MixtralConfig.from_preset("tiny"), "fsdp=2", 0, 16)


@pytest.mark.slow
def test_plan_reruns_itself_when_jax_started_with_too_few_devices(tmp_path):
    assert len(jax.devices()) < 16  # started by conftest with 8
    out = tmp_path / "p.json"
    assert main(["plan", "--preset", "tiny", "--mesh", "fsdp=16", "--batch", "16", "--seq", "32",
                 "--json", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert plan["devices"] == 16 and plan["mesh"]["fsdp"] == 16 and plan["hand"]["matches"]


@pytest.mark.slow
@pytest.mark.parametrize("mesh, words", [("fsdp=2,expert=3", "must divide num_local_experts"),
                                         ("fsdp=2,pipeline=4", "is not axis=size"),
                                         ("fsdp=-1", "--devices")])
def test_bad_mesh_is_exit_code_2_and_one_line(mesh, words):
    result = run_plan_subprocess("--preset", "mixtral-8x7b", "--mesh", mesh)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and lines[0].startswith("mixtral-jax plan: error:"), result.stderr


def test_batch_not_divisible_by_the_batch_axes_is_refused(capsys):
    jax.devices()
    assert main(["plan", "--preset", "tiny", "--mesh", "data=2,fsdp=4", "--batch", "6", "--seq", "16"]) == 2
    assert "not divisible by data x fsdp x expert = 8" in capsys.readouterr().err


def test_device_count_helpers():
    assert mesh_device_count("data=1,fsdp=2,expert=4,tensor=1") == 8
    assert mesh_device_count("fsdp=-1,expert=4", devices=32) == 32
    with pytest.raises(MeshError, match="--devices"):
        mesh_device_count("fsdp=-1")
    with pytest.raises(MeshError):
        mesh_device_count("fsdp=2,expert=4", devices=6)
    assert with_device_count("--xla_foo=1 --xla_force_host_platform_device_count=8", 64) == \
        "--xla_foo=1 --xla_force_host_platform_device_count=64"
    assert with_device_count("", 4) == "--xla_force_host_platform_device_count=4"


# The tiny model with a small vocabulary, so that the layers' weights, not the embeddings, make the traffic.
SMALL_VOCAB = {"vocab_size": 512}


def small_plan(mesh: str, devices: int, **overrides):
    from train.plan import PlanRequest, plan

    config = MixtralConfig.from_preset("tiny", {**SMALL_VOCAB, **overrides})
    return config, plan(PlanRequest(config, mesh, 8, 32), devices=jax.devices("cpu")[:devices])


@pytest.mark.slow
def test_fsdp_gathers_the_weights_and_scatters_their_gradients():
    """fsdp=8 splits every weight (the experts over their embedding dimension too, which shard_map gathers):
    each is all-gathered for the forward and again for the backward, and its gradient, as large as the
    parameters, is reduce-scattered; only scalars (the loss, the gradient norm) are all-reduced."""
    config, result = small_plan("fsdp=8", 8)
    parameters = config_param_count(config) * 4
    traffic = result.collective_bytes
    assert parameters <= traffic["all-gather"] <= 3 * parameters
    assert 0.9 * parameters <= traffic["reduce-scatter"] <= 2 * parameters
    assert traffic["all-reduce"] < 1e-3 * parameters


@pytest.mark.slow
def test_expert_parallel_exchanges_rows_as_a_tpu_would():
    """expert=8 as lowered for TPU: "auto" is the ragged exchange there, which moves each device's real rows
    (batch x seq / 8 tokens x top-2, 64 fp32 each) four times per layer (to the experts and back, forward and
    backward), plus the row counts; the CPU program's padded exchange would move 8 times that."""
    config, result = small_plan("expert=8", 8)
    rows = 8 * 32 // 8 * config.num_experts_per_tok
    exchanged = config.num_hidden_layers * 4 * rows * config.hidden_size * 4
    assert exchanged <= result.collective_bytes["all-to-all"] <= exchanged + 1024


@pytest.mark.slow
def test_one_device_has_no_collectives():
    _, result = small_plan("fsdp=1", 1)
    assert result.collective_bytes == {"all-to-all": 0, "all-gather": 0, "reduce-scatter": 0, "all-reduce": 0}


def test_the_tpu_lowering_takes_the_ragged_exchange_auto_picks_there():
    from train.plan import as_on_tpu

    auto = MixtralConfig.from_preset("tiny")
    assert auto.expert_exchange == "auto" and as_on_tpu(auto).expert_exchange == "ragged"
    padded = auto.replace(expert_exchange="padded")
    assert as_on_tpu(padded) == padded


@pytest.mark.slow
def test_lora_plan_holds_the_base_in_its_own_dtype_beside_the_adapters():
    """--lora: the QLoRA plan's adapters over the unquantised base, whose frozen bytes are its own dtype's."""
    from mixtral_jax.checkpoints.name_map import param_shapes
    from mixtral_jax.model.lora import LoraConfig
    from mixtral_jax.model.targets import LINEAR_WEIGHTS
    from train import plan as plan_module

    jax.devices()
    config = MixtralConfig.from_preset("tiny")
    plans = {quantize: plan_module.plan(plan_module.PlanRequest(config, "fsdp=2", 2, 16, qlora=LoraConfig(rank=4),
                                                                quantize=quantize),
                                        devices=jax.devices("cpu")[:2]) for quantize in (False, True)}
    lora, qlora = plans[False], plans[True]
    assert (lora.mode, qlora.mode) == ("lora", "qlora")
    assert lora.hand["matches"] and lora.bytes["frozen"] == lora.hand["frozen"]
    itemsize = jax.numpy.dtype(config.param_dtype).itemsize
    assert lora.hand["frozen_total"] == itemsize * sum(math.prod(s) for s in param_shapes(config).values())
    linear = sum(math.prod(s) for n, s in param_shapes(config).items() if n.split(".")[-1] in LINEAR_WEIGHTS)
    assert lora.bytes["params"] == qlora.bytes["params"]  # the same adapters; only the base's bytes differ
    assert lora.hand["frozen_total"] - qlora.hand["frozen_total"] == itemsize * linear - nf4_base_bytes(config)
