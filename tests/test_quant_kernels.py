"""Quantized weights on the CPU (engine/cpu/quant_layout.py, quant_linear.py): the repacked
values are the file's own, products match a float64 reference, and a row's bits depend on
nothing but the row (not the other rows, the thread count or the instruction set)."""

import os
import subprocess
import sys

import gguf
import mlx.core as mx
import numpy as np
import pytest

from engine.cpu import quant_layout, quant_linear
from quant_blocks import GGUF_TYPES, quantize, random_blocks, random_bytes

needs_kernels = pytest.mark.skipif(not quant_linear.available(),
                                   reason="quantized kernels not built (make native) or no AVX2/VNNI")


def _gguf_matrix(qtype: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    return random_blocks(qtype, n, k, np.random.default_rng(seed))


def _packed(unpack, n, k):
    """A QuantWeight repacked from unpack(r0, r1), chunk by chunk as the loader does."""
    return quant_linear.QuantWeight.repacked(n, k, unpack)


@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_gguf_values_round_trip_exactly(qtype):
    raw = _gguf_matrix(qtype, 37, 512)
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
    got = quant_layout.unpack_gguf(raw, qtype).dequantize()
    assert got.dtype == np.float32 and np.array_equal(got, want)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_every_k_quant_bit_pattern_round_trips(qtype):
    raw = random_bytes(qtype, 8, 1024, np.random.default_rng(1))
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
    assert np.array_equal(quant_layout.unpack_gguf(raw, qtype).dequantize(), want)


def test_test_quantizers_are_accurate():
    w = np.random.default_rng(2).standard_normal((16, 512)).astype(np.float32)
    for qtype, tol in [("Q4_K", 0.2), ("Q5_K", 0.1), ("Q6_K", 0.05), ("Q8_0", 0.01)]:
        back = gguf.quants.dequantize(quantize(w, qtype), gguf.GGMLQuantizationType[qtype])
        assert np.sqrt(np.mean((back - w) ** 2)) < tol, qtype


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_mlx_affine_values_round_trip_exactly(bits, group_size):
    w = mx.random.normal((24, 256), key=mx.random.key(bits))
    q, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    want = np.array(mx.dequantize(q, scales, biases, group_size=group_size, bits=bits))
    got = quant_layout.unpack_mlx_affine(np.array(q), np.array(scales), np.array(biases), bits, group_size)
    assert np.array_equal(got.dequantize(), want)


def _quantized_activations(x: np.ndarray, levels: int = 2) -> np.ndarray:
    """x as the kernels see it: per 32 inputs, int8 q at scale d = amax / 127 and int8 q2,
    the remainder, at d / 254 (float32 arithmetic); levels=1: q alone."""
    g = x.reshape(x.shape[0], -1, 32).astype(np.float32)
    amax = np.abs(g).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    f = (g * inv).astype(np.float32)
    q = np.rint(f)
    q2 = np.rint((f - q) * np.float32(254))
    assert np.abs(q).max() <= 127 and np.abs(q2).max() <= 127
    d = (amax / np.float32(127)).astype(np.float32)
    d2 = (d / np.float32(254)).astype(np.float32)
    out = q.astype(np.float64) * d.astype(np.float64)
    if levels == 2:
        out += q2.astype(np.float64) * d2.astype(np.float64)
    return out.reshape(x.shape)


def _check_product(weight: quant_linear.QuantWeight, dense: np.ndarray, rows: int = 40):
    x = np.array(mx.random.normal((rows, weight.k), key=mx.random.key(7)))
    got = np.array(weight.matmul(mx.array(x)))
    assert got.shape == (rows, weight.n)
    # Exact up to float rounding against the quantized activations...
    want = _quantized_activations(x) @ dense.astype(np.float64).T
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
    # ...and within the two-level activations' error (~16 bits) of the float product.
    exact = x.astype(np.float64) @ dense.astype(np.float64).T
    assert np.abs(got - exact).max() < 2e-4 * np.abs(exact).max()
    return x, got


@needs_kernels
@pytest.mark.parametrize("qtype", GGUF_TYPES)
# (100, 512): one thread; (3000, 1024): all threads.
@pytest.mark.parametrize("n,k", [(100, 512), (3000, 1024)])
def test_gguf_products_match_float64(qtype, n, k):
    raw = _gguf_matrix(qtype, n, k, seed=1)
    w = _packed(lambda a, b: quant_layout.unpack_gguf(raw[a:b], qtype), n, k)
    x, got = _check_product(w, gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]))
    # Any number of rows, any position: the very same bits for a row (decode, verify
    # windows and prefill tiles alike).
    for rows in (1, 2, 3, 7, 8, 9, 15, 16, 17, 33):
        assert np.array_equal(np.array(w.matmul(mx.array(x[:rows]))), got[:rows]), rows
    single = np.stack([np.array(w.matmul(mx.array(x[i:i + 1])))[0] for i in range(len(x))])
    assert np.array_equal(single, got)
    lookup = np.array(w.rows(mx.array([0, n - 1, n // 2])))
    assert np.array_equal(lookup, gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])[[0, n - 1, n // 2]])


@needs_kernels
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "Q6_K"])
def test_one_level_products(qtype, monkeypatch):
    """levels=1 (the output projection): int8 activations alone, exact up to float rounding
    against that reference, the same bits for a row alone or in a batch, on both paths."""
    raw = _gguf_matrix(qtype, 300, 512, seed=4)
    w = _packed(lambda a, b: quant_layout.unpack_gguf(raw[a:b], qtype), 300, 512)
    w.levels = 1
    dense = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).astype(np.float64)
    x = np.array(mx.random.normal((12, 512), key=mx.random.key(9)))
    got = np.array(w.matmul(mx.array(x)))
    want = _quantized_activations(x, levels=1) @ dense.T
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
    two = np.array(_packed(lambda a, b: quant_layout.unpack_gguf(raw[a:b], qtype), 300, 512).matmul(mx.array(x)))
    assert not np.array_equal(two, got)  # the second level changes the result
    assert np.array_equal(np.array(w.matmul(mx.array(x[3:4])))[0], got[3])
    if quant_linear._native.has_avx2():
        monkeypatch.setenv("KERNELEXT_QUANT_KERNELS", "avx2")
        assert np.array_equal(np.array(w.matmul(mx.array(x))), got)


@needs_kernels
@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32), (4, 128), (6, 32)])
def test_mlx_affine_products_match_float64(bits, group_size):
    n, k = 250, 384
    w = mx.random.normal((n, k), key=mx.random.key(3))
    q, s, b = mx.quantize(w, group_size=group_size, bits=bits)
    qn, sn, bn = np.array(q), np.array(s), np.array(b)
    packed = _packed(lambda a, c: quant_layout.unpack_mlx_affine(qn[a:c], sn[a:c], bn[a:c], bits, group_size), n, k)
    _check_product(packed, np.array(mx.dequantize(q, s, b, group_size=group_size, bits=bits)), rows=17)


