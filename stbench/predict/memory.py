"""Replays a step's allocation sequence through a model of the CUDA caching allocator, or of glibc malloc (CPU).

Constants and rules follow c10/cuda/CUDACachingAllocator.cpp (PyTorch 2.x, default settings, one stream):
requests round up to 512 bytes; requests up to 1 MiB come from the small pool, carved out of 2 MiB segments;
larger ones from the large pool, whose segments are 20 MiB for requests under 10 MiB and otherwise the request
rounded up to 2 MiB. A request takes the best-fitting cached free block of its pool (smallest size, then lowest
address) and splits it when the remainder is at least 512 bytes (small pool) or more than 1 MiB (large pool);
freed blocks merge with free neighbours of their segment. When a new segment would not fit in the device, the
allocator first returns its wholly free cached segments to the driver and retries; only then is it out of memory.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

MIN_BLOCK = 512
SMALL_SIZE = 1 << 20
SMALL_BUFFER = 2 << 20
MIN_LARGE_ALLOC = 10 << 20
LARGE_BUFFER = 20 << 20
ROUND_LARGE = 2 << 20


def round_size(nbytes: int) -> int:
    """Bytes the allocator hands out for a request of `nbytes` (a multiple of 512, at least 512)."""
    return max(MIN_BLOCK, -(-nbytes // MIN_BLOCK) * MIN_BLOCK)


def segment_size(rounded: int) -> int:
    """Bytes of the segment cudaMalloc'd when no cached block fits a (rounded) request."""
    if rounded <= SMALL_SIZE:
        return SMALL_BUFFER
    if rounded < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-rounded // ROUND_LARGE) * ROUND_LARGE


class _Block:
    __slots__ = ("addr", "size", "segment", "free", "small")

    def __init__(self, addr, size, segment, small):
        self.addr, self.size, self.segment, self.free, self.small = addr, size, segment, True, small


class CachingAllocator:
    """The caching allocator's bookkeeping on a planted or traced sequence of malloc/free calls."""

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity  # bytes the allocator may reserve (device memory minus the CUDA context)
        self.allocated = self.reserved = 0
        self.peak_allocated = self.peak_reserved = 0
        self.out_of_memory = False
        self._free = {True: [], False: []}  # small? -> sorted [(size, addr)] of cached free blocks
        self._blocks: dict[int, _Block] = {}  # start address -> block
        self._ends: dict[int, int] = {}  # end address -> start address of the block ending there
        self._segments: dict[int, int] = {}  # segment base address -> size
        self._live: dict[object, _Block] = {}
        self._next_base = 0

    def _insert_free(self, block):
        bisect.insort(self._free[block.small], (block.size, block.addr))

    def _remove_free(self, block):
        entries = self._free[block.small]
        del entries[bisect.bisect_left(entries, (block.size, block.addr))]

    def _add_block(self, block):
        self._blocks[block.addr] = block
        self._ends[block.addr + block.size] = block.addr

    def _drop_block(self, block):
        del self._blocks[block.addr]
        del self._ends[block.addr + block.size]

    def _new_segment(self, size: int, small: bool) -> _Block | None:
        if self.capacity is not None and self.reserved + size > self.capacity:
            self._release_free_segments()
            if self.reserved + size > self.capacity:
                return None
        base = self._next_base
        self._next_base += size + MIN_BLOCK  # a gap: blocks of different segments never merge
        self._segments[base] = size
        self.reserved += size
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        block = _Block(base, size, base, small)
        self._add_block(block)
        return block

    def _release_free_segments(self):
        for base, size in list(self._segments.items()):
            block = self._blocks.get(base)
            if block is not None and block.free and block.size == size:
                self._remove_free(block)
                self._drop_block(block)
                del self._segments[base]
                self.reserved -= size

    def malloc(self, key, nbytes: int) -> bool:
        """Allocate `nbytes` for `key`; False (and out_of_memory set) when the device cannot hold it."""
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        entries = self._free[small]
        i = bisect.bisect_left(entries, (size, -1))
        if i < len(entries):
            block = self._blocks[entries[i][1]]
            self._remove_free(block)
        else:
            block = self._new_segment(segment_size(size), small)
            if block is None:
                self.out_of_memory = True
                return False
        remaining = block.size - size
        if remaining >= MIN_BLOCK if small else remaining > SMALL_SIZE:
            self._drop_block(block)
            rest = _Block(block.addr + size, remaining, block.segment, small)
            block.size = size
            self._add_block(block)
            self._add_block(rest)
            self._insert_free(rest)
        block.free = False
        self._live[key] = block
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return True

    def free(self, key) -> None:
        block = self._live.pop(key, None)
        if block is None:
            return
        self.allocated -= block.size
        block.free = True
        after = self._blocks.get(block.addr + block.size)
        if after is not None and after.free and after.segment == block.segment:
            self._remove_free(after)
            self._drop_block(after)
            self._drop_block(block)
            block.size += after.size
            self._add_block(block)
        start = self._ends.get(block.addr)
        before = self._blocks.get(start) if start is not None else None
        if before is not None and before.free and before.segment == block.segment:
            self._remove_free(before)
            self._drop_block(before)
            self._drop_block(block)
            before.size += block.size
            block = before
            self._add_block(block)
        self._insert_free(block)


