"""Read stored tensors into caller-given host tensors (``load(into=...)``).

A destination whose address is 4 KiB aligned is read into directly (the
store's ``get_many(out=...)``: one direct read per tensor, no copy).  Other
destinations (torch's and numpy's allocators give 64-byte alignment) cannot
take O_DIRECT, so they are filled through three reusable page-aligned windows:
windows k+1 and k+2 are read while window k is copied into place and checksummed, so
the copy hides behind the disk and no memory is allocated per tensor.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..engine import alloc, as_bytes_view
from ..errors import ChecksumError, FormatError
from ..store.format import ALIGN, TensorInfo, align_up, crc32c

WINDOW = 64 << 20
DEPTH = 3  # windows: up to two in flight while the third is copied out


def _address(dst: Any) -> int:
    return dst.ctypes.data if isinstance(dst, np.ndarray) else dst.data_ptr()


def read_into(st: Any, pairs: list[tuple[TensorInfo, Any]], *, verify: bool, window: int = WINDOW) -> None:
    """Fill each ``dst`` (CPU, contiguous, exactly the tensor's size) with the stored tensor ``info``."""
    direct = {i.name: d for i, d in pairs if _address(d) % ALIGN == 0}
    if direct:
        st.get_many(out=direct, verify=verify)
    rest = [(i, np.frombuffer(as_bytes_view(d, writable=True), dtype=np.uint8)) for i, d in pairs
            if i.name not in direct and i.nbytes]
    if not rest:
        return
    rest.sort(key=lambda p: (p[0].file, p[0].offset))
    windows: list[list[tuple[TensorInfo, np.ndarray, int, int, int]]] = [[]]  # (info, dst, off, n, buf_pos)
    used = 0
    for info, dst in rest:
        for off in range(0, info.nbytes, window):
            n = min(window, info.nbytes - off)
            if used + align_up(n) > window or (windows[-1] and windows[-1][0][0].file != info.file):
                windows.append([])
                used = 0
            windows[-1].append((info, dst, off, n, used))
            used += align_up(n)
    depth = min(DEPTH, len(windows))
    bufs = [alloc(window) for _ in range(depth)]
    crcs: dict[str, int] = {}

    def submit(k: int) -> Any:
        w, buf = windows[k], bufs[k % depth]
        f = st.file(w[0][0].file)
        return f.pread_many([buf[pos : pos + align_up(n)] for _, _, _, n, pos in w],
                            [info.offset + off for info, _, off, _, _ in w],
                            tags=[info.name for info, *_ in w], exact=False)

    inflight = [submit(k) for k in range(depth)]
    for k in range(len(windows)):
        got = inflight.pop(0).result()
        try:
            buf = bufs[k % depth]
            for (info, dst, off, n, pos), g in zip(windows[k], got if isinstance(got, list) else [got]):
                if g < n:
                    raise FormatError(f"the file ends inside tensor {info.name!r}", path=info.file, field="size")
                piece = buf[pos : pos + n]
                np.copyto(dst[off : off + n], piece)
                if verify and info.crc32c is not None:
                    crcs[info.name] = crc32c(piece, crcs.get(info.name, 0))
                    if off + n == info.nbytes and crcs[info.name] != info.crc32c:
                        raise ChecksumError(f"tensor {info.name!r}: CRC-32C 0x{crcs[info.name]:08x}, index says "
                                            f"0x{info.crc32c:08x} (the data on disk is damaged)", path=info.file,
                                            field=info.name)
        except BaseException:
            for fut in inflight:  # never leave a read writing into our buffers
                fut.exception()
            raise
        if k + depth < len(windows):  # this window's buffer is free again
            inflight.append(submit(k + depth))