@needs_kernels
@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_avx2_path_gives_the_same_bits(qtype, monkeypatch):
    if not quant_linear._native.has_avx2():
        pytest.skip("no AVX2")
    raw = _gguf_matrix(qtype, 300, 512, seed=2)
    w = _packed(lambda a, b: quant_layout.unpack_gguf(raw[a:b], qtype), 300, 512)
    x = mx.random.normal((11, 512), key=mx.random.key(4))
    first = np.array(w.matmul(x))
    monkeypatch.setenv("KERNELEXT_QUANT_KERNELS", "avx2")
    assert quant_linear.path() == "avx2"
    assert np.array_equal(np.array(w.matmul(x)), first)


_ONE_THREAD = """
import sys, numpy as np, mlx.core as mx
sys.path.insert(0, "tests")
import engine
from engine.cpu import quant_layout, quant_linear
from quant_blocks import random_blocks
raw = random_blocks("Q5_0", 3000, 1024, np.random.default_rng(5))
w = quant_linear.QuantWeight.repacked(3000, 1024, lambda a, b: quant_layout.unpack_gguf(raw[a:b], "Q5_0"))
x = mx.random.normal((9, 1024), key=mx.random.key(6))
np.save(sys.argv[1], np.concatenate([np.array(w.matmul(x)), np.array(w.matmul(x[:1]))]))
"""


