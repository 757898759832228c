// Fine-grained block estimates on the tensor cores, feeding select.cu's select_blocks (mass mode) and the CSR
// compaction shared with the other GPU selectors: XAttention's antidiagonal scores (below) and SALE's low-bit scores
// (the second half of the file). Both run their products through tile_products (mma.sync m16n8k16, bf16 — f16 for f16
// inputs — fp32 accumulators, operands staged by cp.async in two buffers) and keep a per-(row, key block) statistic in
// a scratch [heads of the launch · B, rows, key blocks] floats; the host runs the heads in chunks so it stays bounded.
//
// XAttention (Xu et al., "XAttention: Block Sparse Attention with Antidiagonal Scoring", arXiv:2503.16428), the device
// side of the CPU's XAttentionSelector. The sum of a (query block, key block) tile's scores along antidiagonals of
// stride s is a product of regrouped rows: query group r is the concatenation of queries r·s + s−1, …, r·s (reversed),
// key group c of keys c·s, …, c·s + s−1, so Σ_t q[r·s+s−1−t]·k[c·s+t] is one dot product of length s·D (the loader
// regroups while staging). The estimate is the softmax of these (S/s)² scores (scale / s) per query group over its
// visible key groups, summed over the groups of each (query block, key block) — the "mass" the CPU sums.
// antidiagonal_lse: one thread block per 128 query groups (8 warps × 16 rows) walks every visible 128-column tile of
// key groups; per (row, key block) log Σ exp goes to the scratch and each row's running log-sum-exp stays in registers;
// after a barrier the block turns its rows into each query block's mass per key block, Σ exp(block lse − row lse),
// reading back the scratch it wrote (L2-resident).
//
// The grid runs heads fastest and row tiles last-first: under a causal mask late rows see the most columns, and
// starting those thread blocks first lets the short ones fill the tail (SM active 55% → 77% of the elapsed time,
// docs/perf/cuda-sparse.md).
//
// Compile-time parameters (-D): SRC_T 0 = f32 (rounded to bf16 operands), 1 = f16, 2 = bf16; GROUP_COLS = block / s,
// the key groups (and query groups) per block: 8, 16, 32 or 64 (SALE's kernels ignore it).
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
// INT8_OPS 1 (SALE): the operands are int8 integers, two to a 16-bit staging unit (p.d and the strides count units),
// multiplied by mma.sync m16n8k32 s8 with s32 accumulators — twice bf16's rate and half its bytes; the same ldmatrix
// addressing gives the s8 fragments (a row's 32 bytes are its 16 units). quantize_rows then writes bytes.
#ifndef INT8_OPS
#define INT8_OPS 0
#endif

#include "elements.cuh"
#define MMA_F16 (SRC_T == 1)
#include "mma.cuh"

#define THREADS 256
#define EST_ROWS 128                // query groups per thread block: 8 warps × 16, sharing each key tile
#define EST_COLS 128                // key groups per tile: a warp's 16 rows × 128 columns (16 n8 tiles) per A fragment
#define EST_K 32                    // inner-dimension elements staged per step
#define PITCH (EST_K + 8)           // shared-memory row pitch in halves: 80 bytes, so ldmatrix's 8 rows hit distinct banks
#define NT (EST_COLS / 8)           // n8 tiles of a warp's accumulators
#define TILES_PER_BLOCK (GROUP_COLS / 8)
#define BLOCKS_PER_TILE (EST_COLS / GROUP_COLS)

#define NEG_INF __int_as_float(0xff800000)

struct EstimateParams
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
    // SALE (scaled_block_max, sale_relative): per-row scales of the quantized rows, and which query rows were sampled.
    const float* q_scales;      // [B, H, sampled rows]
    const float* k_scales;      // [B, Hkv, Skv]
    int row_stride, rows_per_block;
};

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

