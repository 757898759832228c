// Linear attention on the GPU, f32 (Katharopoulos et al., arXiv:2006.16236; chunked causal form of Lightning Attention,
// Qin et al., arXiv:2401.04658) — the same computation as the CPU's LinearAttention for feature maps with F = D:
//   o_i = Σ_j γ^(i−j) φ(q_i)·φ(k_j) v_j  (/ Σ_j γ^(i−j) φ(q_i)·φ(k_j) when normalized),  j ≤ i when causal.
// One thread block per (slice of VSLICE value columns, head, batch): the state S = Σ φ(k)ᵀv of its columns [D × VSLICE]
// and the normalizer z = Σ φ(k) [D] live in shared memory; the sequence is walked in chunks of CHUNK tokens — inside a
// chunk a masked (decayed) product A = φQ·φKᵀ, across chunks the state. Value slices are independent (only A and the
// normalizer are recomputed per slice), which is what spreads a (batch, head) over several multiprocessors.
// No CUDA headers: any NVRTC >= 11.8 compiles it.
//
// Compile-time parameters (-D): MAP 0 = elu+1, 1 = relu, 2 = identity; D_MAX (>= D, multiple of 32), CHUNK, VSLICE.

#ifndef MAP
#define MAP 0
#endif
#ifndef D_MAX
#define D_MAX 128
#endif
#ifndef CHUNK
#define CHUNK 32
#endif
#ifndef VSLICE
#define VSLICE 32
#endif
#define THREADS 256
#define ROW (D_MAX + 1)                    // φQ/φK row stride: +1 float keeps the 32 key rows of a warp in 32 banks

typedef long long i64;

struct LinearParams
{
    const float* q;
    const float* k;
    const float* v;
    float* o;
    const float* decay;                 // [H] or null (γ = 1)
    i64 q_batch, q_row, q_head;
    i64 k_batch, k_row, k_head;
    i64 v_batch, v_row, v_head;
    i64 o_batch, o_row, o_head;
    int seqlen_q, seqlen_k, heads, group, d, dv;
    int causal, normalize;
};

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

