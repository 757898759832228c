// XAttention's antidiagonal block estimate on the tensor cores (Xu et al., "XAttention: Block Sparse Attention with
// Antidiagonal Scoring", arXiv:2503.16428) — the device side of the CPU's XAttentionSelector, feeding select.cu's
// select_blocks (mass mode) and the CSR compaction shared with the other GPU selectors.
//
// The sum of a (query block, key block) tile's scores along antidiagonals of stride s is a product of regrouped rows:
// query group r is the concatenation of queries r·s + s−1, …, r·s (reversed), key group c of keys c·s, …, c·s + s−1,
// so Σ_t q[r·s+s−1−t]·k[c·s+t] is one dot product of length s·D. The estimate is then the softmax of these
// (S/s)² scores (scale / s) per query group over its visible key groups, summed over the groups of each
// (query block, key block): block/s rows × block/s columns — the same "mass" the CPU sums.
//
// Two launches per chunk of heads:
//   1. antidiagonal_lse:  one thread block per 64 query groups (4 warps × 16 rows): every visible 64-column tile of
//      key groups as S = Q·Kᵀ with mma.sync m16n8k16 (bf16, or f16 for f16 inputs; fp32 accumulators), the inner
//      dimension s·D staged 64 at a time through shared memory (the gather does the regrouping); per (row, key
//      block) log Σ exp of its columns goes to a scratch, per row the running log-sum-exp stays in registers.
//   2. (same kernel, after a barrier) each query block's mass per key block: Σ over its rows of
//      exp(block_lse − row_lse), written to mass [B, H, query blocks, key blocks] — rows read back from the scratch
//      the thread block itself wrote (L2-resident).
// The scratch is [heads of the chunk · B, query groups, key blocks] floats; the host sizes the chunk of heads.
//
// Compile-time parameters (-D): SRC_T 0 = f32 (rounded to bf16 operands), 1 = f16, 2 = bf16; GROUP_COLS = block / s,
// the key groups (and query groups) per block: 8, 16, 32 or 64.
// No CUDA headers: any NVRTC >= 11.8 compiles it (PTX for sm_80 and later).

#ifndef SRC_T
#define SRC_T 2
#endif
#ifndef GROUP_COLS
#define GROUP_COLS 16
#endif
#if GROUP_COLS != 8 && GROUP_COLS != 16 && GROUP_COLS != 32 && GROUP_COLS != 64
#error "GROUP_COLS (block / stride) must be 8, 16, 32 or 64"
#endif

#define THREADS 128
#define EST_ROWS 64                 // query groups per thread block: 4 warps × 16
#define EST_COLS 64                 // key groups per tile
#define EST_K 64                    // inner-dimension elements staged per step
#define PITCH (EST_K + 8)           // shared-memory row pitch in halves: 144 bytes, so ldmatrix's 8 rows hit distinct banks
#define TILES_PER_BLOCK (GROUP_COLS / 8)
#define BLOCKS_PER_TILE (EST_COLS / GROUP_COLS)

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

#define NEG_INF __int_as_float(0xff800000)

struct AntidiagonalParams
{
    const void* q;              // [B, Sq, H, D]
    const void* k;              // [B, Skv, Hkv, D]
    float* block_lse;           // scratch [launch heads · B, q groups, key blocks]
    float* mass;                // [B, H, query blocks, key blocks]
    i64 q_batch, q_row, q_head, k_batch, k_row, k_head;
    int heads, group, d, stride, head0;
    int seqlen_q, seqlen_k, causal, causal_offset;
    int q_groups, k_groups, block, q_blocks, k_blocks;
    float scale;                // softmax scale / stride
};