@needs_kernels
def test_one_thread_and_all_threads_agree(tmp_path):
    # A 2.3 MB matrix: 9 rows split across threads; one row too where workers spin (their
    # cheap wake lets products from 256 KB split), on the calling thread alone where they
    # sleep (below 4 MB).
    results = []
    for threads, spin in (("1", "0"), ("8", "0"), ("8", "100")):
        out = tmp_path / f"t{threads}-{spin}.npy"
        env = {**os.environ, "KERNELEXT_KERNEL_THREADS": threads, "KERNELEXT_KERNEL_SPIN_US": spin}
        subprocess.run([sys.executable, "-c", _ONE_THREAD, str(out)], check=True, env=env,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
        results.append(np.load(out))
    assert np.array_equal(results[0], results[1])
    assert np.array_equal(results[0], results[2])
    assert np.array_equal(results[0][:1], results[0][9:])  # a row alone: the same bits


# Bits per weight as packed: the values' own width (4-bit nibbles, bit planes above), and
# the file's float16 scales for Q4_0, Q5_0 and Q8_0 (groups in pairs; float32 ones where a
# row has an odd number of groups), the K-quants' integer scales (and minimums) on float16
# bases per 256.
PACKED_BITS = {"Q4_0": 4.5, "Q5_0": 5.5, "Q8_0": 8.5, "Q4_K": 4.625, "Q5_K": 5.625, "Q6_K": 6.625}
PACKED_BITS_ODD_GROUPS = {"Q4_0": 5, "Q5_0": 6, "Q8_0": 9}
PACKED_BITS_FLOAT32 = {**PACKED_BITS_ODD_GROUPS, "Q4_K": 6, "Q5_K": 7, "Q6_K": 8}  # whole float32 scales


@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_packed_size_is_close_to_the_files(qtype):
    raw = _gguf_matrix(qtype, 64, 512)
    w = quant_linear.QuantWeight.repacked(64, 512, lambda a, b: quant_layout.unpack_gguf(raw[a:b], qtype))
    assert w.nbytes * 8 / (64 * 512) == PACKED_BITS[qtype]
    assert w.format.half == (qtype in PACKED_BITS_ODD_GROUPS)
    assert w.format.ints == (qtype not in PACKED_BITS_ODD_GROUPS)
    if qtype in PACKED_BITS_ODD_GROUPS:
        raw = _gguf_matrix(qtype, 64, 96)  # 3 groups a row
        w = quant_linear.QuantWeight.repacked(64, 96, lambda a, b: quant_layout.unpack_gguf(raw[a:b], qtype))
        assert not w.format.half and w.nbytes * 8 / (64 * 96) == PACKED_BITS_ODD_GROUPS[qtype]


@needs_kernels
@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_compact_scales_give_the_float32_layouts_bits(qtype, monkeypatch):
    """The same matrix packed with its compact scales (Q4_0/Q5_0/Q8_0: float16, groups in
    pairs; the K-quants: integers on float16 bases, superblocks of 8 groups) and with whole
    float32 scales: the same products (1 and 2 activation levels, 1 to 17 rows, both
    instruction paths) and the same rows, bit for bit."""
    n, k = 200, 768
    raw = _gguf_matrix(qtype, n, k, seed=8)
    part = quant_layout.unpack_gguf(raw, qtype)
    weights = {}
    for compact in (True, False):
        fmt = part.format.packed_as(k)
        if not compact:
            fmt = quant_layout.replace(fmt, half=False, ints=False)
        weight, view = quant_linear.QuantWeight.allocate(n, k, fmt)
        quant_layout.pack_tiles(part, view, fmt)
        weights[compact] = weight
    assert weights[True].format.half or weights[True].format.ints
    assert weights[True].nbytes * PACKED_BITS_FLOAT32[qtype] == weights[False].nbytes * PACKED_BITS[qtype]
    ids = mx.array([0, 17, n - 1])
    assert np.array_equal(np.array(weights[True].rows(ids)), np.array(weights[False].rows(ids)))
    x = mx.random.normal((17, k), key=mx.random.key(3))
    paths = ["vnni", "avx2"] if quant_linear._native.has_avx2() else ["vnni"]
    for path in paths:
        monkeypatch.setenv("KERNELEXT_QUANT_KERNELS", path if path == "avx2" else "auto")
        for levels in (1, 2):
            for rows in (1, 5, 17):
                got = {}
                for compact, weight in weights.items():
                    weight.levels = levels
                    got[compact] = np.array(weight.matmul(x[:rows]))
                assert np.array_equal(got[True], got[False]), (path, levels, rows)


@needs_kernels
@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32), (5, 128)])
@pytest.mark.parametrize("kind", ["f16", "bf16"])
def test_mlx_affine_16_bit_scales_give_the_float32_layouts_bits(bits, group_size, kind, monkeypatch):
    """An mlx-lm affine matrix whose scales and biases are float16 or bfloat16 keeps them
    at 16 bits, once per run of the groups of 32 that share them (64 bytes a run instead of
    128 a group): it costs the checkpoint's bits a weight, and gives the same products on
    both paths and the same rows as with float32 scales, bit for bit."""
    n, k = 80, 384
    q, s, b = mx.quantize(mx.random.normal((n, k), key=mx.random.key(bits)), group_size=group_size, bits=bits)
    dtype = mx.float16 if kind == "f16" else mx.bfloat16
    qn = np.array(q)
    sn, bn = (np.array(a.astype(dtype).astype(mx.float32)) for a in (s, b))
    weights = {}
    for compact in (True, False):
        part = quant_layout.unpack_mlx_affine(qn, sn, bn, bits, group_size, kind if compact else None)
        fmt = part.format.packed_as(k)
        assert fmt.half == compact
        weight, view = quant_linear.QuantWeight.allocate(n, k, fmt)
        quant_layout.pack_tiles(part, view, fmt)
        weights[compact] = weight
    assert weights[True].format.share == group_size // 32
    assert weights[True].nbytes * 8 / (n * k) == bits + 32 / group_size  # the checkpoint's own
    assert weights[False].nbytes * 8 / (n * k) == bits + 2  # float32 scale and offset per 32
    ids = mx.array([0, 33, n - 1])
    assert np.array_equal(np.array(weights[True].rows(ids)), np.array(weights[False].rows(ids)))
    x = mx.random.normal((9, k), key=mx.random.key(5))
    paths = ["auto", "avx2"] if quant_linear._native.has_avx2() else ["auto"]
    for path in paths:
        monkeypatch.setenv("KERNELEXT_QUANT_KERNELS", path)
        for rows in (1, 9):
            got = [np.array(w.matmul(x[:rows])) for w in weights.values()]
            assert np.array_equal(got[0], got[1]), (path, rows)


