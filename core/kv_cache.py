"""The paged KV cache's bookkeeping: a block pool with ref counts, an O(1) LRU free list,
per-request block tables and automatic prefix caching by hash chains over full blocks.

Only block ids live here; the tensors are owned by the model runner. A full block's hash is
hash((parent block's hash, its tokens)), so equal hashes mean equal whole prefixes. Freed blocks
keep their hash and stay findable until the LRU list hands them out again.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from loom.request import Request


@dataclass
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool):
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Free blocks in eviction order (front first). OrderedDict gives O(1) removal of a
        # cached block that gets reused from the middle of the list.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}          # block hash -> block id
        self.enable_caching = enable_caching

    @property
    def num_free(self) -> int:
        return len(self.free)

    def lookup(self, block_hash: int) -> int | None:
        return self.cached.get(block_hash)

    def touch(self, block_ids: list[int]) -> None:
        """Take a reference to cached blocks (prefix hits), pulling free ones off the LRU list."""
        for bid in block_ids:
            block = self.blocks[bid]
            if block.ref_cnt == 0:
                del self.free[bid]
            block.ref_cnt += 1

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError(f"cannot allocate {n} KV blocks, {len(self.free)} free")
        out = []
        for _ in range(n):
            bid, _ = self.free.popitem(last=False)
            block = self.blocks[bid]
            if block.block_hash is not None:          # evict its cached content
                if self.cached.get(block.block_hash) == bid:
                    del self.cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(bid)
        return out

    def release(self, block_ids) -> None:
        """Drop one reference each; blocks reaching zero join the back of the LRU list in the
        order given (callers pass a request's blocks tail first, so tails are evicted first)."""
        for bid in block_ids:
            block = self.blocks[bid]
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is None:
                    self.free[bid] = None
                    self.free.move_to_end(bid, last=False)  # nothing cached: reuse first
                else:
                    self.free[bid] = None

    def cache(self, block_id: int, block_hash: int) -> None:
        if block_hash in self.cached:
            return                       # the same content already lives in another block
        self.cached[block_hash] = block_id
        self.blocks[block_id].block_hash = block_hash


class KVCacheManager:
    """Block tables of running requests over one BlockPool."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.req_blocks: dict[str, list[int]] = {}
        self.num_cached_blocks: dict[str, int] = {}   # blocks of a request already hashed in
        self.prefix_queries = 0                       # prompt tokens looked up
        self.prefix_hits = 0                          # of which found in the cache

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        """Share of blocks held by running requests (cached-but-free blocks count as free)."""
        return 1.0 - self.pool.num_free / self.num_blocks if self.num_blocks else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _hash_full_blocks(self, request: Request, num_blocks: int) -> None:
        hashes = request.block_hashes
        bs = self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash((parent, tuple(request.token_slice(i * bs, (i + 1) * bs)))))

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest cached prefix of a request about to be (re)admitted: its blocks and
        length in tokens. The last token is always recomputed, since its logits are needed."""
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        self._hash_full_blocks(request, max_blocks)
        hits = []
        for block_hash in request.block_hashes[:max_blocks]:
            bid = self.pool.lookup(block_hash)
            if bid is None:
                break
            hits.append(bid)
        self.prefix_queries += request.num_tokens
        self.prefix_hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[int] | None = None,
                       num_lookahead_tokens: int = 0) -> list[int] | None:
        """Grow the request's block table to hold its computed tokens, the prefix hits, the
        ``num_new_tokens`` of this step and lookahead slots. Returns the blocks appended to its
        table (hits first), or None (and changes nothing) if the pool is short."""
        computed_blocks = computed_blocks or []
        blocks = self.req_blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        needed = self.blocks_needed(num_computed + num_new_tokens + num_lookahead_tokens)
        num_alloc = needed - len(blocks) - len(computed_blocks)
        # Hits sitting on the free list stop being free once touched.
        reclaimed = sum(1 for b in computed_blocks if self.pool.blocks[b].ref_cnt == 0)
        if num_alloc > self.pool.num_free - reclaimed:
            if not blocks:
                del self.req_blocks[request.request_id]
            return None
        self.pool.touch(computed_blocks)
        new_blocks = computed_blocks + self.pool.allocate(max(num_alloc, 0))
        blocks.extend(new_blocks)
        if computed_blocks:                      # only at admission: the table was empty
            self.num_cached_blocks[request.request_id] = len(computed_blocks)
        return new_blocks

    def cache_blocks(self, request: Request) -> None:
        """Make the request's full, computed blocks findable by later requests."""
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        # Only known tokens: a position computed from a token still on the device waits.
        num_full = min(request.num_computed_tokens, request.num_tokens) // self.block_size
        done = self.num_cached_blocks.get(rid, 0)
        if num_full <= done:
            return
        self._hash_full_blocks(request, num_full)
        blocks = self.req_blocks[rid]
        for i in range(done, num_full):
            self.pool.cache(blocks[i], request.block_hashes[i])
        self.num_cached_blocks[rid] = num_full

    def free_tail(self, request: Request, num_tokens: int) -> None:
        """Free the request's blocks past its first ``num_tokens`` tokens (the lookahead and
        rejected-draft slots of speculative decoding); they hold nothing cached."""
        blocks = self.req_blocks.get(request.request_id)
        keep = self.blocks_needed(num_tokens)
        if blocks and len(blocks) > keep:
            tail = blocks[keep:]
            del blocks[keep:]
            self.pool.release(reversed(tail))

    def free(self, request: Request) -> None:
        blocks = self.req_blocks.pop(request.request_id, None)
        self.num_cached_blocks.pop(request.request_id, None)
        if blocks:
            self.pool.release(reversed(blocks))

    def block_ids(self, request_id: str) -> list[int]:
        return self.req_blocks.get(request_id, [])
