"""The block manager: hands out fixed-size cache blocks to sequences, counts references, and keeps
a prefix cache of full blocks keyed by their token ids chained with the previous block's hash (the
first block's with the request's cache_salt, if it has one).
It knows nothing about what a block holds. Pure Python (no torch).

Freed blocks keep their hash and stay reusable until they are handed out again; the free queue
gives out the least recently freed block first, and a sequence frees its blocks tail first, so
shared prefixes outlive the tails that follow them.
"""

from __future__ import annotations

from collections import OrderedDict

from .sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


def chain_hash(prev_hash: int | None, token_ids) -> int:
    return hash((prev_hash, tuple(token_ids)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found

    # ---- state ----------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache -----------------------------------------------------------------------------
    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding the longest cached run of seq's full blocks, leaving at least one token
        to compute (the step must produce logits for the last token)."""
        if not self.enable_prefix_caching:
            return []
        hits, prev = [], seq.sampling_params.cache_salt  # a salted prefix is found only with the same salt
        tokens = seq.token_ids
        for b in range((len(tokens) - 1) // self.block_size):
            chunk = tuple(tokens[b * self.block_size:(b + 1) * self.block_size])
            h = chain_hash(prev, chunk)
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != chunk:
                break
            hits.append(block_id)
            prev = h
        return hits

    def can_admit(self, seq: Sequence, hits: list[int], num_new_tokens: int) -> bool:
        """Whether seq (with no blocks yet) can take its cached prefix `hits` and num_new_tokens more."""
        reused_free = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        needed = self.blocks_needed(len(hits) * self.block_size + num_new_tokens) - len(hits)
        return needed + reused_free <= self.num_free_blocks

    def admit(self, seq: Sequence, hits: list[int], count_query: bool = True) -> None:
        """Give seq its cached prefix blocks; their tokens count as computed."""
        assert not seq.block_table, "admit() is for sequences without blocks"
        for b in hits:
            block = self.blocks[b]
            if block.ref_count == 0:
                del self.free_queue[b]
            block.ref_count += 1
            seq.block_table.append(b)
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_hashed_blocks = len(hits)
        seq.num_cached_prompt_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
        if count_query:
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += seq.num_computed_tokens

    # ---- allocation -------------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return needed <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Make room in seq's block table for num_new_tokens more tokens."""
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if needed > self.num_free_blocks:
            raise RuntimeError("out of cache blocks: check can_allocate() first")
        for _ in range(needed):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None and self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]  # evicted from the prefix cache
            block.hash, block.token_ids, block.ref_count = None, (), 1
            seq.block_table.append(block_id)

    def commit(self, seq: Sequence, num_computed_tokens: int | None = None) -> None:
        """Register seq's newly completed full blocks in the prefix cache: those of its first
        num_computed_tokens positions (by default the ones computed so far)."""
        if not self.enable_prefix_caching:
            return
        computed = seq.num_computed_tokens if num_computed_tokens is None else num_computed_tokens
        full = min(computed // self.block_size, len(seq.block_table))
        for b in range(seq.num_hashed_blocks, full):
            prev = self.blocks[seq.block_table[b - 1]].hash if b else seq.sampling_params.cache_salt
            block = self.blocks[seq.block_table[b]]
            if block.hash is None:
                chunk = tuple(seq.tokens_slice(b * self.block_size, (b + 1) * self.block_size))
                block.hash, block.token_ids = chain_hash(prev, chunk), chunk
                self.cached.setdefault(block.hash, block.block_id)
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
        seq.block_table = []
        seq.num_hashed_blocks = 0
