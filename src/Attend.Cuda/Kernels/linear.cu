// Linear attention on the GPU, f32 (Katharopoulos et al., arXiv:2006.16236; chunked causal form of Lightning Attention,
// Qin et al., arXiv:2401.04658) — the same computation as the CPU's LinearAttention for feature maps with F = D:
//   o_i = Σ_j γ^(i−j) φ(q_i)·φ(k_j) v_j  (/ Σ_j γ^(i−j) φ(q_i)·φ(k_j) when normalized),  j ≤ i when causal.
// No CUDA headers: any NVRTC >= 11.8 compiles it.
//
// Compile-time parameters (-D): MAP 0 = elu+1, 1 = relu, 2 = identity; D_MAX (>= D, multiple of 32), CHUNK.

#ifndef MAP
#define MAP 0
#endif
#ifndef D_MAX
#define D_MAX 128
#endif
#ifndef CHUNK
#define CHUNK 32
#endif
#define THREADS 256
#define ROW (D_MAX + 1)                    // φQ/φK row stride: +1 float keeps the 32 key rows of a warp in 32 banks

typedef long long i64;

__device__ __forceinline__ float feature(float x)
{
#if MAP == 0
    return x > 0.f ? x + 1.f : __expf(x);
#elif MAP == 1
    return x > 0.f ? x : 0.f;
#else
    return x;
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// Chunk-parallel form (as flash-linear-attention's chunked kernels). The first version walked the sequence chunk
// after chunk with one block per (32 value columns, head): latency-bound, 48.3 ms at S = 65536 (H 8, D 64) on the
// H100, 4.7× our dense causal bf16 kernel; this form took 9.0 ms (docs/perf/cuda-sparse.md). Three launches, each
// parallel over chunks:
//   1. linear_chunk_state:  per chunk c, ΔS_c = Σ_u γ^(len−1−u) φK[u]ᵀ [V[u] | 1]   ([D, Dv + 1]: the last column
//                           is the normalizer's Σ φK).
//   2. linear_state_scan:   per state element, walk the chunks: S_c ← the state before chunk c (causal, decayed by
//                           γ^len per chunk), or the total in slot 0 (not causal).
//   3. linear_chunk_output: per query chunk, o[t] = γ^(t+1) φQ[t]·S_c + Σ_{u≤t} γ^(t−u) (φQ[t]·φK[u]) [V[u] | 1]
//                           (not causal: φQ[t]·S_total); the last column is the normalizer.
// ---------------------------------------------------------------------------------------------------------------
#define DV1_MAX (D_MAX + 1)                // value columns + the normalizer's column of ones
#define SCAN_AHEAD 16

struct ChunkParams
{
    const float* q;
    const float* k;
    const float* v;
    float* o;
    const float* decay;                 // [H] or null (γ = 1)
    float* state;                       // [B, H, chunks, D, Dv + 1]
    i64 q_batch, q_row, q_head;
    i64 k_batch, k_row, k_head;
    i64 v_batch, v_row, v_head;
    i64 o_batch, o_row, o_head;
    int seqlen_q, seqlen_k, heads, group, d, dv, chunks, causal, normalize;
};

__device__ __forceinline__ float* chunk_state(const ChunkParams& p, int batch, int head, int c)
{
    return p.state + (((i64)batch * p.heads + head) * p.chunks + c) * (i64)p.d * (p.dv + 1);
}

extern "C" __global__ void __launch_bounds__(THREADS)
linear_chunk_state(const ChunkParams p)
{
    extern __shared__ __align__(16) float smem[];
    float* phiK = smem;                       // [CHUNK][ROW], weighted by γ^(len−1−u)
    float* V = phiK + CHUNK * ROW;            // [CHUNK][DV1_MAX]: values, then 1

    const int c = blockIdx.x, head = blockIdx.y, batch = blockIdx.z, kv_head = head / p.group, tid = threadIdx.x;
    const int t0 = c * CHUNK, len = min(CHUNK, p.seqlen_k - t0), dv1 = p.dv + 1;
    const float gamma = p.causal && p.decay != nullptr ? p.decay[head] : 1.f;
    const float* k = p.k + batch * p.k_batch + kv_head * p.k_head + (i64)t0 * p.k_row;
    const float* v = p.v + batch * p.v_batch + kv_head * p.v_head + (i64)t0 * p.v_row;
    for (int i = tid; i < CHUNK * D_MAX; i += THREADS)
    {
        int u = i / D_MAX, f = i % D_MAX;
        phiK[u * ROW + f] = (u < len && f < p.d) ? feature(k[(i64)u * p.k_row + f]) * powf(gamma, (float)(len - 1 - u)) : 0.f;
    }
    for (int i = tid; i < CHUNK * DV1_MAX; i += THREADS)
    {
        int u = i / DV1_MAX, col = i % DV1_MAX;
        V[i] = u >= len ? 0.f : col < p.dv ? v[(i64)u * p.v_row + col] : col == p.dv ? 1.f : 0.f;
    }
    __syncthreads();
    float* out = chunk_state(p, batch, head, c);
    for (int i = tid; i < p.d * dv1; i += THREADS)
    {
        int f = i / dv1, col = i % dv1;
        float acc = 0.f;
        for (int u = 0; u < len; u++) acc = fmaf(phiK[u * ROW + f], V[u * DV1_MAX + col], acc);
        out[i] = acc;
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
linear_state_scan(const ChunkParams p)
{
    const int head = blockIdx.y, batch = blockIdx.z, dv1 = p.dv + 1;
    const int e = blockIdx.x * THREADS + threadIdx.x;
    if (e >= p.d * dv1) return;
    const float gamma = p.causal && p.decay != nullptr ? p.decay[head] : 1.f;
    const float g_full = powf(gamma, (float)CHUNK);
    const i64 stride = (i64)p.d * dv1;
    float* base = chunk_state(p, batch, head, 0) + e;
    float run = 0.f;
    // SCAN_AHEAD chunks' values are loaded before any of them is rewritten: the walk is one dependent chain per
    // thread, and with one load in flight per step it waited on memory latency chunk after chunk.
    for (int c0 = 0; c0 < p.chunks; c0 += SCAN_AHEAD)
    {
        float x[SCAN_AHEAD];
#pragma unroll
        for (int j = 0; j < SCAN_AHEAD; j++) x[j] = c0 + j < p.chunks ? base[(i64)(c0 + j) * stride] : 0.f;
#pragma unroll
        for (int j = 0; j < SCAN_AHEAD; j++)
        {
            const int c = c0 + j;
            if (c >= p.chunks) break;
            if (p.causal)
            {
                base[(i64)c * stride] = run;                    // the state before chunk c
                const int len = min(CHUNK, p.seqlen_k - c * CHUNK);
                run = fmaf(run, len == CHUNK ? g_full : powf(gamma, (float)len), x[j]);
            }
            else run += x[j];
        }
    }
    if (!p.causal) *(chunk_state(p, batch, head, 0) + e) = run;
}

extern "C" __global__ void __launch_bounds__(THREADS)
linear_chunk_output(const ChunkParams p)
{
    extern __shared__ __align__(16) float smem[];
    float* phiQ = smem;                       // [CHUNK][ROW]
    float* phiK = phiQ + CHUNK * ROW;         // [CHUNK][ROW]
    float* V = phiK + CHUNK * ROW;            // [CHUNK][DV1_MAX]
    float* A = V + CHUNK * DV1_MAX;           // [CHUNK][CHUNK]
    float* den = A + CHUNK * CHUNK;           // [CHUNK]
    float* sS = den + CHUNK;                  // [D][Dv + 1]: the state this chunk starts from

    const int c = blockIdx.x, head = blockIdx.y, batch = blockIdx.z, kv_head = head / p.group, tid = threadIdx.x;
    const int t0 = c * CHUNK, len = min(CHUNK, p.seqlen_q - t0), dv1 = p.dv + 1;
    const float gamma = p.causal && p.decay != nullptr ? p.decay[head] : 1.f;
    const float* q = p.q + batch * p.q_batch + head * p.q_head + (i64)t0 * p.q_row;
    const float* k = p.k + batch * p.k_batch + kv_head * p.k_head + (i64)t0 * p.k_row;
    const float* v = p.v + batch * p.v_batch + kv_head * p.v_head + (i64)t0 * p.v_row;
    const float* S = chunk_state(p, batch, head, p.causal ? c : 0);
    for (int i = tid; i < p.d * dv1; i += THREADS) sS[i] = S[i];
    for (int i = tid; i < CHUNK * D_MAX; i += THREADS)
    {
        int t = i / D_MAX, f = i % D_MAX;
        phiQ[t * ROW + f] = (t < len && f < p.d) ? feature(q[(i64)t * p.q_row + f]) : 0.f;
        if (p.causal) phiK[t * ROW + f] = (t < len && f < p.d) ? feature(k[(i64)t * p.k_row + f]) : 0.f;
    }
    if (p.causal)
        for (int i = tid; i < CHUNK * DV1_MAX; i += THREADS)
        {
            int u = i / DV1_MAX, col = i % DV1_MAX;
            V[i] = u >= len ? 0.f : col < p.dv ? v[(i64)u * p.v_row + col] : col == p.dv ? 1.f : 0.f;
        }
    __syncthreads();
    if (p.causal)
    {
        for (int i = tid; i < CHUNK * CHUNK; i += THREADS)
        {
            int t = i / CHUNK, u = i % CHUNK;
            float acc = 0.f;
            if (u <= t && t < len)
            {
                for (int f = 0; f < p.d; f++) acc = fmaf(phiQ[t * ROW + f], phiK[u * ROW + f], acc);
                acc *= powf(gamma, (float)(t - u));
            }
            A[i] = acc;
        }
        __syncthreads();
    }
    // Every (row, column) of the chunk, the normalizer's column included; the normalizers first.
    for (int pass = 0; pass < 2; pass++)
    {
        for (int i = tid; i < CHUNK * dv1; i += THREADS)
        {
            int t = i / dv1, col = i % dv1;
            if (t >= len || (pass == 0) != (col == p.dv)) continue;
            float acc = 0.f;
            for (int f = 0; f < p.d; f++) acc = fmaf(phiQ[t * ROW + f], sS[f * dv1 + col], acc);
            if (p.causal)
            {
                acc *= powf(gamma, (float)(t + 1));
                for (int u = 0; u <= t; u++) acc = fmaf(A[t * CHUNK + u], V[u * DV1_MAX + col], acc);
            }
            if (pass == 0) den[t] = acc;
            else p.o[batch * p.o_batch + head * p.o_head + (i64)(t0 + t) * p.o_row + col] = !p.normalize ? acc : den[t] == 0.f ? 0.f : acc / den[t];
        }
        __syncthreads();
    }
}