PAGE = 4096
CHUNK_OVERHEAD = 64 + 8  # c10's CPU allocator asks posix_memalign for 64-byte alignment; glibc adds a header
MMAP_THRESHOLD = 128 << 10  # glibc's default M_MMAP_THRESHOLD and M_TRIM_THRESHOLD
TOP_PAD = 128 << 10  # DEFAULT_TOP_PAD: kept above the heap when it is trimmed


class HostHeap:
    """glibc malloc with a fixed 128 KiB mmap threshold (MALLOC_MMAP_THRESHOLD_=131072), one arena.

    Requests of 128 KiB and more are mmapped (whole pages) and unmapped on free; smaller ones take the
    best-fitting free heap chunk (split) or grow the heap's top; freed chunks merge with free neighbours and
    a free top over the trim threshold is given back. Resident bytes = heap extent + mmapped bytes.
    glibc's default instead raises the threshold to each freed mmapped size (up to 32 MiB), which sends most
    tensors to the heap, where fragmentation left RSS 1.3-1.7x above this model in our CPU runs; the
    validation runs therefore fix the threshold.
    """

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self.allocated = self.peak_allocated = 0
        self.peak_reserved = 0
        self.out_of_memory = False
        self.extent = 0  # heap bytes from its start to its top
        self.mapped = 0
        self._free: list = []  # sorted [(size, addr)] of free chunks below the top
        self._chunks: dict[int, list] = {}  # addr -> [size, free]
        self._ends: dict[int, int] = {}  # end address -> addr
        self._live: dict[object, tuple] = {}  # key -> (addr | None if mmapped, size, requested bytes)

    @property
    def reserved(self) -> int:
        return self.extent + self.mapped

    def _put(self, addr, size, free):
        self._chunks[addr] = [size, free]
        self._ends[addr + size] = addr
        if free:
            bisect.insort(self._free, (size, addr))

    def _take(self, addr):
        size, free = self._chunks.pop(addr)
        del self._ends[addr + size]
        if free:
            del self._free[bisect.bisect_left(self._free, (size, addr))]
        return size, free

    def malloc(self, key, nbytes: int) -> bool:
        size = -(-(nbytes + CHUNK_OVERHEAD) // 16) * 16
        if size >= MMAP_THRESHOLD:
            mapped = -(-size // PAGE) * PAGE
            if self.capacity is not None and self.reserved + mapped > self.capacity:
                self.out_of_memory = True
                return False
            self.mapped += mapped
            self._live[key] = (None, mapped, nbytes)
        else:
            i = bisect.bisect_left(self._free, (size, -1))
            if i < len(self._free):
                addr = self._free[i][1]
                chunk, _ = self._take(addr)
                if chunk - size >= 32:
                    self._put(addr + size, chunk - size, True)
                else:
                    size = chunk
            else:  # grow at the top (a free chunk ending at the top is extended)
                start = self._ends.get(self.extent)
                addr = start if start is not None and self._chunks[start][1] else self.extent
                if addr != self.extent:
                    self._take(addr)
                if self.capacity is not None and addr + size + self.mapped > self.capacity:
                    self.out_of_memory = True
                    return False
                self.extent = max(self.extent, addr + size)
            self._put(addr, size, False)
            self._live[key] = (addr, size, nbytes)
        self.allocated += nbytes
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        return True

    def free(self, key) -> None:
        entry = self._live.pop(key, None)
        if entry is None:
            return
        addr, size, nbytes = entry
        self.allocated -= nbytes
        if addr is None:
            self.mapped -= size
            return
        self._take(addr)
        after = addr + size
        if after in self._chunks and self._chunks[after][1]:
            size += self._take(after)[0]
        start = self._ends.get(addr)
        if start is not None and self._chunks[start][1]:
            size += self._take(start)[0]
            addr = start
        if addr + size == self.extent and size > MMAP_THRESHOLD:
            self.extent = addr + min(size, TOP_PAD)  # the top is given back, less the pad glibc keeps
            size = self.extent - addr
        self._put(addr, size, True)


@dataclass(frozen=True)
class Replay:
    """Peaks of one allocation sequence replayed through an allocator model."""

    peak_allocated: int  # the most bytes in live blocks (torch.cuda.max_memory_allocated)
    peak_reserved: int  # the most bytes in segments (torch.cuda.max_memory_reserved)
    out_of_memory: bool
    allocated_at: int | None = None  # bytes allocated after event `at` - 1 (torch.cuda.memory_allocated there)


def replay(events, *, caching: bool, capacity: int | None = None, measure_from: int = 0,
           at: int | None = None) -> Replay:
    """Replays [(+1 | -1, key, nbytes)]; peaks count from event `measure_from` on (the steady-state step);
    `at`: also report the bytes allocated once the first `at` events have run (e.g. at the end of a step)."""
    memory = CachingAllocator(capacity) if caching else HostHeap(capacity)
    allocated_at = None
    for index, (sign, key, nbytes) in enumerate(events):
        if index == measure_from:  # like torch.cuda.reset_peak_memory_stats() before the measured step
            memory.peak_allocated, memory.peak_reserved = memory.allocated, memory.reserved
        if index == at:
            allocated_at = memory.allocated
        if sign > 0:
            if not memory.malloc(key, nbytes):
                break
        else:
            memory.free(key)
    if at is not None and at >= len(events) and not memory.out_of_memory:
        allocated_at = memory.allocated
    return Replay(memory.peak_allocated, memory.peak_reserved, memory.out_of_memory, allocated_at)