__device__ __forceinline__ u32 pack2(float lo, float hi)
{
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// 8 consecutive elements at base[i] as operand halves (i a multiple of 8; zeros when !valid).
__device__ __forceinline__ uint4 load8(const void* base, i64 i, bool valid)
{
    if (!valid) return make_uint4(0u, 0u, 0u, 0u);
#if SRC_T == 0
    const float4 a = *(const float4*)((const float*)base + i), b = *(const float4*)((const float*)base + i + 4);
    return make_uint4(pack2(a.x, a.y), pack2(a.z, a.w), pack2(b.x, b.y), pack2(b.z, b.w));
#else
    return *(const uint4*)((const u16*)base + i);
#endif
}

__device__ __forceinline__ u32 smem_u32(const void* p)
{
    return (u32)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void ldmatrix_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}

__device__ __forceinline__ void cp_async16(u32 dst, const void* src, bool valid)
{
    int bytes = valid ? 16 : 0;     // 0 bytes read: the 16 destination bytes are zero-filled
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

__device__ __forceinline__ void cp_async_wait_one() { asm volatile("cp.async.wait_group 1;\n" ::); }

__device__ __forceinline__ void mma16816(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1)
{
#if SRC_T == 1
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// Merges (m2, s2) into the running (m, s) of Σ exp: both as max and Σ exp(x − max).
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2)
{
    if (m2 == NEG_INF) return;
    if (m == NEG_INF) { m = m2; s = s2; return; }
    const float mx = fmaxf(m, m2);
    s = s * __expf(m - mx) + s2 * __expf(m2 - mx);
    m = mx;
}

// Key groups query group r sees: those whose first key its last query may see.
__device__ __forceinline__ int visible_groups(const AntidiagonalParams& p, int r)
{
    if (!p.causal) return p.k_groups;
    const int last = min(r * p.stride + p.stride, p.seqlen_q) - 1;
    const int keys = max(0, min(p.seqlen_k, last + p.causal_offset + 1));
    return min(p.k_groups, (keys + p.stride - 1) / p.stride);
}

// Stages the operands of (key-group tile c0, inner chunk e0) — 64 rows × 8 vectors of 8 elements per operand, 4 of
// each per thread — regrouping on the way: query group r's element e is query r·s + s−1−e/D, channel e mod D; key
// group c's is key c·s + e/D. 16-bit inputs go by cp.async (zero-filled outside the tensors); f32 is rounded here.
__device__ __forceinline__ void stage(const AntidiagonalParams& p, u16* sq, u16* sk, int r_base, int c0, int e0, i64 qbase, i64 kbase, int e_total)
{
#pragma unroll
    for (int i = 0; i < 4; i++)
    {
        const int v = threadIdx.x + i * THREADS, row = v >> 3, chunk = v & 7;
        const int e = e0 + chunk * 8, slot = e / p.d, c = e - slot * p.d;
        const int gq = r_base + row, tq = gq * p.stride + (p.stride - 1 - slot);
        const int gk = c0 + row, tk = gk * p.stride + slot;
        const bool q_ok = gq < p.q_groups && e < e_total && tq < p.seqlen_q, k_ok = gk < p.k_groups && e < e_total && tk < p.seqlen_k;
        const i64 qi = qbase + (i64)tq * p.q_row + c, ki = kbase + (i64)tk * p.k_row + c;
#if SRC_T == 0
        *(uint4*)&sq[row * PITCH + chunk * 8] = load8(p.q, qi, q_ok);
        *(uint4*)&sk[row * PITCH + chunk * 8] = load8(p.k, ki, k_ok);
#else
        cp_async16(smem_u32(&sq[row * PITCH + chunk * 8]), (const u16*)p.q + (q_ok ? qi : 0), q_ok);
        cp_async16(smem_u32(&sk[row * PITCH + chunk * 8]), (const u16*)p.k + (k_ok ? ki : 0), k_ok);
#endif
    }
}

// Grid (ceil(q groups / 64), heads of this launch, B), THREADS threads.
extern "C" __global__ void __launch_bounds__(THREADS) antidiagonal_lse(const AntidiagonalParams p)
{
    __shared__ __align__(16) u16 sq[2][EST_ROWS * PITCH];   // two stages: the next chunk loads while this one multiplies
    __shared__ __align__(16) u16 sk[2][EST_COLS * PITCH];
    __shared__ float row_lse[EST_ROWS];
    const int hl = blockIdx.y, h = p.head0 + hl, b = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int r_base = blockIdx.x * EST_ROWS;
    const int r_last = min(r_base + EST_ROWS, p.q_groups) - 1;
    const int cols = visible_groups(p, r_last);
    const int e_total = p.stride * p.d;
    const i64 qbase = b * p.q_batch + h * p.q_head, kbase = b * p.k_batch + (h / p.group) * p.k_head;
    float* lse_rows = p.block_lse + ((i64)(hl * gridDim.z + b) * p.q_groups) * p.k_blocks;

    // This thread's two rows (g and g + 8 of its warp's 16) and what they see.
    const int row0 = r_base + warp * 16 + g, row1 = row0 + 8;
    const int vis0 = row0 < p.q_groups ? visible_groups(p, row0) : 0, vis1 = row1 < p.q_groups ? visible_groups(p, row1) : 0;
    float m0 = NEG_INF, s0 = 0.f, m1 = NEG_INF, s1 = 0.f;

    // One stream of (tile, inner chunk) steps, double-buffered across tile boundaries.
    const int chunks = (e_total + EST_K - 1) / EST_K, steps = ((cols + EST_COLS - 1) / EST_COLS) * chunks;
    if (steps > 0) stage(p, sq[0], sk[0], r_base, 0, 0, qbase, kbase, e_total);
    cp_async_commit();
    float acc[8][4];
    for (int it = 0; it < steps; it++)
    {
        const int tile = it / chunks, ei = it - tile * chunks, c0 = tile * EST_COLS;
        if (ei == 0)
        {
#pragma unroll
            for (int n = 0; n < 8; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
        }
        if (it + 1 < steps)
        {
            const int next_tile = (it + 1) / chunks;
            stage(p, sq[(it + 1) & 1], sk[(it + 1) & 1], r_base, next_tile * EST_COLS, ((it + 1) - next_tile * chunks) * EST_K, qbase, kbase, e_total);
        }
        cp_async_commit();
        cp_async_wait_one();   // this step's chunk has landed
        __syncthreads();
        const u16* tq = sq[it & 1];
        const u16* tk = sk[it & 1];
#pragma unroll
        for (int kk = 0; kk < EST_K / 16; kk++)
        {
            u32 a0, a1, a2, a3;
            ldmatrix_x4(smem_u32(&tq[(warp * 16 + (lane & 15)) * PITCH + kk * 16 + (lane >> 4) * 8]), a0, a1, a2, a3);
#pragma unroll
            for (int np = 0; np < 4; np++)
            {
                u32 b0, b1, b2, b3;
                const int key = np * 16 + (lane & 7) + (lane >> 4) * 8;
                ldmatrix_x4(smem_u32(&tk[key * PITCH + kk * 16 + ((lane >> 3) & 1) * 8]), b0, b1, b2, b3);
                mma16816(acc[2 * np], a0, a1, a2, a3, b0, b1);
                mma16816(acc[2 * np + 1], a0, a1, a2, a3, b2, b3);
            }
        }
        __syncthreads();   // the next step stages into the buffer just read
        if (ei != chunks - 1) continue;
        // Per key block of the tile: max and Σ exp over its columns for both rows (a quad of lanes holds a row's 8
        // columns of each n8 tile), written as log Σ exp; merged into the rows' running sums.
#pragma unroll
        for (int kbl = 0; kbl < BLOCKS_PER_TILE; kbl++)
        {
            float bm0 = NEG_INF, bm1 = NEG_INF;
#pragma unroll
            for (int n = kbl * TILES_PER_BLOCK; n < (kbl + 1) * TILES_PER_BLOCK; n++)
#pragma unroll
                for (int i = 0; i < 4; i++)
                {
                    const int col = c0 + n * 8 + 2 * t4 + (i & 1);
                    const bool upper = i >= 2;
                    const float x = (col < (upper ? vis1 : vis0)) ? acc[n][i] * p.scale : NEG_INF;
                    acc[n][i] = x;
                    if (upper) bm1 = fmaxf(bm1, x); else bm0 = fmaxf(bm0, x);
                }
            bm0 = fmaxf(bm0, __shfl_xor_sync(0xffffffffu, bm0, 1));
            bm0 = fmaxf(bm0, __shfl_xor_sync(0xffffffffu, bm0, 2));
            bm1 = fmaxf(bm1, __shfl_xor_sync(0xffffffffu, bm1, 1));
            bm1 = fmaxf(bm1, __shfl_xor_sync(0xffffffffu, bm1, 2));
            float bs0 = 0.f, bs1 = 0.f;
#pragma unroll
            for (int n = kbl * TILES_PER_BLOCK; n < (kbl + 1) * TILES_PER_BLOCK; n++)
#pragma unroll
                for (int i = 0; i < 4; i++)
                {
                    if (i >= 2) bs1 += bm1 == NEG_INF ? 0.f : __expf(acc[n][i] - bm1);
                    else bs0 += bm0 == NEG_INF ? 0.f : __expf(acc[n][i] - bm0);
                }
            bs0 += __shfl_xor_sync(0xffffffffu, bs0, 1);
            bs0 += __shfl_xor_sync(0xffffffffu, bs0, 2);
            bs1 += __shfl_xor_sync(0xffffffffu, bs1, 1);
            bs1 += __shfl_xor_sync(0xffffffffu, bs1, 2);
            const int kb = c0 / GROUP_COLS + kbl;
            if (t4 == 0 && kb < p.k_blocks)
            {
                if (row0 < p.q_groups) lse_rows[(i64)row0 * p.k_blocks + kb] = bm0 == NEG_INF ? NEG_INF : bm0 + __logf(bs0);
                if (row1 < p.q_groups) lse_rows[(i64)row1 * p.k_blocks + kb] = bm1 == NEG_INF ? NEG_INF : bm1 + __logf(bs1);
            }
            lse_merge(m0, s0, bm0, bs0);
            lse_merge(m1, s1, bm1, bs1);
        }
    }
    if (t4 == 0)
    {
        row_lse[warp * 16 + g] = m0 == NEG_INF ? NEG_INF : m0 + __logf(s0);
        row_lse[warp * 16 + g + 8] = m1 == NEG_INF ? NEG_INF : m1 + __logf(s1);
    }
    __syncthreads();   // also makes this block's scratch writes visible to its threads

    // Each query block of these rows: Σ over its rows of exp(block lse − row lse) per visible key block.
    const int qb0 = r_base / GROUP_COLS;
    const int qbs = min(EST_ROWS / GROUP_COLS, p.q_blocks - qb0);
    const int kb_max = (cols + GROUP_COLS - 1) / GROUP_COLS;
    for (int i = threadIdx.x; i < qbs * kb_max; i += THREADS)
    {
        const int qbl = i / kb_max, kb = i - qbl * kb_max, qb = qb0 + qbl;
        int visible = p.k_blocks;
        if (p.causal)
        {
            const int last = min((qb + 1) * p.block, p.seqlen_q) - 1;
            const int keys = max(0, min(p.seqlen_k, last + p.causal_offset + 1));
            visible = (keys + p.block - 1) / p.block;
        }
        if (kb >= visible) continue;
        float sum = 0.f;
        for (int rl = qbl * GROUP_COLS; rl < (qbl + 1) * GROUP_COLS; rl++)
        {
            const int r = r_base + rl;
            const float total = row_lse[rl];
            if (r >= p.q_groups || total == NEG_INF) continue;
            const float x = lse_rows[(i64)r * p.k_blocks + kb];
            if (x != NEG_INF) sum += __expf(x - total);
        }
        p.mass[(((i64)b * p.heads + h) * p.q_blocks + qb) * p.k_blocks + kb] = sum;
    }
}
