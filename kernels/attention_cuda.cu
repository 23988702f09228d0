// Fused attention forward in CUDA C for the CuPy backend: the same contract as kernels/attention.py
// (SPEC section 3), loaded by kernels/attention_cuda.py with cupy.RawModule.
//
// One thread block per (batch * head, query block of BLOCK_M rows). For each block of BLOCK_N keys:
//   1. scores S = Q K^T, accumulated over Dk in chunks of CHUNK_K through shared-memory tiles;
//   2. scale (times log2 e), the seed's mask (score -> -1e9), keys past the example's length -> -inf;
//   3. online softmax in base 2: running row max m and sum l, per-row rescale factor alpha;
//   4. acc = acc * alpha + P V over Dv in chunks of CHUNK_V, V tiles in shared memory.
// The float32 accumulator (BLOCK_M x Dv) lives in a global scratch buffer, so any head width works
// (the seed's heads are D wide: 1280 and more). Each scratch element is read and written by one fixed
// thread, so no barrier is needed between a store and the next key block's load of it.
// Keys at or past the length are never loaded; every key block the loop visits holds a valid key, so
// the running max is finite after the first block (no inf - inf).
// The tiles take 57 KiB of shared memory, above the 48 KiB default: the launcher raises the limit.

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define BLOCK_M 16
#define BLOCK_N 64
#define CHUNK_K 64
#define CHUNK_V 128
#define THREADS 256
// -inf without <cmath>, which NVRTC (CuPy's compiler) does not provide.
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void store(float* p, float x) { *p = x; }  // float32 output, any input
__device__ __forceinline__ void store(__half* p, float x) { *p = __float2half_rn(x); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }

struct Shape {
    long long heads, len_q, len_k, dim_k, dim_v;
    long long q_b, q_h, q_m, q_d;  // element strides; a head stride of 0 broadcasts one head
    long long k_b, k_h, k_n, k_d;
    long long v_b, v_h, v_n, v_d;
    long long m_b, m_m, m_n;       // mask strides (m_b = 0 when one mask serves the batch)
    long long o_b, o_h, o_m, o_d;
};

