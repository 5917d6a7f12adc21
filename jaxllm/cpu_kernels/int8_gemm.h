// int8 x int8 products with many rows (w8a8 prefill chunks and wide decode steps), with
// AVX512-VNNI: see int8_gemm.cc. It returns false, computing nothing, where it does not
// take the shapes (or the CPU lacks VNNI); the caller then runs its few-row kernel.
#pragma once

#include <cstdint>

// y[M, N] float32 = sum over groups g of xs[M, g] * (x_g @ w_g^T): one activation scale per
// row per group of K / groups inputs, each group's integer product exact before scaling;
// then, with colscale [N] (else null), each column times its scale (the weights' channel
// scales: one rounding, as a multiply after the product).
bool JaxllmInt8GroupGemm(const int8_t* x, const float* xs, const int8_t* w, float* y, int64_t m,
                         int64_t k, int64_t n, int64_t groups, const float* colscale);