def test_groups_that_share_a_scale_hold_one():
    """Groups of 32 of one mlx-lm group share its scale; rows whose groups in a run differ
    (never from a checkpoint) are refused rather than packed wrong."""
    n, k = 16, 256
    q, s, b = mx.quantize(mx.random.normal((n, k), key=mx.random.key(3)), group_size=64, bits=4)
    part = quant_layout.unpack_mlx_affine(np.array(q), np.array(s.astype(mx.float16).astype(mx.float32)),
                                          np.array(b.astype(mx.float16).astype(mx.float32)), 4, 64, "f16")
    fmt = part.format.packed_as(k)
    assert fmt.half and fmt.share == 2
    part.scales[3, 1] = part.scales[3, 0] * 2
    with pytest.raises(ValueError, match="groups that share a scale"):
        quant_layout.pack_tiles(part, np.zeros(quant_layout.packed_shape(n, k, fmt), np.uint8), fmt)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_integer_scales_that_are_not_refuse_to_pack(qtype):
    """A K-quant matrix whose scales are not integers times its bases (never from a
    file's blocks) is refused rather than packed wrong."""
    part = quant_layout.unpack_gguf(_gguf_matrix(qtype, 16, 256), qtype)
    part.scales[3, 0] *= 1.001
    fmt = part.format.packed_as(256)
    assert fmt.ints
    with pytest.raises(ValueError, match="not integers times their bases"):
        quant_layout.pack_tiles(part, np.zeros(quant_layout.packed_shape(16, 256, fmt), np.uint8), fmt)


