"""The device mesh: axes `data` (batch) and `expert` (expert weights split on E; batch too, as in MaxText).

`make_mesh(data=N, expert=M)` builds it (-1: the devices left over; default: one device);
`parse_mesh("data=2,expert=4")` reads the `--mesh` flag's text into a `MeshConfig`, the training config's
`mesh` section, which `MeshConfig.make()` turns into a mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

AXES = ("data", "expert")


def resolve_mesh_shape(data: int, expert: int, num_devices: int) -> tuple[int, int]:
    """(data, expert) with one -1 replaced by the devices left over; raises if the shape does not fit."""
    for name, size in (("data", data), ("expert", expert)):
        if size == 0 or size < -1:
            raise ValueError(f"mesh axis {name}={size}: sizes must be positive, or -1 for the devices left over")
    if data == -1 and expert == -1:
        raise ValueError("mesh: at most one of data and expert may be -1")
    if data == -1 or expert == -1:
        known = expert if data == -1 else data
        if num_devices % known:
            raise ValueError(f"mesh: {num_devices} devices do not divide into axes of {known}")
        data, expert = (num_devices // known, expert) if data == -1 else (data, num_devices // known)
    if data * expert > num_devices:
        raise ValueError(f"mesh data={data} x expert={expert} needs {data * expert} devices, "
                         f"{num_devices} are available")
    return data, expert


def make_mesh(data: int = 1, expert: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh of data x expert devices (the first ones of `devices`, default `jax.devices()`).

    One of the sizes may be -1: the devices left over. The axes are Auto (XLA propagates shardings; an
    input sharded differently from a `shard_map`'s in_specs is resharded rather than refused).
    """
    devices = list(jax.devices() if devices is None else devices)
    data, expert = resolve_mesh_shape(data, expert, len(devices))
    grid = np.array(devices[:data * expert], dtype=object).reshape(data, expert)  # [data, expert]
    return Mesh(grid, AXES, axis_types=(AxisType.Auto, AxisType.Auto))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; -1 = the devices left over. The default is one device (no parallelism)."""

    data: int = 1
    expert: int = 1

    def __post_init__(self):
        for name in AXES:
            size = getattr(self, name)
            if not isinstance(size, int) or size == 0 or size < -1:
                raise ValueError(f"MeshConfig.{name} must be a positive int or -1, got {size!r}")
        if self.data == -1 and self.expert == -1:
            raise ValueError("MeshConfig: at most one of data and expert may be -1")

    def make(self, devices: Sequence[jax.Device] | None = None) -> Mesh:
        return make_mesh(self.data, self.expert, devices)


def parse_mesh(text: str | None) -> MeshConfig:
    """`--mesh` text -> MeshConfig: "data=2,expert=4", "expert=8", "data=-1,expert=2"; empty/None: one device."""
    sizes = {}
    for part in (text or "").replace(" ", "").split(","):
        if not part:
            continue
        name, eq, value = part.partition("=")
        if not eq or name not in AXES:
            raise ValueError(f"--mesh {text!r}: expected comma-separated NAME=SIZE with NAME in {list(AXES)}, "
                             f"got {part!r}")
        if name in sizes:
            raise ValueError(f"--mesh {text!r}: axis {name!r} given twice")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"--mesh {text!r}: size of {name!r} must be an integer, got {value!r}") from None
    return MeshConfig(**sizes)
