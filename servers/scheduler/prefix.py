"""Prefix sharing: which KV blocks a sequence can take from the block cache instead of
computing them, and which blocks it names there once computed.

Lives in the scheduler process, used by Scheduler when its BlockSource is a CachedBlocks.
Pure: no I/O. A block is named by the chained hash of every token up to its end
(libllm.blockhash), so a name means a prefix and, with batch-invariant kernels, the very
same KV bits. Only full blocks are named, and a sequence never takes the block holding its
last token (it needs that token's logits), so a shared block is only ever read.
"""

from __future__ import annotations

from llmos.libllm.blockhash import ROOT_HASH, block_name
from llmos.servers.scheduler.block_cache import CachedBlocks
from llmos.servers.scheduler.sequence import Sequence


class PrefixSharing:
    """The block cache seen from the sequences, plus the prompt blocks being computed now:
    a sequence whose next uncached block another running sequence is computing waits for
    it (n choices of one prompt, or requests with one system prompt, arriving together)
    instead of computing it a second time."""

    __slots__ = ("_block_size", "_cache", "_computing")

    def __init__(self, cache: CachedBlocks, block_tokens: int) -> None:
        self._cache = cache
        self._block_size = block_tokens
        self._computing: dict[int, Sequence] = {}  # block name -> the sequence computing it

    def names(self, seq: Sequence, num_blocks: int) -> list[int]:
        """The names of ``seq``'s first ``num_blocks`` full blocks (each computed once)."""
        names, bs = seq.block_hashes, self._block_size
        while len(names) < num_blocks:
            i = len(names)
            parent = names[-1] if names else ROOT_HASH
            names.append(block_name(parent, seq.token_slice(i * bs, (i + 1) * bs)))
        return names[:num_blocks]

    def reuse(self, seq: Sequence) -> bool:
        """Give ``seq`` (holding no KV) the cached blocks of its longest prefix: they become
        its first blocks, computed. False, giving nothing, when it should wait for a block
        another sequence is computing now."""
        num_blocks = (seq.num_tokens - 1) // self._block_size
        if num_blocks == 0:
            return True
        names = self.names(seq, num_blocks)
        found = self._cache.match(names)
        if len(found) < num_blocks:
            computing = self._computing.get(names[len(found)])
            if computing is not None and computing is not seq and not computing.is_paused:
                self._cache.free(found)
                return False
        seq.block_table = found
        seq.num_published = len(found)
        seq.num_computed = len(found) * self._block_size
        return True

    def expect(self, seq: Sequence) -> None:
        """``seq`` was admitted: the prompt blocks it will compute are its to compute."""
        prompt_blocks = (seq.num_prompt_tokens - 1) // self._block_size
        for name in self.names(seq, prompt_blocks)[seq.num_published :]:
            self._computing.setdefault(name, seq)

    def publish(self, seq: Sequence) -> None:
        """Name the full blocks whose KV ``seq`` has computed, for later requests."""
        num_full = min(seq.num_computed, seq.num_tokens) // self._block_size
        if num_full <= seq.num_published:
            return
        names = self.names(seq, num_full)
        for i in range(seq.num_published, num_full):
            self._cache.publish(seq.block_table[i], names[i])
            if self._computing.get(names[i]) is seq:
                del self._computing[names[i]]
        seq.num_published = num_full

    def release(self, seq: Sequence) -> None:
        """``seq`` lets its blocks go (finished or preempted): what it computed stays named,
        and it computes nothing more for others."""
        if seq.block_table:
            self.publish(seq)
        for name in [n for n, s in self._computing.items() if s is seq]:
            del self._computing[name]