template <typename T, typename TOut>
__device__ void attention_forward(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                  const unsigned char* __restrict__ mask, const long long* __restrict__ k_lengths,
                                  TOut* __restrict__ out, float* __restrict__ lse, float* __restrict__ scratch,
                                  const Shape s, const float qk_scale, const float mask_fill, const int has_mask,
                                  const int has_lengths) {
    extern __shared__ float smem[];
    float* q_tile = smem;                                // BLOCK_M x CHUNK_K
    float* k_tile = q_tile + BLOCK_M * CHUNK_K;          // BLOCK_N x (CHUNK_K + 1), padded against bank conflicts
    float* v_tile = k_tile + BLOCK_N * (CHUNK_K + 1);    // BLOCK_N x CHUNK_V
    float* scores = v_tile + BLOCK_N * CHUNK_V;          // BLOCK_M x BLOCK_N
    float* row_max = scores + BLOCK_M * BLOCK_N;         // BLOCK_M
    float* row_sum = row_max + BLOCK_M;                  // BLOCK_M
    float* row_alpha = row_sum + BLOCK_M;                // BLOCK_M

    const int tid = threadIdx.x;
    // Batch x heads on grid x (up to 2**31 - 1): grid y stops at 65535, which B * H can pass.
    const long long bh = blockIdx.x;
    const long long m0 = (long long)blockIdx.y * BLOCK_M;
    const long long b = bh / s.heads, h = bh % s.heads;
    const T* q_base = q + b * s.q_b + h * s.q_h;
    const T* k_base = k + b * s.k_b + h * s.k_h;
    const T* v_base = v + b * s.v_b + h * s.v_h;
    float* acc = scratch + bh * s.len_q * s.dim_v;       // this (batch, head)'s rows, contiguous

    long long k_len = s.len_k;
    if (has_lengths) {
        k_len = k_lengths[b] < s.len_k ? k_lengths[b] : s.len_k;  // a bad length never reads past K
    }
    if (tid < BLOCK_M) {
        row_max[tid] = NEG_INF;
        row_sum[tid] = 0.0f;
    }

    for (long long n0 = 0; n0 < k_len; n0 += BLOCK_N) {
        // 1. scores, over Dk-chunks
        for (int i = tid; i < BLOCK_M * BLOCK_N; i += THREADS) scores[i] = 0.0f;
        for (long long d0 = 0; d0 < s.dim_k; d0 += CHUNK_K) {
            __syncthreads();
            for (int i = tid; i < BLOCK_M * CHUNK_K; i += THREADS) {
                const long long row = m0 + i / CHUNK_K, col = d0 + i % CHUNK_K;
                q_tile[i] = (row < s.len_q && col < s.dim_k) ? to_float(q_base[row * s.q_m + col * s.q_d]) : 0.0f;
            }
            for (int i = tid; i < BLOCK_N * CHUNK_K; i += THREADS) {
                const long long key = n0 + i / CHUNK_K, col = d0 + i % CHUNK_K;
                k_tile[(i / CHUNK_K) * (CHUNK_K + 1) + i % CHUNK_K] =
                    (key < k_len && col < s.dim_k) ? to_float(k_base[key * s.k_n + col * s.k_d]) : 0.0f;
            }
            __syncthreads();
            for (int i = tid; i < BLOCK_M * BLOCK_N; i += THREADS) {
                const int row = i / BLOCK_N, key = i % BLOCK_N;
                float dot = 0.0f;
#pragma unroll 8
                for (int d = 0; d < CHUNK_K; ++d) dot += q_tile[row * CHUNK_K + d] * k_tile[key * (CHUNK_K + 1) + d];
                scores[i] += dot;
            }
        }
        __syncthreads();

        // 2. scale, the seed's mask, key padding
        for (int i = tid; i < BLOCK_M * BLOCK_N; i += THREADS) {
            const long long row = m0 + i / BLOCK_N, key = n0 + i % BLOCK_N;
            float value = scores[i] * qk_scale;
            if (has_mask && row < s.len_q && key < k_len &&
                mask[b * s.m_b + row * s.m_m + key * s.m_n] != 0) {
                value = mask_fill + value * 0.0f;  // the fill, but Inf or NaN (an overflow) stays NaN
            }
            scores[i] = key < k_len ? value : NEG_INF;
        }
        __syncthreads();

        // 3. online softmax, one thread per row
        if (tid < BLOCK_M) {
            float block_max = NEG_INF;
            for (int n = 0; n < BLOCK_N; ++n) block_max = fmaxf(block_max, scores[tid * BLOCK_N + n]);
            const float new_max = fmaxf(row_max[tid], block_max);
            const float alpha = exp2f(row_max[tid] - new_max);
            float block_sum = 0.0f;
            for (int n = 0; n < BLOCK_N; ++n) {
                const float p = exp2f(scores[tid * BLOCK_N + n] - new_max);
                scores[tid * BLOCK_N + n] = p;
                block_sum += p;
            }
            row_sum[tid] = row_sum[tid] * alpha + block_sum;
            row_max[tid] = new_max;
            row_alpha[tid] = alpha;
        }

        // 4. acc = acc * alpha + P V, over Dv-chunks; thread tid owns the same elements every time
        for (long long d0 = 0; d0 < s.dim_v; d0 += CHUNK_V) {
            __syncthreads();
            for (int i = tid; i < BLOCK_N * CHUNK_V; i += THREADS) {
                const long long key = n0 + i / CHUNK_V, col = d0 + i % CHUNK_V;
                v_tile[i] = (key < k_len && col < s.dim_v) ? to_float(v_base[key * s.v_n + col * s.v_d]) : 0.0f;
            }
            __syncthreads();
            for (int i = tid; i < BLOCK_M * CHUNK_V; i += THREADS) {
                const int row = i / CHUNK_V;
                const long long grow = m0 + row, col = d0 + i % CHUNK_V;
                if (grow >= s.len_q || col >= s.dim_v) continue;
                float sum = 0.0f;
                for (int n = 0; n < BLOCK_N; ++n) sum += scores[row * BLOCK_N + n] * v_tile[n * CHUNK_V + i % CHUNK_V];
                float* slot = acc + grow * s.dim_v + col;
                *slot = (n0 == 0 ? 0.0f : *slot * row_alpha[row]) + sum;
            }
        }
        __syncthreads();
    }

    // normalise and write; lse in natural-log units
    for (int i = tid; i < BLOCK_M * CHUNK_V; i += THREADS) {
        const int row = i / CHUNK_V;
        const long long grow = m0 + row;
        if (grow >= s.len_q) continue;
        const float inv = 1.0f / row_sum[row];
        for (long long col = i % CHUNK_V; col < s.dim_v; col += CHUNK_V) {
            store(out + b * s.o_b + h * s.o_h + grow * s.o_m + col * s.o_d, acc[grow * s.dim_v + col] * inv);
        }
    }
    if (tid < BLOCK_M && m0 + tid < s.len_q) {
        lse[bh * s.len_q + m0 + tid] = (row_max[tid] + log2f(row_sum[tid])) * 0.6931471805599453f;
    }
}

// One entry point per (input, output) dtype; float32 output keeps the accumulator's precision for
// callers that reduce further (the fusion sums its heads).
#define DEFINE_KERNEL(NAME, T, TOut)                                                                         \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                    \
    NAME(const T* q, const T* k, const T* v, const unsigned char* mask, const long long* k_lengths, TOut* out, \
         float* lse, float* scratch, const Shape s, const float qk_scale, const float mask_fill,             \
         const int has_mask, const int has_lengths) {                                                         \
        attention_forward<T, TOut>(q, k, v, mask, k_lengths, out, lse, scratch, s, qk_scale, mask_fill,      \
                                   has_mask, has_lengths);                                                    \
    }

DEFINE_KERNEL(attention_fwd_float32, float, float)
DEFINE_KERNEL(attention_fwd_float16, __half, __half)
DEFINE_KERNEL(attention_fwd_bfloat16, __nv_bfloat16, __nv_bfloat16)
DEFINE_KERNEL(attention_fwd_float16_out_float32, __half, float)
DEFINE_KERNEL(attention_fwd_bfloat16_out_float32, __nv_bfloat16, float)
