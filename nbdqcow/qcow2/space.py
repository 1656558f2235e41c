"""HOST SPACE: claim the host blocks of new clusters when they are allocated, give them
back when the mapping policy returns space (qcow2.txt is silent here; this is how the
engine keeps "a write that was acknowledged is never lost for lack of space").

Every cluster the allocator hands out (guest data, L2 tables, refcount blocks, a grown
refcount table) is claimed in the host file (``fallocate(FALLOC_FL_KEEP_SIZE)``) before
the refcount that accounts it changes.  A full file system therefore fails the request
that needs the space, with ENOSPC, and never a later FLUSH: metadata the cache writes
back later lands in blocks that already exist.

Clusters past the end of the file are claimed ahead in steps of ``LOOKAHEAD`` bytes (one
system call per step, not per cluster); the *window* is the range claimed that way and
not given back since.  Whatever of it lies past the end of the file when the image is
closed is given back (``trim``).  Clusters below the window (reused free clusters, which
may be holes) are claimed one allocation at a time.
"""

from __future__ import annotations

import errno

from nbdqcow.block.hostfile import HostFile
from nbdqcow.errors import NoSpace

LOOKAHEAD = 4 << 20  # bytes claimed ahead past the end of the file
_MAX_BRIDGE = 64 << 20  # a gap wider than this before a claim is not claimed with it
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class HostSpace:
    def __init__(self, file: HostFile, cluster_bits: int, lookahead: int = LOOKAHEAD) -> None:
        self.file = file
        self.cluster_bits = cluster_bits
        cs = 1 << cluster_bits
        self.lookahead = max(cs, lookahead - lookahead % cs)
        # a read-only image never allocates; a file system without fallocate claims
        # space as writes happen (nothing better is possible there)
        self.supported = file.writable
        end = -(-file.size() // cs) * cs
        self.window = (end, end)

    # --- claiming --------------------------------------------------------------------
    def claim(self, first: int, n: int = 1) -> None:
        """Make sure host clusters [first, first+n) have blocks.  Raises NoSpace (and
        claims nothing of the request) when the file system is full."""
        if not self.supported or n <= 0:
            return
        off, end = first << self.cluster_bits, (first + n) << self.cluster_bits
        ws, we = self.window
        if ws <= off and end <= we:
            return
        if ws <= off and end > we and off - we <= _MAX_BRIDGE:
            # at (or just past) the end of the window: claim ahead
            target = max(end, we + self.lookahead)
            try:
                self._reserve(we, target - we)
                self.window = (ws, target)
                return
            except NoSpace:
                pass  # nearly full: claim no more than this request needs
        self._reserve(off, end - off)
        if ws <= off <= we < end:
            self.window = (ws, end)

    def claim_range(self, offset: int, length: int) -> None:
        """Claim the blocks of a host range that stays mapped but may be a hole (the
        ``thin`` policy punched it) before a write lands there."""
        if self.supported and length > 0:
            self._reserve(offset, length)

    def _reserve(self, offset: int, length: int) -> None:
        if not reserve(self.file, offset, length):
            self.supported = False

    # --- giving back -----------------------------------------------------------------
    def punch(self, offset: int, length: int) -> bool:
        """Give the blocks of a host range back to the file system (it reads as zeros
        afterwards).  False when the file system cannot punch holes."""
        if length <= 0:
            return True
        done = self.file.punch_hole(offset, length)
        ws, we = self.window
        if done and offset < we and offset + length > ws:
            # the window must stay claimed throughout: cut it above the hole
            start = min(we, offset + length)
            self.window = (start, we)
        return done

    def trim(self) -> None:
        """Give back what was claimed ahead past the end of the file (at close)."""
        ws, we = self.window
        size = self.file.size()
        cs = 1 << self.cluster_bits
        end = -(-size // cs) * cs
        if self.supported and we > end:
            # a hole cannot be punched past the end of a file; truncating it to its own
            # size drops the blocks kept there
            self.file.truncate(size)
            self.window = (min(ws, end), end)


def reserve(file: HostFile, offset: int, length: int) -> bool:
    """``file.reserve`` with a full file system reported as NoSpace (ENOSPC for NBD)."""
    try:
        return file.reserve(offset, length)
    except OSError as e:
        if e.errno in _NO_SPACE:
            raise NoSpace(f"no space left for '{file.path}' ({e.strerror})") from None
        raise
