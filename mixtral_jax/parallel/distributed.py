"""Multi-host runs: one process per host, each reading its own share of the global batch."""

from __future__ import annotations

import os
from typing import Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids=None) -> bool:
    """`jax.distributed.initialize` when this is one process of several, a no-op on a single host.

    Several processes are recognised by explicit arguments, by `JAX_COORDINATOR_ADDRESS` (with
    `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`, which JAX itself does not read, so that a launcher can start
    `mixtral-jax train` on each host with environment variables alone), or by a TPU pod's worker list
    (`TPU_WORKER_HOSTNAMES` with more than one host, where JAX finds the rest itself). On CPU the collectives
    go through gloo. Returns whether the distributed runtime was started.
    """
    explicit = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if not explicit and not pod and (num_processes or 1) == 1:
        return False
    if jax.config.jax_platforms in (None, "", "cpu") and not pod:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)
    return True


def host_rows(global_batch: int, process_index: int | None = None, process_count: int | None = None) -> slice:
    """The rows of a global batch this host reads: contiguous, disjoint, together the whole batch."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if global_batch % count:
        raise ValueError(f"global batch {global_batch} is not divisible by the {count} hosts")
    per_host = global_batch // count
    return slice(index * per_host, (index + 1) * per_host)


def global_batch(local: Mapping[str, np.ndarray], shardings: Mapping[str, NamedSharding],
                 global_rows: int) -> dict[str, jax.Array]:
    """Assembles each host's rows (from `host_rows`) into global arrays split over the mesh."""
    return {key: jax.make_array_from_process_local_data(shardings[key], np.asarray(value),
                                                        (global_rows, *np.shape(value)[1:]))
            for key, value in local.items()}
