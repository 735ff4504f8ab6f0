"""The 8 x 8 byte-block transpose that the compiled quantizers store their tiles through (numba).

A quantizer that reads an expert's stored [in, out] rows and writes the [out, in] bytes llama.cpp,
vLLM and transformers load builds a small tile of output bytes in the stored order, then writes it
transposed. Byte by byte that is one strided load and one store per byte; here every load and store
moves eight bytes.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True, inline="always")
def _swap_fields(a, b, shift, mask):
    """Exchange the fields `mask` << shift of a with the fields `mask` of b."""
    t = ((a >> shift) ^ b) & mask
    return a ^ (t << shift), b ^ t


@njit(nogil=True, cache=True, inline="always")
def store_transposed(tile, step, width, out, c0, rb):
    """out[c0 + c, rb] = column c of the 8 x `width` byte tile (rows `step` words apart), for c < width,
    as uint64 words: out is the uint64 view of the stored [cols, rows] bytes, so word rb of row c0 + c
    holds the column's 8 bytes. Each 8 x 8 block is loaded as eight words (in registers) and
    transposed by three rounds of swaps (bytes, then pairs, then quads across words), so every load
    and store moves eight bytes."""
    words = tile.view(np.uint64)
    m1, m2, m4 = np.uint64(0x00FF00FF00FF00FF), np.uint64(0x0000FFFF0000FFFF), np.uint64(0x00000000FFFFFFFF)
    s8, s16, s32 = np.uint64(8), np.uint64(16), np.uint64(32)
    for cb in range(width // 8):
        x0, x1, x2, x3 = words[cb], words[step + cb], words[2 * step + cb], words[3 * step + cb]
        x4, x5, x6, x7 = words[4 * step + cb], words[5 * step + cb], words[6 * step + cb], words[7 * step + cb]
        x0, x1 = _swap_fields(x0, x1, s8, m1)
        x2, x3 = _swap_fields(x2, x3, s8, m1)
        x4, x5 = _swap_fields(x4, x5, s8, m1)
        x6, x7 = _swap_fields(x6, x7, s8, m1)
        x0, x2 = _swap_fields(x0, x2, s16, m2)
        x1, x3 = _swap_fields(x1, x3, s16, m2)
        x4, x6 = _swap_fields(x4, x6, s16, m2)
        x5, x7 = _swap_fields(x5, x7, s16, m2)
        x0, x4 = _swap_fields(x0, x4, s32, m4)
        x1, x5 = _swap_fields(x1, x5, s32, m4)
        x2, x6 = _swap_fields(x2, x6, s32, m4)
        x3, x7 = _swap_fields(x3, x7, s32, m4)
        c = c0 + 8 * cb
        out[c, rb], out[c + 1, rb], out[c + 2, rb], out[c + 3, rb] = x0, x1, x2, x3
        out[c + 4, rb], out[c + 5, rb], out[c + 6, rb], out[c + 7, rb] = x4, x5, x6, x7
