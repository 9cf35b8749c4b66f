"""A pool of fixed-size KV blocks for one tier (GPU or host): free-list bookkeeping only."""

from __future__ import annotations

from collections import deque

from apex_grpc.request import Tier


class BlockPoolError(RuntimeError):
    """Blocks were over-allocated, double-freed, or the pool lost track of some."""


class BlockPool:
    def __init__(self, num_blocks: int, tier: Tier) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.tier = tier
        self.num_total = num_blocks
        # FIFO reuse spreads writes over the pool instead of hammering a few hot blocks.
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        if num_blocks > len(self._free):
            raise BlockPoolError(
                f"{self.tier.name} pool: asked for {num_blocks} blocks, {len(self._free)} free"
            )
        blocks = [self._free.popleft() for _ in range(num_blocks)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        for block in blocks:
            if block not in self._used:
                raise BlockPoolError(f"{self.tier.name} pool: block {block} freed twice")
            self._used.remove(block)
            self._free.append(block)

    def check_integrity(self) -> None:
        """free + used == total, with no block in both sets."""
        free = set(self._free)
        if len(free) != len(self._free) or free & self._used or \
                len(free) + len(self._used) != self.num_total:
            raise BlockPoolError(
                f"{self.tier.name} pool corrupt: {len(self._free)} free + {len(self._used)} used "
                f"!= {self.num_total} total"
            )
