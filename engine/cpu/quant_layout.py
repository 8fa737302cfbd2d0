"""One layout for every quantized weight format the CPU kernels run (native/quant_matmul.cpp).

A quantized checkpoint stores each weight as a small integer u with a scale per block
(and, in some formats, an offset): w = scale * (u - zero) + offset. The GGUF types
(Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K) and mlx-lm's affine 2- to 8-bit checkpoints all fit
that form with a scale per 32 weights (per 16 for Q6_K), an offset per 32 or none, and
u of at most 8 bits. So they are repacked once, at load, into one layout that the
kernels stream, and every value the checkpoint encodes is kept exactly (the repacked
values equal gguf's own dequantization bit for bit; tests/test_quant_kernels.py):

  tiles of 16 outputs; per tile, per group of 32 inputs:
    values   8 "steps" of [output][k%4] (64 bytes: the operand of one vpdpbusd per 4 k),
             as bytes (512 a group) for values of 7-8 bits, else as nibbles (two steps a
             64-byte vector, 256 a group) plus a 64-byte bit plane per bit above 4
    64*subs  float32 scales [subs][16], subs = 1 (per 32 k) or 2 (per 16 k)
    64       float32 offsets [16], if the format has them (K-quant mins, mlx biases)
  or, for formats whose file holds one float16 scale per 32 and no offsets (Q4_0, Q5_0,
  Q8_0) when a row has an even number of groups, "half" scales, groups in pairs:
    values of group 2p, values of group 2p + 1, then both groups' float16 scales [2][16]
    (64 bytes: every part of a pair stays a multiple of 64 bytes)
  or, for mlx-lm's affine checkpoints, whose scales and biases are float16 or bfloat16,
  "half" scales with offsets, in runs of the `share` groups that share them (the
  checkpoint's group size / 32: 1, 2 or 4):
    the run's values, then its 16-bit scales [16] and offsets [16] (64 bytes)
  or, for the K-quants (Q4_K, Q5_K, Q6_K), whose scales are small integers times a float16
  base per 256 inputs (and offsets minus integers times a second base), "ints", groups in
  superblocks of 8:
    values of the 8 groups, then each group's integer scales [subs][16] (Q6_K: int8;
    Q4_K/Q5_K: uint8, then their integer minimums [16]: 32 bytes a group), then the
    bases [16] d and [16] dmin as float16 (64 bytes)
    The kernels multiply an integer by its base in float32, which is exact (at most 19
    bits), so the scales and offsets are the float32 ones of the layout above, bit for bit.

So a weight costs Q4_0 4.5 bits, Q5_0 5.5, Q8_0 8.5 (with an odd number of groups 5, 6,
9), Q4_K 4.625, Q5_K 5.625, Q6_K 6.625 (the file: 4.5, 5.5, 8.5, 4.5, 5.5, 6.56), and an
mlx-lm affine 4-bit weight what the checkpoint costs: 5 bits at group size 32, 4.5 at 64,
4.25 at 128 (float32 scales: 6): a decode step streams every weight once, so bytes are time.
Rows are repacked a few thousand at a time into the final buffer, so a load never holds a
float32 copy, nor more than one extra chunk.

numpy only: imported without MLX.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

TILE = 16  # outputs per tile
GROUP = 32  # inputs per group
SUPER = 8  # groups per superblock of the K-quants' integer scales
_CHUNK_TILES = 256  # tiles repacked at a time

# GGUF types this layout holds: name -> (weights per block, bytes per block)
GGUF_BLOCKS = {
    "Q4_0": (32, 18),
    "Q5_0": (32, 22),
    "Q8_0": (32, 34),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}


@dataclass(frozen=True)
class QuantFormat:
    """How the kernels read a packed matrix: w = scale * (u - zero) + offset."""

    subs: int  # scales per group of 32: 1, or 2 (per 16)
    offsets: bool  # an offset per output per group
    zero: int
    wide: bool  # u uses all 8 bits (the AVX2 path multiplies those in signed form)
    bits: int = 8  # 4, 5, 6: nibbles and bit planes; 8: bytes
    # The scales (and offsets) are 16-bit values: "f16" (GGUF Q4_0, Q5_0, Q8_0; mlx-lm
    # checkpoints in float16) or "bf16" (mlx-lm checkpoints in bfloat16)
    scales16: str | None = None
    half: bool = False  # packed with 16-bit scales (see the top)
    int_scales: bool = False  # scales and offsets are integers times bases per 256 (K-quants)
    ints: bool = False  # packed with integer scales, groups in superblocks of 8 (see the top)
    # Groups of 32 that share one scale and offset (mlx-lm's group size / 32: 1, 2 or 4); the
    # 16-bit layout stores them once a run, the float32 one once a group
    share: int = 1

    @property
    def value_bytes(self) -> int:
        return 512 if self.bits == 8 else 256 + (self.bits - 4) * 64

    @property
    def group_bytes(self) -> int:
        """Bytes a group takes in a tile (with half scales: half of a pair's)."""
        if self.half:
            return self.value_bytes + (64 // self.share if self.offsets else 32)
        if self.ints:  # an eighth of a superblock's (8 values, 8 x 32 integers, 64 of bases)
            return self.value_bytes + 40
        return self.value_bytes + 64 * self.subs + (64 if self.offsets else 0)

    def packed_as(self, k: int) -> QuantFormat:
        """The layout of a matrix of this format with k inputs: half or integer scales
        where they fit."""
        half = self.scales16 is not None and self.subs == 1 and (self.offsets or (k // GROUP) % 2 == 0)
        ints = self.int_scales and k % (SUPER * GROUP) == 0
        share = self.share if half and self.offsets and (k // GROUP) % self.share == 0 else 1
        return replace(self, half=half, ints=ints, share=share)


def stored_bits(bits: int) -> int:
    """The packed width of values of `bits` bits."""
    return 4 if bits <= 4 else 8 if bits >= 7 else bits


@dataclass
class Unpacked:
    """Rows of a quantized matrix, unpacked: values u [rows, k] uint8, scales [rows, k/32*subs],
    offsets [rows, k/32] or None, all float32."""

    values: np.ndarray
    scales: np.ndarray
    offsets: np.ndarray | None
    format: QuantFormat
    # K-quants: the float16 bases per 256 inputs, [rows, k/256, 2] (d, dmin) as float32:
    # scales = d * integer, offsets = -(dmin * integer)
    bases: np.ndarray | None = None

    def dequantize(self) -> np.ndarray:
        """float32 [rows, k], in the order the kernels' row lookup uses."""
        rows, k = self.values.shape
        per = GROUP // self.format.subs
        v = self.values.reshape(rows, -1, per).astype(np.int32) - self.format.zero
        w = v.astype(np.float32) * self.scales.reshape(rows, -1, 1)
        if self.offsets is not None:
            w = w.reshape(rows, -1, GROUP) + self.offsets.reshape(rows, -1, 1)
        return w.reshape(rows, k)


# -- GGUF blocks ------------------------------------------------------------------------

def _f16(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16*m] bytes -> [..., 32*m] values: each 16-byte run gives its low nibbles, then
    its high nibbles (ggml's order for Q4_0/Q5_0 and, by 32-byte runs, the K-quants)."""
    return np.stack([qs & 0x0F, qs >> 4], axis=-2)


def _unpack_q8_0(b, n):
    d, q = b[..., :2], b[..., 2:]
    return (q ^ 0x80).reshape(n, -1), _f16(d).reshape(n, -1), None, QuantFormat(1, False, 128, True, 8, scales16="f16")


def _unpack_q4_0(b, n):
    d, qs = b[..., :2], b[..., 2:]
    return _nibbles(qs).reshape(n, -1), _f16(d).reshape(n, -1), None, QuantFormat(1, False, 8, False, 4, scales16="f16")


def _unpack_q5_0(b, n):
    d, qh, qs = b[..., :2], b[..., 2:6], b[..., 6:]
    high = np.unpackbits(qh, axis=-1, bitorder="little")  # bit j: element j's fifth bit
    u = _nibbles(qs).reshape(*qs.shape[:-1], 32) | (high << 4)
    return u.reshape(n, -1), _f16(d).reshape(n, -1), None, QuantFormat(1, False, 16, False, 5, scales16="f16")


def _k_scales(b):
    """Q4_K/Q5_K: d, dmin (fp16) and 8 six-bit scales and mins per 256."""
    import gguf

    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    blocks = b.reshape(-1, b.shape[-1])
    sc, m = gguf.quants.Q4_K.get_scale_min(np.ascontiguousarray(blocks[:, 4:16]))
    sc = sc.reshape(*b.shape[:-1], 8).astype(np.float32)
    m = m.reshape(*b.shape[:-1], 8).astype(np.float32)
    return d * sc, -(dmin * m)  # as ggml: (d * sc) * q - (dmin * m)


def _unpack_q4_k(b, n):
    scales, offsets = _k_scales(b)
    u = _nibbles(b[..., 16:].reshape(*b.shape[:-1], 4, 32))  # [.., 4, 2, 32]: sub-blocks 2c, 2c+1
    return u.reshape(n, -1), scales.reshape(n, -1), offsets.reshape(n, -1), QuantFormat(1, True, 0, False, 4, int_scales=True)


def _unpack_q5_k(b, n):
    scales, offsets = _k_scales(b)
    qh, qs = b[..., 16:48], b[..., 48:]
    low = _nibbles(qs.reshape(*b.shape[:-1], 4, 32)).reshape(*b.shape[:-1], 8, 32)
    high = (qh[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # bit i: sub-block i
    u = low | (high << 4)
    return u.reshape(n, -1), scales.reshape(n, -1), offsets.reshape(n, -1), QuantFormat(1, True, 0, False, 5, int_scales=True)


def _unpack_q6_k(b, n):
    ql, qh, sc, d = b[..., :128], b[..., 128:192], b[..., 192:208], b[..., 208:210]
    lead = b.shape[:-1]
    low = np.stack([ql.reshape(*lead, 2, 64) & 0x0F, ql.reshape(*lead, 2, 64) >> 4], axis=-2)
    low = low.reshape(*lead, 8, 32)
    high = (qh.reshape(*lead, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
    u = low | (high.reshape(*lead, 8, 32) << 4)
    scales = _f16(d) * np.ascontiguousarray(sc).view(np.int8).astype(np.float32)  # per 16
    return u.reshape(n, -1), scales.reshape(n, -1), None, QuantFormat(2, False, 32, False, 6, int_scales=True)


_UNPACK_GGUF = {
    "Q4_0": _unpack_q4_0,
    "Q5_0": _unpack_q5_0,
    "Q8_0": _unpack_q8_0,
    "Q4_K": _unpack_q4_k,
    "Q5_K": _unpack_q5_k,
    "Q6_K": _unpack_q6_k,
}


def unpack_gguf(raw: np.ndarray, qtype: str) -> Unpacked:
    """Rows of a GGUF tensor, raw [rows, bytes per row] uint8, unpacked."""
    per, size = GGUF_BLOCKS[qtype]
    n = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(n, -1, size)
    values, scales, offsets, fmt = _UNPACK_GGUF[qtype](blocks, n)
    bases = None
    if qtype in ("Q4_K", "Q5_K"):
        bases = np.stack([_f16(blocks[..., 0:2])[..., 0], _f16(blocks[..., 2:4])[..., 0]], axis=-1)
    elif qtype == "Q6_K":
        d = _f16(blocks[..., 208:210])[..., 0]
        bases = np.stack([d, np.zeros_like(d)], axis=-1)
    return Unpacked(values.astype(np.uint8, copy=False), scales, offsets, fmt, bases)


# -- mlx-lm affine ----------------------------------------------------------------------

def affine_supported(bits: int, group_size: int) -> bool:
    return 2 <= bits <= 8 and group_size % GROUP == 0


def unpack_mlx_affine(weight: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int,
                      group_size: int, scales16: str | None = None) -> Unpacked:
    """Rows of an mlx affine-quantized matrix (weight uint32 [rows, k*bits/32], scales and
    biases [rows, k/group_size]): mlx packs values as a little-endian bit stream.
    scales16: "f16" or "bf16" when the checkpoint's scales and biases are of that type."""
    n = weight.shape[0]
    stream = np.unpackbits(np.ascontiguousarray(weight).view(np.uint8).reshape(n, -1), axis=-1,
                           bitorder="little")
    k = stream.shape[1] // bits
    u = np.packbits(stream.reshape(n, k, bits), axis=-1, bitorder="little").reshape(n, k)
    repeat = group_size // GROUP
    scales = np.repeat(scales.astype(np.float32), repeat, axis=1)
    biases = np.repeat(biases.astype(np.float32), repeat, axis=1)
    share = repeat if repeat in (1, 2, 4) else 1  # mlx's group sizes: 32, 64, 128
    return Unpacked(u, scales, biases, QuantFormat(1, True, 0, bits == 8, stored_bits(bits), scales16=scales16,
                                                   share=share))


def gguf_as_mlx_affine(qtype: str) -> int | None:
    """The bits of the mlx-lm affine format (group size 32) that holds a GGUF type exactly,
    or None (Q6_K's per-16 scales fit no mlx group size)."""
    return {"Q4_0": 4, "Q4_K": 4, "Q5_0": 5, "Q5_K": 5, "Q8_0": 8}.get(qtype)


def to_mlx_affine(part: Unpacked, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(weight uint32, scales, biases) of mlx's affine format, group size 32, for values
    that fit `bits`: w = scale * u + bias, with bias = -zero * scale where the format has
    no offsets (exact: scale * u and zero * scale need at most 19 bits)."""
    fmt = part.format
    if fmt.subs != 1:
        raise ValueError("mlx affine groups hold one scale per 32 weights")
    rows, k = part.values.shape
    stream = (part.values[..., None] >> np.arange(bits, dtype=np.uint8)) & 1
    weight = np.packbits(stream.reshape(rows, k * bits), axis=-1, bitorder="little").view("<u4")
    biases = part.offsets if fmt.offsets else -np.float32(fmt.zero) * part.scales
    return weight, part.scales.astype(np.float32), biases.astype(np.float32)


# -- tiles ------------------------------------------------------------------------------

def packed_shape(rows: int, k: int, fmt: QuantFormat) -> tuple[int, int, int]:
    return (-(-rows // TILE), k // GROUP, fmt.group_bytes)


def pack_tiles(part: Unpacked, out: np.ndarray, fmt: QuantFormat | None = None) -> None:
    """Write the tiles of `part` (whole tiles, except at the matrix's end) into out
    [tiles, k/32, group_bytes] in layout `fmt` (default: part.format.packed_as(k))."""
    rows, k = part.values.shape
    fmt = fmt or part.format.packed_as(k)
    tiles, groups = out.shape[0], k // GROUP
    pad = tiles * TILE - rows

    def padded(a):
        return np.pad(a, [(0, pad), (0, 0)]) if pad else a

    # [tiles, groups, step (8), output (16), k%4 (4)]
    u = padded(part.values).reshape(tiles, TILE, groups, 8, 4).transpose(0, 2, 3, 1, 4)
    u = u.reshape(tiles, groups, 8, 64)
    if fmt.bits == 8:
        values = u.reshape(tiles, groups, 512)
    else:
        nibbles = (u[:, :, 0::2] & 0x0F) | ((u[:, :, 1::2] & 0x0F) << 4).astype(np.uint8)  # steps 2p, 2p+1 in vector p
        planes = [np.packbits((u >> (4 + b)) & 1, axis=-1, bitorder="little")  # [.., 8 steps, 8]
                  for b in range(fmt.bits - 4)]
        values = np.concatenate([a.reshape(tiles, groups, -1) for a in [nibbles, *planes]], axis=-1)
    if fmt.ints:
        if part.bases is None:
            raise ValueError("integer-scale layout: the rows carry no bases (unpack_gguf gives them)")
        out[:] = _superblocks(part, values, padded, tiles, groups).reshape(tiles, groups, -1)
        return
    if fmt.half and fmt.offsets:  # per run: its values, 16-bit scales [16], 16-bit offsets [16]
        runs = groups // fmt.share
        s = [padded(_sixteen(_shared(a, fmt.share), fmt.scales16)).reshape(tiles, TILE, runs).transpose(0, 2, 1)
             for a in (part.scales, part.offsets)]
        s = np.ascontiguousarray(np.stack(s, axis=2)).view(np.uint8).reshape(tiles, runs, 64)
        out[:] = np.concatenate([values.reshape(tiles, runs, -1), s], axis=-1).reshape(tiles, groups, -1)
        return
    if fmt.half:
        halves = _sixteen(part.scales, fmt.scales16)
        s = padded(halves).reshape(tiles, TILE, groups).transpose(0, 2, 1)
        s = np.ascontiguousarray(s).view(np.uint8).reshape(tiles, groups // 2, 64)
        pairs = np.concatenate([values.reshape(tiles, groups // 2, -1), s], axis=-1)
        out[:] = pairs.reshape(tiles, groups, -1)
        return
    parts = [values]
    s = padded(part.scales).astype("<f4").reshape(tiles, TILE, groups, fmt.subs).transpose(0, 2, 3, 1)
    parts.append(np.ascontiguousarray(s).view(np.uint8).reshape(tiles, groups, -1))
    if fmt.offsets:
        o = padded(part.offsets).astype("<f4").reshape(tiles, TILE, groups).transpose(0, 2, 1)
        parts.append(np.ascontiguousarray(o).view(np.uint8).reshape(tiles, groups, -1))
    out[:] = np.concatenate(parts, axis=-1)


def _shared(per_group: np.ndarray, share: int) -> np.ndarray:
    """[rows, groups] -> [rows, groups / share]: the value each run of `share` groups shares
    (else ValueError: the layout could not give the values back)."""
    runs = per_group.reshape(per_group.shape[0], -1, share)
    if not (runs == runs[..., :1]).all():
        raise ValueError(f"shared-scale layout: groups that share a scale ({share} a run) hold different ones")
    return runs[..., 0]


def _sixteen(floats: np.ndarray, kind: str) -> np.ndarray:
    """float32 values as 16-bit ones of `kind` ("f16" or "bf16"), uint16 (else ValueError:
    the layout could not give the values back)."""
    f = np.ascontiguousarray(floats, np.float32)
    if kind == "f16":
        bits = f.astype("<f2").view(np.uint16)
        back = bits.view("<f2").astype(np.float32)
    else:
        bits = (f.view(np.uint32) >> 16).astype(np.uint16)
        back = (bits.astype(np.uint32) << 16).view(np.float32)
    if not np.array_equal(back, f, equal_nan=True):
        raise ValueError(f"16-bit scale layout: the scales are not {kind} values")
    return bits


def _integers(floats: np.ndarray, base: np.ndarray, sign: float, dtype) -> np.ndarray:
    """The integers i with floats == sign * (base * i) in float32 (else ValueError: the
    layout could not give the file's values back)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        i = np.where(base != 0, np.rint(sign * floats / base), 0)
    info = np.iinfo(dtype)
    if np.isfinite(i).all() and (i >= info.min).all() and (i <= info.max).all():
        ints = i.astype(dtype)
        back = (np.float32(sign) * (base * ints.astype(np.float32))).astype(np.float32)
        # Equal values (the padding rows' +0 offsets come back as -0: never stored)
        if np.array_equal(back, floats):
            return ints
    raise ValueError("integer-scale layout: the scales are not integers times their bases")


def _superblocks(part: Unpacked, values: np.ndarray, padded, tiles: int, groups: int) -> np.ndarray:
    """[tiles, supers, bytes]: per superblock of 8 groups their values, their integer
    scales (and minimums), then the float16 bases (see the top)."""
    fmt, supers = part.format, groups // SUPER
    bases = padded(part.bases.reshape(part.bases.shape[0], -1)).reshape(-1, supers, 2)
    d = np.repeat(bases[..., 0], SUPER * fmt.subs, axis=1)  # [rows, scales]
    if fmt.subs == 2:  # Q6_K: int8 scales per 16
        ints = [_integers(padded(part.scales), d, 1.0, np.int8).view(np.uint8).reshape(-1, groups, 2)]
    else:
        ints = [_integers(padded(part.scales), d, 1.0, np.uint8).reshape(-1, groups, 1)]
    if fmt.offsets:
        dmin = np.repeat(bases[..., 1], SUPER, axis=1)
        ints.append(_integers(padded(part.offsets), dmin, -1.0, np.uint8).reshape(-1, groups, 1))
    # [tiles, groups, 2 (scales then minimums, or Q6_K's two scales), 16 outputs]
    ints = np.concatenate(ints, axis=-1).reshape(tiles, TILE, groups, 2).transpose(0, 2, 3, 1)
    ints = np.ascontiguousarray(ints).reshape(tiles, supers, SUPER * 32)
    halves = bases.astype("<f2").reshape(tiles, TILE, supers, 2).transpose(0, 2, 3, 1)
    halves = np.ascontiguousarray(halves).view(np.uint8).reshape(tiles, supers, 64)
    return np.concatenate([values.reshape(tiles, supers, -1), ints, halves], axis=-1)


def repack(rows: int, unpack, out_for) -> QuantFormat:
    """Repack a matrix of `rows` rows chunk by chunk: unpack(r0, r1) -> Unpacked;
    out_for(fmt) -> the whole output buffer (allocated once the format is known)."""
    out, fmt = None, None
    step = _CHUNK_TILES * TILE
    for r0 in range(0, rows, step):
        part = unpack(r0, min(rows, r0 + step))
        if out is None:
            fmt = part.format.packed_as(part.values.shape[1])
            out = out_for(fmt)
        pack_tiles(part, out[r0 // TILE: r0 // TILE + -(-part.values.shape[0] // TILE)], fmt)
    return fmt