// acc += A·B on int8 fragments (m16n8k32, s32 accumulators kept in the float registers' bits).
__device__ __forceinline__ void mma_s8(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1)
{
    int c0 = __float_as_int(d[0]), c1 = __float_as_int(d[1]), c2 = __float_as_int(d[2]), c3 = __float_as_int(d[3]);
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+r"(c0), "+r"(c1), "+r"(c2), "+r"(c3)
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    d[0] = __int_as_float(c0);
    d[1] = __int_as_float(c1);
    d[2] = __int_as_float(c2);
    d[3] = __int_as_float(c3);
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

// Key blocks query block qb can reach at all (its last query's visible keys), as select_blocks counts them.
__device__ __forceinline__ int visible_blocks(const EstimateParams& p, int qb)
{
    if (!p.causal) return p.k_blocks;
    const int last = min((qb + 1) * p.block, p.seqlen_q) - 1;
    const int keys = max(0, min(p.seqlen_k, last + p.causal_offset + 1));
    return (keys + p.block - 1) / p.block;
}

// Key groups query group r sees: those whose first key its last query may see.
__device__ __forceinline__ int visible_groups(const EstimateParams& p, int r)
{
    if (!p.causal) return p.k_groups;
    const int last = min(r * p.stride + p.stride, p.seqlen_q) - 1;
    const int keys = max(0, min(p.seqlen_k, last + p.causal_offset + 1));
    return min(p.k_groups, (keys + p.stride - 1) / p.stride);
}

// Stages the operands of (key-group tile c0, inner chunk e0) — EST_ROWS query rows and 128 key rows of EST_K elements, in
// 16-byte vectors — regrouping on the way: query group r's element e is query r·s + s−1−e/D, channel e mod D; key
// group c's is key c·s + e/D. 16-bit inputs go by cp.async (zero-filled outside the tensors); f32 is rounded here.
__device__ __forceinline__ void stage(const EstimateParams& p, u16* sq, u16* sk, int r_base, int c0, int e0, i64 qbase, i64 kbase, int e_total)
{
    constexpr int VECS = EST_K / 8;   // 16-byte vectors per row and step
    constexpr int ROW_STEP = THREADS / VECS;
    // A thread's vectors share one column chunk (THREADS is a multiple of VECS): one division per step, not per vector.
    const int chunk = threadIdx.x % VECS, row0 = threadIdx.x / VECS;
    const int e = e0 + chunk * 8, slot = e / p.d, c = e - slot * p.d;
    const bool e_ok = e < e_total;
#pragma unroll
    for (int i = 0; i < EST_ROWS / ROW_STEP; i++)
    {
        const int row = row0 + i * ROW_STEP, gq = r_base + row, tq = gq * p.stride + (p.stride - 1 - slot);
        const bool ok = e_ok && gq < p.q_groups && tq < p.seqlen_q;
        const i64 at = qbase + (i64)tq * p.q_row + c;
#if SRC_T == 0
        *(uint4*)&sq[row * PITCH + chunk * 8] = load8(p.q, at, ok);
#else
        cp_async16(smem_u32(&sq[row * PITCH + chunk * 8]), (const u16*)p.q + (ok ? at : 0), ok);
#endif
    }
#pragma unroll
    for (int i = 0; i < EST_COLS / ROW_STEP; i++)
    {
        const int row = row0 + i * ROW_STEP, gk = c0 + row, tk = gk * p.stride + slot;
        const bool ok = e_ok && gk < p.k_groups && tk < p.seqlen_k;
        const i64 at = kbase + (i64)tk * p.k_row + c;
#if SRC_T == 0
        *(uint4*)&sk[row * PITCH + chunk * 8] = load8(p.k, at, ok);
#else
        cp_async16(smem_u32(&sk[row * PITCH + chunk * 8]), (const u16*)p.k + (ok ? at : 0), ok);
#endif
    }
}

// The thread block's products: for each 128-column tile of the first `cols` columns, S = Q·Kᵀ of its EST_ROWS rows (a warp's
// 16 rows × 128 columns in acc, mma.sync m16n8k16) over the whole inner dimension, then epilogue(c0, acc). Operands
// are staged by `stage` in two buffers: the next chunk (of this tile or the next) loads while this one multiplies.
template <typename Epilogue>
__device__ __forceinline__ void tile_products(const EstimateParams& p, u16 (*sq)[EST_ROWS * PITCH], u16 (*sk)[EST_COLS * PITCH],
    int r_base, int cols, i64 qbase, i64 kbase, Epilogue epilogue)
{
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int e_total = p.stride * p.d;
    const int chunks = (e_total + EST_K - 1) / EST_K, steps = ((cols + EST_COLS - 1) / EST_COLS) * chunks;
    if (steps > 0) stage(p, sq[0], sk[0], r_base, 0, 0, qbase, kbase, e_total);
    cp_async_commit();
    float acc[NT][4];
    for (int it = 0; it < steps; it++)
    {
        const int tile = it / chunks, ei = it - tile * chunks;
        if (ei == 0)
        {
#pragma unroll
            for (int n = 0; n < NT; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
        }
        if (it + 1 < steps)
        {
            const int next_tile = (it + 1) / chunks;
            stage(p, sq[(it + 1) & 1], sk[(it + 1) & 1], r_base, next_tile * EST_COLS, ((it + 1) - next_tile * chunks) * EST_K, qbase, kbase, e_total);
        }
        cp_async_commit();
        cp_async_wait<1>();   // this step's chunk has landed
        __syncthreads();
        const u16* tq = sq[it & 1];
        const u16* tk = sk[it & 1];
#pragma unroll
        for (int kk = 0; kk < EST_K / 16; kk++)
        {
            u32 a0, a1, a2, a3;
            ldmatrix_x4(smem_u32(&tq[(warp * 16 + (lane & 15)) * PITCH + kk * 16 + (lane >> 4) * 8]), a0, a1, a2, a3);
#pragma unroll
            for (int np = 0; np < NT / 2; np++)
            {
                u32 b0, b1, b2, b3;
                const int key = np * 16 + (lane & 7) + (lane >> 4) * 8;
                ldmatrix_x4(smem_u32(&tk[key * PITCH + kk * 16 + ((lane >> 3) & 1) * 8]), b0, b1, b2, b3);
#if INT8_OPS
                mma_s8(acc[2 * np], a0, a1, a2, a3, b0, b1);
                mma_s8(acc[2 * np + 1], a0, a1, a2, a3, b2, b3);
#else
                mma16816(acc[2 * np], a0, a1, a2, a3, b0, b1);
                mma16816(acc[2 * np + 1], a0, a1, a2, a3, b2, b3);
#endif
            }
        }
        __syncthreads();   // the next step stages into the buffer just read
        if (ei == chunks - 1)
        {
#if INT8_OPS
            // The s32 sums as floats: exact, |sum| ≤ 256 · 127² < 2^24.
#pragma unroll
            for (int n = 0; n < NT; n++)
#pragma unroll
                for (int i = 0; i < 4; i++) acc[n][i] = (float)__float_as_int(acc[n][i]);
#endif
            epilogue(tile * EST_COLS, acc);
        }
    }
}

// Grid (ceil(q groups / 128), heads of this launch, B), THREADS threads.
extern "C" __global__ void __launch_bounds__(THREADS) antidiagonal_lse(const EstimateParams p)
{
    __shared__ __align__(16) u16 sq[2][EST_ROWS * PITCH];
    __shared__ __align__(16) u16 sk[2][EST_COLS * PITCH];
    __shared__ float row_lse[EST_ROWS];
    // Heads vary fastest and row tiles run last-first: under a causal mask the late rows see the most columns, so
    // the longest thread blocks start first and the short ones fill the tail.
    const int hl = blockIdx.x, h = p.head0 + hl, b = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int r_base = (gridDim.y - 1 - blockIdx.y) * EST_ROWS;
    const int r_last = min(r_base + EST_ROWS, p.q_groups) - 1;
    const int cols = visible_groups(p, r_last);
    const i64 qbase = b * p.q_batch + h * p.q_head, kbase = b * p.k_batch + (h / p.group) * p.k_head;
    float* lse_rows = p.block_lse + ((i64)(hl * gridDim.z + b) * p.q_groups) * p.k_blocks;

    // This thread's two rows (g and g + 8 of its warp's 16) and what they see.
    const int row0 = r_base + warp * 16 + g, row1 = row0 + 8;
    const int vis0 = row0 < p.q_groups ? visible_groups(p, row0) : 0, vis1 = row1 < p.q_groups ? visible_groups(p, row1) : 0;
    float m0 = NEG_INF, s0 = 0.f, m1 = NEG_INF, s1 = 0.f;

    tile_products(p, sq, sk, r_base, cols, qbase, kbase, [&](int c0, float (&acc)[NT][4])
    {
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
    });
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
        if (kb >= visible_blocks(p, qb)) continue;
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

// ---------------------------------------------------------------------------------------------------------------
// SALE's low-bit estimate (Ji et al., arXiv:2505.24179) — the device side of the CPU's SaleSelector: keys smoothed
// by their mean over the sequence, q (times the softmax scale, every row_stride-th row of each block, its last row
// included) and k quantized with one symmetric scale per token to ±7 (4-bit) or ±127 (8-bit). The integers go to the
// tensor cores as int8 (scaled_block_max compiled with INT8_OPS; s32 sums, so the products equal the CPU's integer
// products) and each (sampled row, key block) keeps its largest scaled estimate; a block's relative score is then the
// largest over the query block's rows of (block max − row max), kept when ≥ ln(threshold) by select_blocks.
//   key_sums → quantize_rows (keys, queries) → scaled_block_max → sale_relative → select_blocks (threshold).
// ---------------------------------------------------------------------------------------------------------------

// The query index of sampled row r: rows_per_block rows for every block but the last, each block's rows every
// row_stride-th query ending at its last one.
__device__ __forceinline__ int sampled_query(int r, int block, int seqlen_q, int q_blocks, int row_stride, int rows_per_block)
{
    const int qb = min(r / rows_per_block, q_blocks - 1);
    const int first = qb * block, last = min(first + block, seqlen_q) - 1;
    return first + (last - first) % row_stride + (r - qb * rows_per_block) * row_stride;
}

struct QuantizeParams
{
    const void* src;            // [B, S, heads, D] (SRC_T)
    signed char* dst;           // [B, rows, heads, d_pad] int8 integers (the estimate stages them as 16-bit units, INT8_OPS)
    float* scales;              // [B, heads, rows]
    float* sums;                // [B, heads, D] channel sums of the keys (key_sums; quantize_rows subtracts the mean), or null
    i64 src_batch, src_row, src_head, dst_batch, dst_row, dst_head;
    int rows, heads, d, levels, length;
    int sampled, block, q_blocks, row_stride, rows_per_block;   // queries: rows are sampled_query(r, ...)
    float scale;                // multiplies the source (the softmax scale for queries)
    int d_pad;                  // channels [d, d_pad) are written as 0 (rows whole 16-byte units)
};

// Grid (ceil(length / 256), heads, B), 256 threads: channel sums of 256 keys, added atomically.
extern "C" __global__ void __launch_bounds__(256) key_sums(const QuantizeParams p)
{
    const int h = blockIdx.y, b = blockIdx.z, r0 = blockIdx.x * 256, r1 = min(r0 + 256, p.length);
    for (int c = threadIdx.x; c < p.d; c += 256)
    {
        float a = 0.f;
        for (int r = r0; r < r1; r++) a += load_elem(p.src, b * p.src_batch + (i64)r * p.src_row + h * p.src_head + c);
        atomicAdd(&p.sums[((i64)b * p.heads + h) * p.d + c], a);
    }
}

#define QUANT_ROWS 4   // rows per warp: the keys' channel means are divided once per warp, not per row

// Grid (ceil(rows / (8 · QUANT_ROWS)), heads, B), 256 threads: a warp per QUANT_ROWS rows (D ≤ 256), max |x| → scale
// = max / levels (1 for a zero row), integers round(x / scale) half to even and clamped, as the CPU's Quantize.
extern "C" __global__ void __launch_bounds__(256) quantize_rows(const QuantizeParams p)
{
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int h = blockIdx.y, b = blockIdx.z;
    const float* sums = p.sums == nullptr ? nullptr : p.sums + ((i64)b * p.heads + h) * p.d;
    float mean[8];
#pragma unroll
    for (int i = 0; i < 8; i++)
    {
        const int c = lane + 32 * i;
        mean[i] = sums != nullptr && c < p.d ? sums[c] / (float)p.length : 0.f;
    }
    for (int rr = 0; rr < QUANT_ROWS; rr++)
    {
        const int r = (blockIdx.x * 8 + warp) * QUANT_ROWS + rr;
        if (r >= p.rows) return;
        const int src = p.sampled ? sampled_query(r, p.block, p.length, p.q_blocks, p.row_stride, p.rows_per_block) : r;
        const i64 base = b * p.src_batch + (i64)src * p.src_row + h * p.src_head;
        float x[8];
        float mx = 0.f;
#pragma unroll
        for (int i = 0; i < 8; i++)
        {
            const int c = lane + 32 * i;
            float v = 0.f;
            if (c < p.d)
            {
                v = load_elem(p.src, base + c);
                v = sums != nullptr ? v - mean[i] : v * p.scale;
            }
            x[i] = v;
            mx = fmaxf(mx, fabsf(v));
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        const float scale = mx > 0.f ? mx / (float)p.levels : 1.f;
        const i64 at = b * p.dst_batch + (i64)r * p.dst_row + h * p.dst_head;
#pragma unroll
        for (int i = 0; i < 8; i++)
        {
            const int c = lane + 32 * i;
            if (c < p.d_pad) p.dst[at + c] = c < p.d ? (signed char)fminf(fmaxf(rintf(x[i] / scale), -(float)p.levels), (float)p.levels) : 0;
        }
        if (lane == 0) p.scales[((i64)b * p.heads + h) * p.rows + r] = scale;
    }
}

// Keys sampled row r sees (its query's causal limit).
__device__ __forceinline__ int sampled_visible(const EstimateParams& p, int r)
{
    if (!p.causal) return p.seqlen_k;
    const int q = sampled_query(r, p.block, p.seqlen_q, p.q_blocks, p.row_stride, p.rows_per_block);
    return max(0, min(p.seqlen_k, q + p.causal_offset + 1));
}

// Grid (ceil(sampled rows / 128), heads of this launch, B), THREADS threads: per (sampled row, key block) the largest
// estimate integer product × (q scale × k scale) over the block's visible keys (block 64, 128 or 256: each 64-key half
// of a tile lies in one block; the row's owner lane merges the halves of a block), into the scratch.
extern "C" __global__ void __launch_bounds__(THREADS) scaled_block_max(const EstimateParams p)
{
    __shared__ __align__(16) u16 sq[2][EST_ROWS * PITCH];
    __shared__ __align__(16) u16 sk[2][EST_COLS * PITCH];
    // Heads vary fastest and row tiles run last-first: under a causal mask the late rows see the most columns, so
    // the longest thread blocks start first and the short ones fill the tail.
    const int hl = blockIdx.x, h = p.head0 + hl, b = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int r_base = (gridDim.y - 1 - blockIdx.y) * EST_ROWS;
    const int cols = sampled_visible(p, min(r_base + EST_ROWS, p.q_groups) - 1);
    const i64 qbase = b * p.q_batch + h * p.q_head, kbase = b * p.k_batch + (h / p.group) * p.k_head;
    float* max_rows = p.block_lse + ((i64)(hl * gridDim.z + b) * p.q_groups) * p.k_blocks;
    const int row0 = r_base + warp * 16 + g, row1 = row0 + 8;
    const bool ok0 = row0 < p.q_groups, ok1 = row1 < p.q_groups;
    const int vis0 = ok0 ? sampled_visible(p, row0) : 0, vis1 = ok1 ? sampled_visible(p, row1) : 0;
    const float qs0 = ok0 ? p.q_scales[((i64)b * p.heads + h) * p.q_groups + row0] : 0.f;
    const float qs1 = ok1 ? p.q_scales[((i64)b * p.heads + h) * p.q_groups + row1] : 0.f;
    const float* ks = p.k_scales + ((i64)b * (p.heads / p.group) + h / p.group) * p.seqlen_k;

    tile_products(p, sq, sk, r_base, cols, qbase, kbase, [&](int c0, float (&acc)[NT][4])
    {
#pragma unroll
        for (int half = 0; half < EST_COLS / 64; half++)
        {
            float m0 = NEG_INF, m1 = NEG_INF;
            if (c0 + half * 64 + 64 <= min(vis0, vis1))
            {
                // Every column visible to both rows (all tiles but those at a row's causal edge): no checks, and each
                // pair of key scales loaded once for both rows. The products keep the CPU's rounding: acc × (qs × ks).
#pragma unroll
                for (int n = half * 8; n < half * 8 + 8; n++)
                {
                    const float ka = ks[c0 + n * 8 + 2 * t4], kb = ks[c0 + n * 8 + 2 * t4 + 1];   // any alignment
                    m0 = fmaxf(m0, fmaxf(acc[n][0] * (qs0 * ka), acc[n][1] * (qs0 * kb)));
                    m1 = fmaxf(m1, fmaxf(acc[n][2] * (qs1 * ka), acc[n][3] * (qs1 * kb)));
                }
            }
            else
            {
#pragma unroll
                for (int n = half * 8; n < half * 8 + 8; n++)
#pragma unroll
                    for (int i = 0; i < 4; i++)
                    {
                        const int col = c0 + n * 8 + 2 * t4 + (i & 1);
                        if (i >= 2) { if (col < vis1) m1 = fmaxf(m1, acc[n][i] * (qs1 * ks[col])); }
                        else if (col < vis0) m0 = fmaxf(m0, acc[n][i] * (qs0 * ks[col]));
                    }
            }
            m0 = fmaxf(m0, __shfl_xor_sync(0xffffffffu, m0, 1));
            m0 = fmaxf(m0, __shfl_xor_sync(0xffffffffu, m0, 2));
            m1 = fmaxf(m1, __shfl_xor_sync(0xffffffffu, m1, 1));
            m1 = fmaxf(m1, __shfl_xor_sync(0xffffffffu, m1, 2));
            const int c = c0 + half * 64, kb = c / p.block;
            const bool first = c % p.block == 0;
            if (t4 == 0 && c < cols && kb < p.k_blocks)
            {
                if (ok0) { float* at = &max_rows[(i64)row0 * p.k_blocks + kb]; *at = first ? m0 : fmaxf(*at, m0); }
                if (ok1) { float* at = &max_rows[(i64)row1 * p.k_blocks + kb]; *at = first ? m1 : fmaxf(*at, m1); }
            }
        }
    });
}

// Grid (query blocks, heads of this launch, B), 256 threads: per visible key block the largest over the block's
// sampled rows of (block max − row max), the log of SALE's relative attention score (−∞ where no row sees it), into
// mass for select_blocks' threshold ln(t). Entries a row's own causal limit excludes were never written: skipped.
extern "C" __global__ void __launch_bounds__(256) sale_relative(const EstimateParams p)
{
    __shared__ float row_max[256];
    __shared__ int row_blocks[256];
    const int qb = blockIdx.x, hl = blockIdx.y, h = p.head0 + hl, b = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r0 = qb * p.rows_per_block, r1 = qb == p.q_blocks - 1 ? p.q_groups : min(r0 + p.rows_per_block, p.q_groups);
    const int visible = visible_blocks(p, qb);
    const float* rows = p.block_lse + ((i64)(hl * gridDim.z + b) * p.q_groups) * p.k_blocks;
    for (int r = r0 + warp; r < r1; r += 8)
    {
        const int nb = (sampled_visible(p, r) + p.block - 1) / p.block;
        float m = NEG_INF;
        for (int kb = lane; kb < nb; kb += 32) m = fmaxf(m, rows[(i64)r * p.k_blocks + kb]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        if (lane == 0)
        {
            row_max[r - r0] = m;
            row_blocks[r - r0] = nb;
        }
    }
    __syncthreads();
    float* out = p.mass + (((i64)b * p.heads + h) * p.q_blocks + qb) * p.k_blocks;
    for (int kb = threadIdx.x; kb < visible; kb += 256)
    {
        float best = NEG_INF;
        for (int r = r0; r < r1; r++)
        {
            const float m = row_max[r - r0];
            if (m == NEG_INF || kb >= row_blocks[r - r0]) continue;
            best = fmaxf(best, rows[(i64)r * p.k_blocks + kb] - m);
        }
        out[kb] = best;
    }
}
