"""A method's own random stream: the same draws in one process and on every data-parallel rank.

Randomised methods (``rlw``, ``graddrop``, ``gradvac``) call torchjd, which draws from torch's
global generators. Those differ between ranks (each rank seeds its own data order, dropout, ...)
and move with everything else the run draws, so the method runs its draws inside
``torch.random.fork_rng`` on a generator state of its own:

- seeded at construction from ``torch.initial_seed()`` mixed with the method's name (a run seeded
  with ``torch.manual_seed(s)`` gets a stream that depends on ``s`` but not on what else drew);
- under torch.distributed the first draw replaces every rank's seed by rank 0's (one all-reduce of
  one float64: rank 0 contributes ``seed * world``, the others 0), so every rank, and one process
  seeded like rank 0, draws the same numbers;
- saved in the method's ``state_dict`` (a resumed run continues the stream exactly).

The global generators are left exactly as they were.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from routesurgeon import distributed as rsdist

__all__ = ["OwnRandomStream"]

_MASK = (1 << 52) - 1  # seeds travel through a float64 all-reduce: exact below 2**53


class OwnRandomStream:
    """Generator states (CPU and, when used, each CUDA device) that only ``draws`` advances."""

    def __init__(self, name: str) -> None:
        self.seed = (torch.initial_seed() * 0x9E3779B1 + zlib.crc32(name.encode())) & _MASK
        self.states: dict[str, Tensor] = {}
        self.synced = False

    def sync(self, reducer: Callable[[Sequence[Tensor]], None] | None) -> None:
        """Take rank 0's seed (a no-op in one process, or once synchronised)."""
        if self.synced or reducer is None:
            return
        if self.states:
            raise RuntimeError("the method's random stream was used before its seed was "
                               "synchronised over the data-parallel ranks")
        mine = float(self.seed * rsdist.world_size()) if rsdist.rank() == 0 else 0.0
        value = torch.tensor([mine], dtype=torch.float64)
        reducer([value])
        self.seed = int(value.item())
        self.synced = True

    @contextlib.contextmanager
    def draws(self, device: torch.device,
              reducer: Callable[[Sequence[Tensor]], None] | None = None) -> Iterator[None]:
        """Run the body's draws (on the CPU and on ``device``) from this stream."""
        self.sync(reducer)
        cuda = device.type == "cuda"
        index = 0
        if cuda:
            index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index] if cuda else [], device_type="cuda"):
            self._enter("cpu", torch.default_generator)
            if cuda:
                self._enter(f"cuda:{index}", torch.cuda.default_generators[index])
            yield
            self.states["cpu"] = torch.default_generator.get_state()
            if cuda:
                key = f"cuda:{index}"
                self.states[key] = torch.cuda.default_generators[index].get_state()

    def _enter(self, key: str, gen: torch.Generator) -> None:
        state = self.states.get(key)
        if state is None:
            gen.manual_seed(self.seed)
        else:
            gen.set_state(state)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "synced": self.synced,
                "states": {k: v.clone() for k, v in self.states.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # one file for every rank (rank 0's): the restored stream is already common to all
        self.seed = int(state["seed"])
        self.states = {k: v.clone() for k, v in state["states"].items()}
        self.synced = True
