// qmatvec.cc's w8a8 pieces on plain pointers, for kernels of this library that run them
// inside a larger call (layer.cc).
#pragma once

#include <cstdint>

// Rows r0..r1 of x [rows, k] float32 to int8 codes q [rows, k] with one scale per row per
// group of k / groups inputs, s [rows, groups]: jaxllm.quant.matmul.quantize_rows' codes.
void JaxllmQuantizeRows(const float* x, int64_t k, int64_t groups, int8_t* q, float* s,
                        int64_t r0, int64_t r1);

// y[rows, n] = sum over groups g of s[:, g] * (q_g @ w_g^T), each group's integer product
// exact, then times colscale [n] per column unless it is null; w int8 [n, k]. Runs on the
// pool (do not call from inside a pool task).
void JaxllmW8A8Product(const int8_t* q, const float* s, const int8_t* w, float* y, int64_t rows,
                       int64_t k, int64_t n, int64_t groups, const float* colscale);
