"""Per-request block tables over the two tiers; each request's KV lives in exactly one tier.

The scheduler asks this manager for room and for whole-request moves; the runner performs the
copies that a move describes. Nothing here touches tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

from apex_grpc.kv_cache.block_pool import BlockPool
from apex_grpc.request import Tier


@dataclass(frozen=True)
class KVMove:
    """Copy a request's blocks from one tier to another (same order, all layers)."""

    request_id: str
    src_tier: Tier
    dst_tier: Tier
    src_blocks: tuple[int, ...]
    dst_blocks: tuple[int, ...]


class KVCacheManager:
    def __init__(self, block_size: int, num_gpu_blocks: int, num_host_blocks: int) -> None:
        self.block_size = block_size
        self.pools = {Tier.GPU: BlockPool(num_gpu_blocks, Tier.GPU),
                      Tier.HOST: BlockPool(num_host_blocks, Tier.HOST)}
        self._tables: dict[str, list[int]] = {}
        self._tiers: dict[str, Tier] = {}

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def tier_of(self, request_id: str) -> Tier | None:
        return self._tiers.get(request_id)

    def num_new_blocks(self, request_id: str, total_tokens: int) -> int:
        """Blocks to add so the request's table covers total_tokens tokens."""
        return max(0, self.blocks_for_tokens(total_tokens) - len(self.block_table(request_id)))

    def can_grow(self, request_id: str, tier: Tier, total_tokens: int) -> bool:
        return self.pools[tier].can_allocate(self.num_new_blocks(request_id, total_tokens))

    def grow(self, request_id: str, tier: Tier, total_tokens: int) -> None:
        """Extend (or create) the request's table in `tier` to cover total_tokens tokens."""
        current = self._tiers.setdefault(request_id, tier)
        if current != tier:
            raise ValueError(f"request {request_id} lives in {current.name}, not {tier.name}")
        needed = self.num_new_blocks(request_id, total_tokens)
        self._tables.setdefault(request_id, []).extend(self.pools[tier].allocate(needed))

    def free(self, request_id: str) -> None:
        """Release every block of the request (idempotent)."""
        tier = self._tiers.pop(request_id, None)
        blocks = self._tables.pop(request_id, [])
        if tier is not None:
            self.pools[tier].free(blocks)

    def can_move(self, request_id: str, dst_tier: Tier) -> bool:
        return self.pools[dst_tier].can_allocate(len(self.block_table(request_id)))

    def move(self, request_id: str, dst_tier: Tier) -> KVMove:
        """Re-home the request in dst_tier. The source blocks return to their pool now: the
        runner copies them before this step's forward pass writes anything."""
        src_tier = self._tiers[request_id]
        src_blocks = self._tables[request_id]
        dst_blocks = self.pools[dst_tier].allocate(len(src_blocks))
        self.pools[src_tier].free(src_blocks)
        self._tables[request_id] = dst_blocks
        self._tiers[request_id] = dst_tier
        return KVMove(request_id, src_tier, dst_tier, tuple(src_blocks), tuple(dst_blocks))

    def used_blocks(self, tier: Tier) -> int:
        return self.pools[tier].num_used

    def total_blocks(self, tier: Tier) -> int:
        return self.pools[tier].num_total

    def check_integrity(self) -> None:
        for pool in self.pools.values():
            pool.check_integrity()
        for tier, pool in self.pools.items():
            owned = sum(len(t) for rid, t in self._tables.items() if self._tiers[rid] == tier)
            if owned != pool.num_used:
                raise RuntimeError(
                    f"{tier.name}: block tables own {owned} blocks, pool says {pool.num_used} used"
                )
