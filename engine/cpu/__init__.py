"""The CPU backend: BLAS choice before MLX loads, the native kernels (native/, built by
`make native`): row kernels for float32 decode products and quantized kernels that run
quantized checkpoints without a float32 copy, and the MKL-packed output projection."""
