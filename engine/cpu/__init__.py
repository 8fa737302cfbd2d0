"""The CPU backend: BLAS choice before MLX loads, the native row kernels
(native/, built by `make native`) and the MKL-packed output projection."""