extern "C" __global__ void __launch_bounds__(THREADS)
linear_attention(const LinearParams p)
{
    extern __shared__ __align__(16) float smem[];
    float* S = smem;                          // [D_MAX][VSLICE]
    float* z = S + D_MAX * VSLICE;            // [D_MAX]
    float* phiQ = z + D_MAX;                  // [CHUNK][ROW]
    float* phiK = phiQ + CHUNK * ROW;         // [CHUNK][ROW]
    float* V = phiK + CHUNK * ROW;            // [CHUNK][VSLICE]
    float* A = V + CHUNK * VSLICE;            // [CHUNK][CHUNK]
    float* den = A + CHUNK * CHUNK;           // [CHUNK]
    float* gpow = den + CHUNK;                // [CHUNK + 1]: γ^0 .. γ^CHUNK

    const int c0 = blockIdx.x * VSLICE, head = blockIdx.y, batch = blockIdx.z, kv_head = head / p.group;
    const int tid = threadIdx.x, d = p.d;
    const int cols = min(VSLICE, p.dv - c0);
    const float gamma = p.decay != nullptr ? p.decay[head] : 1.f;
    const float* q = p.q + batch * p.q_batch + head * p.q_head;
    const float* k = p.k + batch * p.k_batch + kv_head * p.k_head;
    const float* v = p.v + batch * p.v_batch + kv_head * p.v_head + c0;
    float* o = p.o + batch * p.o_batch + head * p.o_head + c0;

    for (int i = tid; i < D_MAX * VSLICE; i += THREADS) S[i] = 0.f;
    for (int i = tid; i < D_MAX; i += THREADS) z[i] = 0.f;
    if (tid <= CHUNK) gpow[tid] = powf(gamma, (float)tid);
    __syncthreads();

    // Keys (all of them when not causal; the chunk's when causal) enter the state chunk by chunk.
    auto load_keys = [&](int t0, int len)
    {
        for (int i = tid; i < CHUNK * D_MAX; i += THREADS)
        {
            int t = i / D_MAX, f = i % D_MAX;
            phiK[t * ROW + f] = (t < len && f < d) ? feature(k[(i64)(t0 + t) * p.k_row + f]) : 0.f;
        }
        for (int i = tid; i < CHUNK * VSLICE; i += THREADS)
        {
            int t = i / VSLICE, c = i % VSLICE;
            V[i] = (t < len && c < cols) ? v[(i64)(t0 + t) * p.v_row + c] : 0.f;
        }
    };
    // S ← γ^len·S + Σ_u γ^(len−1−u) φK[u]ᵀ V[u];  z likewise.
    auto update_state = [&](int len)
    {
        const float g_len = gpow[len];
        for (int i = tid; i < D_MAX * VSLICE; i += THREADS)
        {
            int f = i / VSLICE, c = i % VSLICE;
            float acc = S[i] * g_len;
            for (int u = 0; u < len; u++) acc = fmaf(phiK[u * ROW + f] * gpow[len - 1 - u], V[u * VSLICE + c], acc);
            S[i] = acc;
        }
        for (int f = tid; f < D_MAX; f += THREADS)
        {
            float acc = z[f] * g_len;
            for (int u = 0; u < len; u++) acc = fmaf(phiK[u * ROW + f], gpow[len - 1 - u], acc);
            z[f] = acc;
        }
    };

    if (!p.causal)
    {
        for (int t0 = 0; t0 < p.seqlen_k; t0 += CHUNK)
        {
            int len = min(CHUNK, p.seqlen_k - t0);
            load_keys(t0, len);
            __syncthreads();
            update_state(len);                // γ = 1 (decay is causal-only)
            __syncthreads();
        }
    }

    for (int t0 = 0; t0 < p.seqlen_q; t0 += CHUNK)
    {
        const int len = min(CHUNK, p.seqlen_q - t0);
        for (int i = tid; i < CHUNK * D_MAX; i += THREADS)
        {
            int t = i / D_MAX, f = i % D_MAX;
            phiQ[t * ROW + f] = (t < len && f < d) ? feature(q[(i64)(t0 + t) * p.q_row + f]) : 0.f;
        }
        if (p.causal) load_keys(t0, len);
        __syncthreads();
        if (p.causal)
        {
            // A[t][u] = γ^(t−u) φQ[t]·φK[u] for u ≤ t.
            for (int i = tid; i < CHUNK * CHUNK; i += THREADS)
            {
                int t = i / CHUNK, u = i % CHUNK;
                float acc = 0.f;
                if (u <= t && t < len)
                {
                    for (int f = 0; f < d; f++) acc = fmaf(phiQ[t * ROW + f], phiK[u * ROW + f], acc);
                    acc *= gpow[t - u];
                }
                A[i] = acc;
            }
        }
        __syncthreads();
        // Normalizer: γ^(t+1)·φQ[t]·z (+ Σ_u A[t][u] when causal).
        for (int t = tid; t < CHUNK; t += THREADS)
        {
            float acc = 0.f;
            for (int f = 0; f < d; f++) acc = fmaf(phiQ[t * ROW + f], z[f], acc);
            float carry = p.causal ? gpow[t + 1] : 1.f;
            acc *= carry;
            if (p.causal) for (int u = 0; u <= t && u < CHUNK; u++) acc += A[t * CHUNK + u];
            den[t] = acc;
        }
        // Output: γ^(t+1)·φQ[t]·S (+ A[t]·V when causal).
        for (int i = tid; i < CHUNK * VSLICE; i += THREADS)
        {
            int t = i / VSLICE, c = i % VSLICE;
            if (t >= len || c >= cols) continue;
            float acc = 0.f;
            for (int f = 0; f < d; f++) acc = fmaf(phiQ[t * ROW + f], S[f * VSLICE + c], acc);
            if (p.causal)
            {
                acc *= gpow[t + 1];
                for (int u = 0; u <= t; u++) acc = fmaf(A[t * CHUNK + u], V[u * VSLICE + c], acc);
            }
            i64 row = (i64)(t0 + t) * p.o_row;
            // den[] is written by other threads of this pass: read it after the barrier below.
            o[row + c] = acc;
        }
        __syncthreads();
        if (p.normalize)
        {
            for (int i = tid; i < CHUNK * VSLICE; i += THREADS)
            {
                int t = i / VSLICE, c = i % VSLICE;
                if (t >= len || c >= cols) continue;
                i64 row = (i64)(t0 + t) * p.o_row;
                o[row + c] = den[t] == 0.f ? 0.f : o[row + c] / den[t];
            }
        }
        if (p.causal)
        {
            update_state(len);
        }
        __syncthreads();
    }
}