@needs_kernels
@pytest.mark.parametrize("bits", [2, 3, 5])
def test_mlx_affine_odd_widths_pack_and_multiply(bits):
    """Values of 2-3 bits go into nibbles, 5 into nibbles and a bit plane."""
    n, k = 40, 256
    w = mx.random.normal((n, k), key=mx.random.key(bits))
    q, s, b = mx.quantize(w, group_size=64, bits=bits)
    qn, sn, bn = np.array(q), np.array(s), np.array(b)
    packed = _packed(lambda a, c: quant_layout.unpack_mlx_affine(qn[a:c], sn[a:c], bn[a:c], bits, 64), n, k)
    dense = np.array(mx.dequantize(q, s, b, group_size=64, bits=bits))
    _check_product(packed, dense, rows=9)
    assert np.array_equal(np.array(packed.rows(mx.arange(n))), dense)


@needs_kernels
def test_bad_operands_raise():
    raw = _gguf_matrix("Q4_0", 16, 64)
    w = _packed(lambda a, b: quant_layout.unpack_gguf(raw[a:b], "Q4_0"), 16, 64)
    with pytest.raises(ValueError):
        w.matmul(mx.zeros((2, 96)))  # wrong k
    bad = quant_linear.QuantWeight(w.packed[:, :, :100], 16, 64, w.format)
    with pytest.raises(ValueError):
        bad.matmul(mx.zeros((2, 64)))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q5_K"])
def test_gguf_blocks_as_mlx_affine_are_exact(qtype):
    """Where MLX's own quantized kernels run (a GPU), GGUF blocks become mlx affine arrays."""
    raw = _gguf_matrix(qtype, 24, 512, seed=3)
    bits = quant_layout.gguf_as_mlx_affine(qtype)
    w, s, b = quant_layout.to_mlx_affine(quant_layout.unpack_gguf(raw, qtype), bits)
    got = np.array(mx.dequantize(mx.array(w), mx.array(s), mx.array(b), group_size=32, bits=bits))
    assert np.array_equal(got, gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]))
    assert quant_layout.gguf_as_mlx_affine("Q6_K") is None


_BACK_TO_BACK = """
import sys, time, numpy as np, mlx.core as mx
sys.path.insert(0, "tests")
import engine
from engine.cpu import quant_layout, quant_linear
from quant_blocks import random_blocks
raw = random_blocks("Q8_0", 1000, 512, np.random.default_rng(5))
big = quant_linear.QuantWeight.repacked(1000, 512, lambda a, b: quant_layout.unpack_gguf(raw[a:b], "Q8_0"))
small = quant_linear.QuantWeight.repacked(48, 512, lambda a, b: quant_layout.unpack_gguf(raw[a:b], "Q8_0"))
xs = [mx.random.normal((m, 512), key=mx.random.key(m)) for m in (32, 9, 64)]
want = [(np.array(big.matmul(x)), np.array(small.matmul(x))) for x in xs]
wrong = products = 0
deadline = time.time() + float(sys.argv[1])
while time.time() < deadline:
    for x, (b, s) in zip(xs, want):
        got = (big.matmul(x), small.matmul(x))
        mx.eval(got)
        wrong += (not np.array_equal(np.array(got[0]), b)) + (not np.array_equal(np.array(got[1]), s))
        products += 2
print(products, wrong)
"""


@needs_kernels
def test_products_back_to_back_with_different_chunk_counts(tmp_path):
    """Products whose thread-pool jobs have different chunk counts, back to back, with more
    kernel threads than cores (so workers are descheduled mid-claim): every result stays
    exact and nothing crashes. A worker that resumed with the previous product's exhausted
    ticket could claim a chunk of the next one twice, and the product returned while that
    chunk still ran on freed activations (segfaults under load; engine/cpu/native/workers.h)."""
    env = {**os.environ, "KERNELEXT_KERNEL_THREADS": "8"}
    out = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _BACK_TO_BACK, "15"],
                         capture_output=True, text=True, env=env, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr[-2000:]
    products, wrong = map(int, out.stdout.split())
    assert products > 1000 and wrong == 0
