// Pooled block selection on the GPU: the device side of the CPU's PooledBlockSelector (MInference's block-sparse
// estimate, Jiang et al. arXiv:2407.02490; DraftAttention arXiv:2505.14708; SVG2's top-p budget arXiv:2505.18875),
// writing the CSR block plan the attention kernel walks (flash_fwd.cu, HAS_PLAN) without leaving the device.
// At S = 131072 a host-built plan would first download q and k (2 GB in bf16) and take seconds on the CPU; here the
// plan is built in four launches:
//   1. pool_blocks:    mean of every block of BLOCK rows of q (times the softmax scale) and of k, f32
//                      [B, H, blocks, D] — one read of q and k.
//   2. select_blocks:  one thread block per (query block, head, batch): the pooled query row against the visible
//                      pooled keys (causal: up to its last row's diagonal), softmax, then the budget as a threshold
//                      found by bisection on the float bits (top-k: the largest t with ≥ k entries ≥ t; top-p: the
//                      largest t whose entries ≥ t hold the mass; threshold: t itself) — no sort; ties at t are kept.
//                      The kept key blocks, ascending, go to a [rows, key blocks] scratch and their count per row.
//   3. scan_counts:    row starts (exclusive scan of the counts) in one thread block.
//   4. compact_plan:   the rows packed into the CSR columns with their kinds (1 Full, 2 Partial on the causal
//                      diagonal).
// No CUDA headers: any NVRTC >= 11.8 compiles it.
//
// Compile-time parameters (-D): SRC_T 0 = f32, 1 = f16, 2 = bf16 (pool_blocks' input).

#include "elements.cuh"
#define THREADS 256
#define WARPS (THREADS / 32)

struct PoolParams
{
    const void* src;            // [B, S, H, D] with strides
    float* dst;                 // [B, H, blocks, D]
    i64 src_batch, src_row, src_head;
    int length, heads, d, block, blocks;
    float scale;                // multiplies the mean (the softmax scale for queries, 1 for keys)
};

// Grid (blocks, H, B), THREADS threads: thread c sums channel c (and c + THREADS, ...) over the block's rows; the
// threads of a row read consecutive channels (coalesced).
extern "C" __global__ void __launch_bounds__(THREADS) pool_blocks(const PoolParams p)
{
    const int blk = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int r0 = blk * p.block, r1 = min(r0 + p.block, p.length);
    const i64 head_base = b * p.src_batch + h * p.src_head;
    float* out = p.dst + (((i64)b * p.heads + h) * p.blocks + blk) * p.d;
    for (int c = threadIdx.x; c < p.d; c += THREADS)
    {
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
        int r = r0;
        for (; r + 3 < r1; r += 4)
        {
            a0 += load_elem(p.src, head_base + (i64)r * p.src_row + c);
            a1 += load_elem(p.src, head_base + (i64)(r + 1) * p.src_row + c);
            a2 += load_elem(p.src, head_base + (i64)(r + 2) * p.src_row + c);
            a3 += load_elem(p.src, head_base + (i64)(r + 3) * p.src_row + c);
        }
        for (; r < r1; r++) a0 += load_elem(p.src, head_base + (i64)r * p.src_row + c);
        out[c] = ((a0 + a1) + (a2 + a3)) * (p.scale / (float)(r1 - r0));
    }
}

struct SelectParams
{
    const float* pq;            // [B, H, query blocks, D], scaled
    const float* pk;            // [B, Hkv, key blocks, D]
    int* counts;                // [B * H * query blocks]
    int* scratch;               // [B * H * query blocks, key blocks]
    int heads, group, d, block, q_blocks, k_blocks, seqlen_q, seqlen_k, causal, causal_offset;
    int budget_kind;            // 0 top-k, 1 top-p, 2 threshold
    float budget;               // k, mass or probability
    int keep_sink_diagonal;
    const float* mass;          // [B, H, query blocks, key blocks] or null: each row's key-block values from another
                                // estimate (estimate.cu), used instead of the pooled scores' softmax
};

__device__ __forceinline__ float warp_sum(float x)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

__device__ __forceinline__ float warp_max(float x)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

// Block-wide sum / max (every thread gets the result); red holds WARPS floats.
__device__ __forceinline__ float block_sum(float x, float* red)
{
    x = warp_sum(x);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = x;
    __syncthreads();
    float t = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; w++) t += red[w];
    return t;
}

__device__ __forceinline__ float block_max(float x, float* red)
{
    x = warp_max(x);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = x;
    __syncthreads();
    float t = red[0];
#pragma unroll
    for (int w = 1; w < WARPS; w++) t = fmaxf(t, red[w]);
    return t;
}

// Exclusive prefix sum of one int per thread over a block of N threads (buf: N ints of shared memory); *total gets
// the block's sum. Used to place each thread's run of kept entries in ascending order.
template <int N>
__device__ __forceinline__ int block_exclusive_scan(int mine, int* buf, int* total)
{
    buf[threadIdx.x] = mine;
    __syncthreads();
    for (int o = 1; o < N; o <<= 1)
    {
        int add = threadIdx.x >= o ? buf[threadIdx.x - o] : 0;
        __syncthreads();
        buf[threadIdx.x] += add;
        __syncthreads();
    }
    *total = buf[N - 1];
    return buf[threadIdx.x] - mine;
}

// Σ of the probabilities ≥ t (want_mass) or their count.
__device__ __forceinline__ float above(const float* prob, int n, float t, bool want_mass, float* red)
{
    float acc = 0.f;
    for (int i = threadIdx.x; i < n; i += THREADS)
    {
        float x = prob[i];
        if (x >= t) acc += want_mass ? x : 1.f;
    }
    return block_sum(acc, red);
}

// Grid (query blocks, H, B), THREADS threads, dynamic shared memory: key blocks floats (the row's probabilities),
// then D floats (the pooled query).
extern "C" __global__ void __launch_bounds__(THREADS) select_blocks(const SelectParams p)
{
    extern __shared__ float smem[];
    __shared__ float red[WARPS];
    __shared__ int offsets[THREADS];
    float* prob = smem;
    float* qrow = smem + p.k_blocks;
    const int qb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int row = (b * p.heads + h) * p.q_blocks + qb;
    int visible = p.k_blocks;
    if (p.causal)
    {
        const int last = min((qb + 1) * p.block, p.seqlen_q) - 1;
        const int keys = max(0, min(p.seqlen_k, last + p.causal_offset + 1));
        visible = (keys + p.block - 1) / p.block;
    }
    if (visible == 0)
    {
        if (threadIdx.x == 0) p.counts[row] = 0;
        return;
    }
    if (p.mass != nullptr)
    {
        // Mass mode: the row's values from another estimate (estimate.cu) — XAttention's block mass, normalized here
        // (the bisection below runs on probabilities), or, for a threshold budget, taken as they are (SALE's log
        // relative scores against ln t).
        const float* m = p.mass + (i64)row * p.k_blocks;
        float s = 0.f;
        for (int i = threadIdx.x; i < visible; i += THREADS)
        {
            prob[i] = m[i];
            s += m[i];
        }
        if (p.budget_kind != 2)
        {
            s = block_sum(s, red);
            const float inv = s > 0.f ? 1.f / s : 0.f;
            for (int i = threadIdx.x; i < visible; i += THREADS) prob[i] *= inv;
        }
        __syncthreads();
    }
    else
    {
        const float* q = p.pq + ((i64)(b * p.heads + h) * p.q_blocks + qb) * p.d;
        for (int c = threadIdx.x; c < p.d; c += THREADS) qrow[c] = q[c];
        __syncthreads();

        // Scores: a warp per key block, lanes over channels.
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        const float* kbase = p.pk + (i64)(b * (p.heads / p.group) + h / p.group) * p.k_blocks * p.d;
        for (int kb = warp; kb < visible; kb += WARPS)
        {
            const float* kr = kbase + (i64)kb * p.d;
            float acc = 0.f;
            for (int c = lane; c < p.d; c += 32) acc += qrow[c] * kr[c];
            acc = warp_sum(acc);
            if (lane == 0) prob[kb] = acc;
        }
        __syncthreads();

        // Softmax over the visible key blocks.
        float m = -__int_as_float(0x7f800000);   // −∞ (no math headers)
        for (int i = threadIdx.x; i < visible; i += THREADS) m = fmaxf(m, prob[i]);
        m = block_max(m, red);
        float s = 0.f;
        for (int i = threadIdx.x; i < visible; i += THREADS)
        {
            float e = __expf(prob[i] - m);
            prob[i] = e;
            s += e;
        }
        s = block_sum(s, red);
        const float inv = 1.f / s;
        for (int i = threadIdx.x; i < visible; i += THREADS) prob[i] *= inv;
        __syncthreads();
    }

    // The budget as a threshold t: entries ≥ t are kept. Non-negative floats order as their bits.
    float t;
    if (p.budget_kind == 2)
    {
        t = p.budget;
    }
    else if ((p.budget_kind == 0 && p.budget >= (float)visible) || (p.budget_kind == 1 && p.budget >= 1.f))
    {
        t = 0.f;   // everything (no rounding may drop a tiny entry)
    }
    else
    {
        const bool mass = p.budget_kind == 1;
        const float target = mass ? p.budget * above(prob, visible, 0.f, true, red) : p.budget;
        u32 lo = 0, hi = 0x3f800001u;   // above(lo) meets the target; above(hi) = above(> 1) does not
        while (hi - lo > 1)
        {
            u32 mid = lo + ((hi - lo) >> 1);
            if (above(prob, visible, __uint_as_float(mid), mass, red) >= target) lo = mid; else hi = mid;
        }
        t = __uint_as_float(lo);
    }

    // Kept blocks in ascending order: each thread owns a contiguous run of key blocks; an exclusive scan of the
    // runs' counts places them.
    const int per = (visible + THREADS - 1) / THREADS;
    const int i0 = min(visible, threadIdx.x * per), i1 = min(visible, i0 + per);
    int mine = 0;
    for (int i = i0; i < i1; i++)
    {
        bool keep = prob[i] >= t || (p.keep_sink_diagonal && (i == 0 || i == visible - 1));
        mine += keep ? 1 : 0;
    }
    int kept;
    int at = block_exclusive_scan<THREADS>(mine, offsets, &kept);
    int* out = p.scratch + (i64)row * p.k_blocks;
    for (int i = i0; i < i1; i++)
    {
        bool keep = prob[i] >= t || (p.keep_sink_diagonal && (i == 0 || i == visible - 1));
        if (keep) out[at++] = i;
    }
    if (threadIdx.x == 0) p.counts[row] = kept;
}

struct ScanParams
{
    const int* counts;
    int* row_start;             // [rows + 1]
    int rows;
};

// One thread block of 1024 threads: each thread sums a contiguous run of rows, a scan of the runs places them.
extern "C" __global__ void __launch_bounds__(1024) scan_counts(const ScanParams p)
{
    __shared__ int sums[1024];
    const int per = (p.rows + 1023) / 1024;
    const int r0 = min(p.rows, (int)threadIdx.x * per), r1 = min(p.rows, r0 + per);
    int mine = 0;
    for (int r = r0; r < r1; r++) mine += p.counts[r];
    int total;
    int at = block_exclusive_scan<1024>(mine, sums, &total);
    for (int r = r0; r < r1; r++)
    {
        p.row_start[r] = at;
        at += p.counts[r];
    }
    if (threadIdx.x == 0) p.row_start[p.rows] = total;
}

struct CompactParams
{
    const int* counts;
    const int* scratch;
    const int* row_start;
    int* cols;
    unsigned char* kinds;
    int heads, block, q_blocks, k_blocks, seqlen_q, seqlen_k, causal, causal_offset;
};

// Grid (rows): each row's kept key blocks into the CSR, Full unless they reach past the causal diagonal of the
// query block's first row (then Partial: the kernel evaluates the causal expression per element).
extern "C" __global__ void __launch_bounds__(128) compact_plan(const CompactParams p)
{
    const int row = blockIdx.x;
    const int qb = row % p.q_blocks;
    const int n = p.counts[row], first = p.row_start[row];
    const i64 q0 = (i64)qb * p.block;
    for (int j = threadIdx.x; j < n; j += blockDim.x)
    {
        const int kb = p.scratch[(i64)row * p.k_blocks + j];
        const i64 k1 = min((i64)(kb + 1) * p.block, (i64)p.seqlen_k);
        p.cols[first + j] = kb;
        p.kinds[first + j] = (!p.causal || k1 - 1 <= q0 + p.causal_offset) ? 1 : 2;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Quest on the GPU (Tang et al., arXiv:2406.10774) for the paged decode (flash_fwd.cu, flash_decode with a page
// table): per pool page and kv head the channel-wise min and max of its keys; per step the bound Σ_c max(q_c·min_c,
// q_c·max_c) of every logical page (the largest over the GQA group's query heads; +∞ for the last page, always read),
// then per kv head the best pages by topk_rows (below), written ascending as the decode kernel's page list.
// ---------------------------------------------------------------------------------------------------------------
struct SummaryParams
{
    const void* k;              // pool [pages, page, Hkv, D] (SRC_T)
    float* min;                 // [pages, Hkv, D]
    float* max;
    i64 page_stride, row_stride, head_stride;
    int pages, kv_heads, d, page, last_page, last_len;   // the pool page holding the sequence's end has last_len keys
    int first_page;             // the run of pool pages summarized starts here
    float* mean;                // [pages, Hkv, D]: the keys' mean (Landmark)
    int* lengths;               // [sequences]: the first thread block stores lengths[sequence] = length (stream-ordered,
    int sequence, length;       // so an append needs no copy of its own for it)
    // A batched append (pool_append): list holds (pool page, keys) pairs, one per thread block along x, instead of the
    // run; then entries holds `updates` (index, value) pairs written first — table entries and lengths (lengths as
    // −1 − sequence) — by the first thread block.
    const int* list;
    const int* entries;
    int updates;
    int* table;
};

// Grid (rows, 1, 1), 128 threads: row r of the staged keys and values [rows, Hkv · D] to element offsets[r] of the pools
// (16-byte vectors: Hkv · D and the offsets are multiples of 8).
extern "C" __global__ void __launch_bounds__(128) pool_append(const u16* staged_k, const u16* staged_v, const i64* offsets, u16* k, u16* v, int row_elements)
{
    const i64 from = (i64)blockIdx.x * row_elements, to = offsets[blockIdx.x];
    for (int i = threadIdx.x * 8; i < row_elements; i += 128 * 8)
    {
        *(uint4*)(k + to + i) = *(const uint4*)(staged_k + from + i);
        *(uint4*)(v + to + i) = *(const uint4*)(staged_v + from + i);
    }
}

// Grid (pages of the run, Hkv), THREADS threads over channels: pool pages first_page, first_page + 1, ….
extern "C" __global__ void __launch_bounds__(THREADS) page_summaries(const SummaryParams p)
{
    const int h = blockIdx.y;
    const int page = p.list != nullptr ? p.list[2 * blockIdx.x] : p.first_page + blockIdx.x;
    if (blockIdx.x == 0 && h == 0)
    {
        if (threadIdx.x == 0 && p.lengths != nullptr && p.list == nullptr) p.lengths[p.sequence] = p.length;
        for (int i = threadIdx.x; i < p.updates; i += THREADS)
        {
            const int index = p.entries[2 * i], value = p.entries[2 * i + 1];
            if (index >= 0) p.table[index] = value; else p.lengths[-1 - index] = value;
        }
    }
    const int rows = p.list != nullptr ? p.list[2 * blockIdx.x + 1] : page == p.last_page ? p.last_len : p.page;
    const i64 base = page * p.page_stride + h * p.head_stride;
    for (int c = threadIdx.x; c < p.d; c += THREADS)
    {
        float lo = __int_as_float(0x7f800000), hi = -__int_as_float(0x7f800000), sum = 0.f;
        for (int r = 0; r < rows; r++)
        {
            float x = load_elem(p.k, base + r * p.row_stride + c);
            lo = fminf(lo, x);
            hi = fmaxf(hi, x);
            sum += x;
        }
        const i64 at = ((i64)page * p.kv_heads + h) * p.d + c;
        p.min[at] = lo;
        p.max[at] = hi;
        p.mean[at] = sum / (float)rows;
    }
}

struct QuestParams
{
    const void* q;              // [B, Hq, D] (SRC_T): batch row b is sequence batch_seq[b]'s new token
    const float* min;           // [pool pages, Hkv, D]
    const float* max;
    const int* table;           // [sequences, table_stride]: logical → pool page
    float* bounds;              // [B, Hkv, pages]
    i64 q_head;
    int pages, kv_heads, group, d;   // pages: the batch's longest sequence's
    const float* mean;          // [pool pages, Hkv, D] page key means
    int landmark;               // 1: score q·mean (Landmark) instead of Quest's bound
    i64 q_batch;
    const int* lengths;         // [sequences] tokens
    const int* batch_seq;       // [B]
    int batch, table_stride, page;   // page: tokens per page
};

// Grid (ceil(B · Hkv · pages / WARPS)): a warp per (batch row, kv head, logical page), lanes over channels. Pages past
// a shorter sequence's end score −∞ (the top-k lists them last; the decode does not read them).
extern "C" __global__ void __launch_bounds__(THREADS) quest_bounds(const QuestParams p)
{
    const int item = blockIdx.x * WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (item >= p.batch * p.kv_heads * p.pages) return;
    const int b = item / (p.kv_heads * p.pages), h = item / p.pages % p.kv_heads, page = item % p.pages;
    const int seq = p.batch_seq != nullptr ? p.batch_seq[b] : b;
    const int pages = (p.lengths[seq] + p.page - 1) / p.page;
    float* out = p.bounds + ((i64)b * p.kv_heads + h) * p.pages + page;
    if (page >= pages)
    {
        if (lane == 0) *out = -__int_as_float(0x7f800000);
        return;
    }
    const i64 at = ((i64)p.table[(i64)seq * p.table_stride + page] * p.kv_heads + h) * p.d;
    float best = -__int_as_float(0x7f800000);
    for (int r = 0; r < p.group; r++)
    {
        const i64 qrow = b * p.q_batch + (i64)(h * p.group + r) * p.q_head;
        float acc = 0.f;
        for (int c = lane; c < p.d; c += 32)
        {
            const float x = load_elem(p.q, qrow + c);
            acc += p.landmark ? x * p.mean[at + c] : fmaxf(x * p.min[at + c], x * p.max[at + c]);
        }
        best = fmaxf(best, warp_sum(acc));
    }
    // The last page (the newest keys) is always read: the largest score, so the top-k keeps it.
    if (lane == 0) *out = page == pages - 1 ? __int_as_float(0x7f800000) : best;
}

// ---------------------------------------------------------------------------------------------------------------
// H2O on the GPU (Zhang et al., arXiv:2306.14048; the CPU's HeavyHitterPolicy at page granularity) for one sequence:
// per (kv head, logical page) the attention mass accumulated over the steps that read it (the mean over the group's
// query heads of the page's softmax share) and a state — 0 never read, 1 read and kept, 2 evicted for good. A step:
//   h2o_bounds:  the selection's values — +∞ for the recent window and for pages never read (both always read), the
//                accumulated mass for kept pages, −∞ for evicted ones; topk_rows then keeps the recent and unread pages
//                and the heaviest kept ones (the host sizes k so that no evicted page is needed);
//   h2o_evict:   kept pages outside the window that the top-k left out are evicted;
//   (the decode, writing each listed page's per-warp log2 mass, flash_fwd.cu page_lse)
//   h2o_observe: each listed page's mass from those partials and the rows' LSE, added to its score; state 1.
// ---------------------------------------------------------------------------------------------------------------
struct HeavyParams
{
    float* score;               // [Hkv, capacity] accumulated mass
    int* state;                 // [Hkv, capacity]
    float* bounds;              // [Hkv, pages]
    const int* list;            // [Hkv, pages] the step's pages, ascending
    const int* count;           // [Hkv]
    const float* page_lse;      // [Hq, pages, warps] log2 partials of the listed pages (by list position)
    const float* lse;           // row totals, natural log: lse[h · lse_head]
    i64 lse_head;
    int pages, kv_heads, group, capacity, warps;
    int first_recent;           // pages ≥ first_recent are the recent window
    int observed;               // pages < observed have been read at least once (pages in [observed, first_recent) not yet)
};

// Grid (ceil(Hkv · pages / THREADS)).
extern "C" __global__ void __launch_bounds__(THREADS) h2o_bounds(const HeavyParams p)
{
    const int item = blockIdx.x * THREADS + threadIdx.x;
    if (item >= p.kv_heads * p.pages) return;
    const int h = item / p.pages, page = item % p.pages;
    const i64 at = (i64)h * p.capacity + page;
    const float inf = __int_as_float(0x7f800000);
    float value;
    if (page >= p.first_recent || page >= p.observed) value = inf;
    else value = p.state[at] == 1 ? p.score[at] : -inf;
    p.bounds[(i64)h * p.pages + page] = value;
}

// Grid (Hkv), THREADS threads over the pages outside the window: a kept page the (ascending) list lacks is evicted.
extern "C" __global__ void __launch_bounds__(THREADS) h2o_evict(const HeavyParams p)
{
    const int h = blockIdx.x, n = p.count[h];
    const int* list = p.list + (i64)h * p.pages;
    const int judged = min(p.observed, p.first_recent);
    for (int page = threadIdx.x; page < judged; page += THREADS)
    {
        const i64 at = (i64)h * p.capacity + page;
        if (p.state[at] != 1) continue;
        int lo = 0, hi = n;   // binary search in the ascending list
        while (lo < hi)
        {
            const int mid = (lo + hi) / 2;
            if (list[mid] < page) lo = mid + 1; else hi = mid;
        }
        if (lo == n || list[lo] != page) p.state[at] = 2;
    }
}

// Grid (Hkv), THREADS threads over the listed pages.
extern "C" __global__ void __launch_bounds__(THREADS) h2o_observe(const HeavyParams p)
{
    const int h = blockIdx.x, n = p.count[h];
    for (int i = threadIdx.x; i < n; i += THREADS)
    {
        float mass = 0.f;
        int live = 0;
        for (int r = 0; r < p.group; r++)
        {
            const int head = h * p.group + r;
            const float total = p.lse[head * p.lse_head] * 1.4426950408889634f;
            if (!(total > -__int_as_float(0x7f800000))) continue;   // a row that attended nothing (or NaN)
            live++;
            for (int w = 0; w < p.warps; w++) mass += exp2f(p.page_lse[((i64)head * p.pages + i) * p.warps + w] - total);
        }
        const i64 at = (i64)h * p.capacity + p.list[(i64)h * p.pages + i];
        p.score[at] += live > 1 ? mass / live : mass;
        p.state[at] = 1;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Centroid compensation on the GPU (the CPU's CentroidCompensation; Rectified SpaAttn, SVG-EAR): after a plan ran,
// every key block it skipped that a row sees whole stands in as one centroid — score scale·q·k̄ + ln n, value v̄ —
// merged into the row's output and LSE in log space. k̄ and v̄ come from pool_blocks. The bulk runs on the tensor
// cores first: the attention kernel over the centroids as keys, gathering per query block the full-size skipped
// blocks its first row sees whole (oc, lse_c; their ln n = ln block_k is added here). centroid_compensate then adds,
// per row, the few blocks that row sees whole beyond its block's first row and a short last block, and merges both
// into output and LSE: one thread block per (query block, head, batch) marks the plan's visited blocks (and those
// holding its gathered tokens) in shared memory, a warp per row (lanes over channels). (Walking every skipped block
// this way, without the centroid pass, took 5.5 ms at S 16384, H 32 — the reason for the tensor-core pass.)
// ---------------------------------------------------------------------------------------------------------------
__device__ __forceinline__ void store_elem(void* base, i64 i, float x)
{
#if SRC_T == 0
    ((float*)base)[i] = x;
#elif SRC_T == 1
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;\n" : "=h"(h) : "f"(x));
    ((u16*)base)[i] = h;
#else
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;\n" : "=h"(h) : "f"(x));
    ((u16*)base)[i] = h;
#endif
}

#define COMP_CHANNELS 8   // channels per lane: D ≤ 256

struct CompensateParams
{
    const void* q;              // [B, Sq, H, D]
    void* o;                    // [B, Sq, H, Dv]
    float* lse;                 // [B, Sq, H] natural log
    const float* key_means;     // [B, Hkv, key blocks, D]
    const float* value_means;   // [B, Hkv, key blocks, Dv]
    const int* row_start;       // the plan's CSR
    const int* cols;
    const int* token_row_start; // null, or the token plan's CSR (keys)
    const int* tokens;
    i64 q_batch, q_row, q_head, o_batch, o_row, o_head, lse_batch, lse_row, lse_head;
    int heads, group, d, dv, seqlen_q, seqlen_k, block_q, block_k, key_blocks, causal, causal_offset;
    int plan_batch, plan_heads, plan_q_blocks, token_batch, token_heads, token_q_blocks;
    float scale;
    const void* oc;             // the centroid pass's output [B, Sq, H, Dv] (see above)
    const float* lse_c;         // and its LSE (natural log, without ln block_k)
    i64 oc_batch, oc_row, oc_head, lsec_batch, lsec_row, lsec_head;
};

// Key blocks row i sees whole: all, or (causal) those ending at or before its diagonal.
__device__ __forceinline__ int whole_blocks(const CompensateParams& p, int i)
{
    if (!p.causal) return p.key_blocks;
    const i64 keys = (i64)i + p.causal_offset + 1;
    return max(0, min(p.key_blocks, (int)(keys / p.block_k) + (keys >= p.seqlen_k ? 1 : 0)));
}

// Grid (query blocks, H, B), THREADS threads; dynamic shared memory: key_blocks bytes.
extern "C" __global__ void __launch_bounds__(THREADS) centroid_compensate(const CompensateParams p)
{
    extern __shared__ unsigned char visited[];
    const int qb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    for (int j = threadIdx.x; j < p.key_blocks; j += THREADS) visited[j] = 0;
    __syncthreads();
    const int row = ((p.plan_batch == 1 ? 0 : b) * p.plan_heads + (p.plan_heads == 1 ? 0 : h)) * p.plan_q_blocks + qb;
    for (int i = p.row_start[row] + threadIdx.x; i < p.row_start[row + 1]; i += THREADS) visited[p.cols[i]] = 1;
    if (p.token_row_start != nullptr)
    {
        const int trow = ((p.token_batch == 1 ? 0 : b) * p.token_heads + (p.token_heads == 1 ? 0 : h)) * p.token_q_blocks + qb;
        for (int i = p.token_row_start[trow] + threadIdx.x; i < p.token_row_start[trow + 1]; i += THREADS) visited[p.tokens[i] / p.block_k] = 1;
    }
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, kvh = h / p.group;
    const float* kmeans = p.key_means + ((i64)b * (p.heads / p.group) + kvh) * p.key_blocks * p.d;
    const float* vmeans = p.value_means + ((i64)b * (p.heads / p.group) + kvh) * p.key_blocks * p.dv;
    for (int i = qb * p.block_q + warp; i < min((qb + 1) * p.block_q, p.seqlen_q); i += WARPS)
    {
        float qv[COMP_CHANNELS], acc[COMP_CHANNELS];
        const i64 qbase = b * p.q_batch + (i64)i * p.q_row + h * p.q_head;
#pragma unroll
        for (int t = 0; t < COMP_CHANNELS; t++)
        {
            const int c = lane + 32 * t;
            qv[t] = c < p.d ? load_elem(p.q, qbase + c) * p.scale : 0.f;
            acc[t] = 0.f;
        }
        float m = -__int_as_float(0x7f800000), l = 0.f;
        const int whole = whole_blocks(p, i);
        // The centroid pass covered the full-size skipped blocks whole for the block's first row; this row adds those
        // it sees whole beyond them and a short last block.
        const int from = whole_blocks(p, qb * p.block_q), last = p.key_blocks - 1;
        const int short_last = p.seqlen_k - last * p.block_k < p.block_k && last < from ? last : -1;
        const float lc = p.lse_c[b * p.lsec_batch + (i64)i * p.lsec_row + h * p.lsec_head];
        if (lc != -__int_as_float(0x7f800000))
        {
            m = lc + __logf((float)p.block_k);
            l = 1.f;
            const i64 cbase = b * p.oc_batch + (i64)i * p.oc_row + h * p.oc_head;
#pragma unroll
            for (int t = 0; t < COMP_CHANNELS; t++)
            {
                const int c = lane + 32 * t;
                acc[t] = c < p.dv ? load_elem(p.oc, cbase + c) : 0.f;
            }
        }
        // One skipped block's centroid into the running (m, l, acc).
        auto add = [&](int j)
        {
            if (visited[j]) return;
            float dot = 0.f;
#pragma unroll
            for (int t = 0; t < COMP_CHANNELS; t++)
            {
                const int c = lane + 32 * t;
                if (c < p.d) dot += qv[t] * kmeans[(i64)j * p.d + c];
            }
            const int n = min(p.block_k, p.seqlen_k - j * p.block_k);
            const float s = warp_sum(dot) + __logf((float)n);
            const float nm = fmaxf(m, s), alpha = __expf(m - nm), w = __expf(s - nm);
            l = l * alpha + w;
#pragma unroll
            for (int t = 0; t < COMP_CHANNELS; t++)
            {
                const int c = lane + 32 * t;
                acc[t] = acc[t] * alpha + (c < p.dv ? w * vmeans[(i64)j * p.dv + c] : 0.f);
            }
            m = nm;
        };
        for (int j = from; j < whole; j++) add(j);
        if (short_last >= 0) add(short_last);
        if (l == 0.f) continue;   // nothing skipped that this row sees whole
        const float lse_c = m + __logf(l);
        const i64 lse_at = b * p.lse_batch + (i64)i * p.lse_row + h * p.lse_head;
        const float lse_s = p.lse[lse_at];
        const float mm = fmaxf(lse_s, lse_c);
        const float ws = lse_s == -__int_as_float(0x7f800000) ? 0.f : __expf(lse_s - mm), wc = __expf(lse_c - mm);
        const float a = ws / (ws + wc), cw = wc / (ws + wc);
        const i64 obase = b * p.o_batch + (i64)i * p.o_row + h * p.o_head;
#pragma unroll
        for (int t = 0; t < COMP_CHANNELS; t++)
        {
            const int c = lane + 32 * t;
            if (c < p.dv) store_elem(p.o, obase + c, a * load_elem(p.o, obase + c) + cw * (acc[t] / l));
        }
        if (lane == 0) p.lse[lse_at] = mm + __logf(ws + wc);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Vertical-slash on the GPU (MInference, Jiang et al. arXiv:2407.02490; the CPU's VerticalSlashSelector): the last
// LAST_Q queries scored exactly against every key, softmax per row, then per head the column sums (vertical) and
// the diagonal sums (slash, offset o = query + causal offset − key), each over the rows; the top verticals run as
// gathered key tokens and the top slashes as the key blocks they cross.
//   1. vs_scores:   a thread per key, the last rows' queries and the block's keys in shared memory → scaled logits
//                   [B, H, rows, Skv], −∞ past a row's visible keys, and per block of keys each row's (max, Σ exp).
//   2. vs_norms:    per row its max and 1 / (Σ exp · rows) from those partials.
//   3. vs_profile:  a thread per key column j: vertical[j] and slash[o = j] (sinks / local diagonals forced to +∞).
//   4. topk_rows:   per head the k largest of each profile, ascending (radix select, ties by index).
//   5. vs_plan:     per (query block, head): the blocks the slashes cross (a bitmap in shared memory) and the
//                   verticals it sees outside them, into per-row scratch and counts; scan_counts and the compactions
//                   (compact_plan, compact_rows) write the block CSR and the token CSR.
// ---------------------------------------------------------------------------------------------------------------
#ifndef LAST_Q
#define LAST_Q 64
#endif
#define VS_CHUNK 32   // channels of the queries and keys held in shared memory at a time

struct VsScoreParams
{
    const void* q;              // [B, Sq, H, D]
    const void* k;              // [B, Skv, Hkv, D]
    float* scores;              // [B, H, rows, Skv]
    float2* partials;           // [B, H, rows, key groups]: (max, Σ exp(x − max)) over each group of THREADS keys
    i64 q_batch, q_row, q_head, k_batch, k_row, k_head;
    int heads, group, d, rows, first, seqlen_k, causal, causal_offset, key_groups;
    float scale;
};

// Grid (key groups = ceil(Skv / THREADS), H, B), THREADS threads: thread j scores key j0 + j against the rows
// (≤ LAST_Q). Queries and the group's keys are staged in shared memory VS_CHUNK channels at a time (the keys read
// row by row, coalesced: reading them per thread, two bytes from a different row per lane, saturated L1 — 5.75 ms
// at S 131072, H 32). Each group also writes its rows' (max, Σ exp) so the row norms need no second pass over the
// scores.
extern "C" __global__ void __launch_bounds__(THREADS) vs_scores(const VsScoreParams p)
{
    __shared__ __align__(16) float qs[LAST_Q][VS_CHUNK];
    __shared__ float ks[THREADS][VS_CHUNK + 1];   // +1: lanes read their own row without bank conflicts
    __shared__ float red[LAST_Q][WARPS];
    __shared__ float row_max[LAST_Q];
    const int h = blockIdx.y, b = blockIdx.z;
    const int j0 = blockIdx.x * THREADS, j = j0 + threadIdx.x;
    const i64 kbase = b * p.k_batch + (h / p.group) * p.k_head;
    float acc[LAST_Q];
#pragma unroll
    for (int r = 0; r < LAST_Q; r++) acc[r] = 0.f;
    for (int c0 = 0; c0 < p.d; c0 += VS_CHUNK)
    {
        __syncthreads();
        for (int i = threadIdx.x; i < LAST_Q * VS_CHUNK; i += THREADS)
        {
            const int r = i / VS_CHUNK, c = c0 + i % VS_CHUNK;
            qs[r][i % VS_CHUNK] = r < p.rows && c < p.d
                ? load_elem(p.q, b * p.q_batch + (i64)(p.first + r) * p.q_row + h * p.q_head + c) * p.scale : 0.f;
        }
        for (int i = threadIdx.x; i < THREADS * VS_CHUNK; i += THREADS)
        {
            const int key = i / VS_CHUNK, c = c0 + i % VS_CHUNK;
            ks[key][i % VS_CHUNK] = j0 + key < p.seqlen_k && c < p.d ? load_elem(p.k, kbase + (i64)(j0 + key) * p.k_row + c) : 0.f;
        }
        __syncthreads();
#pragma unroll 2
        for (int c = 0; c < VS_CHUNK; c += 4)
        {
            const float x0 = ks[threadIdx.x][c], x1 = ks[threadIdx.x][c + 1], x2 = ks[threadIdx.x][c + 2], x3 = ks[threadIdx.x][c + 3];
#pragma unroll
            for (int r = 0; r < LAST_Q; r++)
            {
                const float4 qv = *(const float4*)&qs[r][c];
                acc[r] += qv.x * x0 + qv.y * x1 + qv.z * x2 + qv.w * x3;
            }
        }
    }
    const float neg_inf = -__int_as_float(0x7f800000);
#pragma unroll
    for (int r = 0; r < LAST_Q; r++)
    {
        const bool visible = j < p.seqlen_k && r < p.rows && (!p.causal || (i64)j <= (i64)p.first + r + p.causal_offset);
        acc[r] = visible ? acc[r] : neg_inf;
    }
    if (j < p.seqlen_k)
    {
        float* out = p.scores + ((i64)(b * p.heads + h) * p.rows) * p.seqlen_k + j;
#pragma unroll
        for (int r = 0; r < LAST_Q; r++)
            if (r < p.rows) out[(i64)r * p.seqlen_k] = acc[r];
    }
    // The group's (max, Σ exp) per row: warp maxima, the block's, then warp sums of exp against it.
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int r = 0; r < LAST_Q; r++)
    {
        const float m = warp_max(acc[r]);
        if (lane == 0) red[r][warp] = m;
    }
    __syncthreads();
    if (threadIdx.x < LAST_Q)
    {
        float m = red[threadIdx.x][0];
        for (int w = 1; w < WARPS; w++) m = fmaxf(m, red[threadIdx.x][w]);
        row_max[threadIdx.x] = m;
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < LAST_Q; r++)
    {
        const float m = row_max[r];
        const float e = warp_sum(m == neg_inf ? 0.f : __expf(acc[r] - m));
        if (lane == 0) red[r][warp] = e;
    }
    __syncthreads();
    if (threadIdx.x < p.rows)
    {
        float s = 0.f;
        for (int w = 0; w < WARPS; w++) s += red[threadIdx.x][w];
        p.partials[((i64)(b * p.heads + h) * p.rows + threadIdx.x) * p.key_groups + blockIdx.x] = make_float2(row_max[threadIdx.x], s);
    }
}

// Grid (rows, H, B): a row's max and 1 / (Σ exp(x − max) · rows) from its groups' partials (a row that sees no key
// gets max −∞ and 0).
extern "C" __global__ void __launch_bounds__(THREADS) vs_norms(const VsScoreParams p, float2* norms)
{
    __shared__ float red[WARPS];
    const int r = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const i64 at = (i64)(b * p.heads + h) * p.rows + r;
    const float2* part = p.partials + at * p.key_groups;
    const float neg_inf = -__int_as_float(0x7f800000);
    float m = neg_inf;
    for (int g = threadIdx.x; g < p.key_groups; g += THREADS) m = fmaxf(m, part[g].x);
    m = block_max(m, red);
    float s = 0.f;
    if (m != neg_inf)
        for (int g = threadIdx.x; g < p.key_groups; g += THREADS)
            if (part[g].x != neg_inf) s += part[g].y * __expf(part[g].x - m);
    s = block_sum(s, red);
    if (threadIdx.x == 0) norms[at] = make_float2(m, s > 0.f ? 1.f / (s * (float)p.rows) : 0.f);
}

// Grid (ceil(Skv / THREADS), H, B): thread j writes vertical[j] (column j's mean probability over the rows) and
// slash[j] (diagonal offset j's), +∞ for the forced sink columns and local diagonals.
extern "C" __global__ void __launch_bounds__(THREADS) vs_profile(const VsScoreParams p, const float2* norms, float* vertical, float* slash, int sink_columns, int local_diagonals)
{
    const int h = blockIdx.y, b = blockIdx.z;
    const int j = blockIdx.x * THREADS + threadIdx.x;
    if (j >= p.seqlen_k) return;
    const i64 head = (i64)(b * p.heads + h);
    const float* scores = p.scores + head * p.rows * p.seqlen_k;
    float vs = 0.f, ss = 0.f;
    for (int r = 0; r < p.rows; r++)
    {
        const float2 nm = norms[head * p.rows + r];
        if (nm.y == 0.f) continue;
        const float* row = scores + (i64)r * p.seqlen_k;
        vs += __expf(row[j] - nm.x) * nm.y;
        const i64 key = (i64)p.first + r + p.causal_offset - j;   // the key on diagonal offset j in row r
        if (key >= 0 && key < p.seqlen_k) ss += __expf(row[key] - nm.x) * nm.y;
    }
    const float inf = __int_as_float(0x7f800000);
    vertical[head * p.seqlen_k + j] = j < sink_columns ? inf : vs;
    slash[head * p.seqlen_k + j] = j < local_diagonals ? inf : ss;
}

// Floats as unsigned ints in the same order (sign bit flipped for x ≥ 0, all bits for x < 0).
__device__ __forceinline__ u32 order_key(float x)
{
    const u32 bits = __float_as_uint(x);
    return bits ^ ((bits & 0x80000000u) ? 0xffffffffu : 0x80000000u);
}

// Grid (rows): the min(k, n) largest of each row of floats (±∞ allowed, no NaN), written ascending by index to
// list[row · list_stride ...], their number to count[row]. The k-th largest t (#(x > t) < k ≤ #(x ≥ t)) is found by a
// radix select on the float bits; the entries tied at t are taken lowest index first.
extern "C" __global__ void __launch_bounds__(THREADS) topk_rows(const float* values, int n, int k, int* list, int list_stride, int* count)
{
    __shared__ float red[WARPS];
    __shared__ int offsets[THREADS];
    const float* x = values + (i64)blockIdx.x * n;
    int* out = list + (i64)blockIdx.x * list_stride;
    const int per = (n + THREADS - 1) / THREADS;
    const int i0 = min(n, (int)threadIdx.x * per), i1 = min(n, i0 + per);
    if (k >= n)
    {
        for (int i = i0; i < i1; i++) out[i] = i;
        if (threadIdx.x == 0) count[blockIdx.x] = n;
        return;
    }
    // t = the k-th largest value, found by its order key 8 bits at a time: per pass a
    // shared histogram of the next byte among the values matching the bytes found so far (4 passes over the row; a
    // bisection took 31 passes and 1.03 ms per 32 × 131072 profile, this 0.48 ms — the shared atomics serialise, as
    // the profiles share a few exponents; aggregating equal bytes per warp with __match_any_sync was slower, 0.83 ms).
    __shared__ int hist[256];
    __shared__ u32 found_prefix;
    __shared__ int found_remaining;
    u32 prefix = 0, mask = 0;
    int remaining = k;   // rank of t among the values matching prefix
    for (int shift = 24; shift >= 0; shift -= 8)
    {
        for (int i = threadIdx.x; i < 256; i += THREADS) hist[i] = 0;
        __syncthreads();
        for (int i = threadIdx.x; i < n; i += THREADS)
        {
            const u32 bits = order_key(x[i]);
            if ((bits & mask) == prefix) atomicAdd(&hist[(bits >> shift) & 255u], 1);
        }
        __syncthreads();
        // The byte holding the remaining-th largest: warp 0, 8 bins per lane, a suffix sum over the lanes finds the
        // lane, which walks its 8 bins (one thread walking all 256 took ≈ 4 µs per pass: most of a Quest selection).
        if (threadIdx.x < 32)
        {
            const int lane = threadIdx.x;
            int mine = 0;
            for (int i = 0; i < 8; i++) mine += hist[lane * 8 + i];
            int suffix = mine;   // Σ of lanes ≥ this one
            for (int o = 1; o < 32; o <<= 1)
            {
                const int v = __shfl_down_sync(0xffffffffu, suffix, o);
                if (lane + o < 32) suffix += v;
            }
            const int higher = suffix - mine;
            if (higher < remaining && suffix >= remaining)
            {
                int digit = lane * 8 + 7, rem = remaining - higher;
                for (; digit > lane * 8 && hist[digit] < rem; digit--) rem -= hist[digit];
                found_prefix = prefix | ((u32)digit << shift);
                found_remaining = rem;
            }
        }
        __syncthreads();
        prefix = found_prefix;
        remaining = found_remaining;
        mask |= 255u << shift;
    }
    const float t = __uint_as_float((prefix & 0x80000000u) ? prefix ^ 0x80000000u : ~prefix);   // order_key's inverse
    int above_mine = 0, tied_mine = 0;
    for (int i = i0; i < i1; i++)
    {
        above_mine += x[i] > t ? 1 : 0;
        tied_mine += x[i] == t ? 1 : 0;
    }
    int above_total, tied_total;
    block_exclusive_scan<THREADS>(above_mine, offsets, &above_total);
    __syncthreads();
    int tied_rank = block_exclusive_scan<THREADS>(tied_mine, offsets, &tied_total);
    const int ties = k - above_total;   // ≥ 1
    int keep_mine = 0;
    for (int i = i0, tr = tied_rank; i < i1; i++)
    {
        if (x[i] > t) keep_mine++;
        else if (x[i] == t && tr++ < ties) keep_mine++;
    }
    __syncthreads();
    int kept;
    int at = block_exclusive_scan<THREADS>(keep_mine, offsets, &kept);
    for (int i = i0, tr = tied_rank; i < i1; i++)
    {
        if (x[i] > t || (x[i] == t && tr++ < ties)) out[at++] = i;
    }
    if (threadIdx.x == 0) count[blockIdx.x] = kept;
}

struct VsPlanParams
{
    const int* columns;         // [B · H, column_stride] ascending vertical columns
    const int* column_count;    // [B · H]
    const int* offsets;         // [B · H, offset_stride] slash offsets
    const int* offset_count;    // [B · H]
    int* block_counts;          // [rows]
    int* block_scratch;         // [rows, key blocks]
    int* token_counts;          // [rows]
    int* token_scratch;         // [rows, column_stride]
    int heads, block, q_blocks, k_blocks, seqlen_q, seqlen_k, causal, causal_offset, column_stride, offset_stride;
};

// Grid (query blocks, H, B), THREADS threads; dynamic shared memory: key blocks bytes (the slash bitmap).
extern "C" __global__ void __launch_bounds__(THREADS) vs_plan(const VsPlanParams p)
{
    extern __shared__ unsigned char crossed[];
    __shared__ int scan[THREADS];
    const int qb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int head = b * p.heads + h, row = head * p.q_blocks + qb;
    const i64 q0 = (i64)qb * p.block, q1 = min((i64)(qb + 1) * p.block, (i64)p.seqlen_q);
    i64 keys = p.seqlen_k;   // keys the block's last row sees
    if (p.causal) keys = max((i64)0, min((i64)p.seqlen_k, q1 - 1 + p.causal_offset + 1));
    const int visible = (int)((keys + p.block - 1) / p.block);
    for (int i = threadIdx.x; i < p.k_blocks; i += THREADS) crossed[i] = 0;
    __syncthreads();
    const int* offs = p.offsets + (i64)head * p.offset_stride;
    for (int i = threadIdx.x; i < p.offset_count[head]; i += THREADS)
    {
        const i64 lo = q0 + p.causal_offset - offs[i], hi = q1 - 1 + p.causal_offset - offs[i];
        if (hi < 0 || lo >= p.seqlen_k) continue;
        const int kb0 = (int)(max(lo, (i64)0) / p.block), kb1 = (int)(min(hi, (i64)p.seqlen_k - 1) / p.block);
        for (int kb = kb0; kb <= min(kb1, visible - 1); kb++) crossed[kb] = 1;
    }
    __syncthreads();
    // Crossed blocks, ascending.
    {
        const int per = (visible + THREADS - 1) / THREADS;
        const int i0 = min(visible, (int)threadIdx.x * per), i1 = min(visible, i0 + per);
        int mine = 0;
        for (int i = i0; i < i1; i++) mine += crossed[i];
        int total;
        int at = block_exclusive_scan<THREADS>(mine, scan, &total);
        int* out = p.block_scratch + (i64)row * p.k_blocks;
        for (int i = i0; i < i1; i++)
            if (crossed[i]) out[at++] = i;
        if (threadIdx.x == 0) p.block_counts[row] = total;
    }
    __syncthreads();
    // Verticals the block sees outside the crossed blocks (their own blocks count them), ascending.
    {
        const int* cols = p.columns + (i64)head * p.column_stride;
        const int n = p.column_count[head];
        const int per = (n + THREADS - 1) / THREADS;
        const int i0 = min(n, (int)threadIdx.x * per), i1 = min(n, i0 + per);
        int mine = 0;
        for (int i = i0; i < i1; i++) mine += cols[i] < keys && !crossed[cols[i] / p.block] ? 1 : 0;
        int total;
        int at = block_exclusive_scan<THREADS>(mine, scan, &total);
        int* out = p.token_scratch + (i64)row * p.column_stride;
        for (int i = i0; i < i1; i++)
            if (cols[i] < keys && !crossed[cols[i] / p.block]) out[at++] = cols[i];
        if (threadIdx.x == 0) p.token_counts[row] = total;
    }
}

// Grid (rows): row r's count[r] entries of scratch (row stride `stride`) to dst[row_start[r] ...].
extern "C" __global__ void __launch_bounds__(128) compact_rows(const int* counts, const int* scratch, int stride, const int* row_start, int* dst)
{
    const int row = blockIdx.x, n = counts[row], first = row_start[row];
    for (int j = threadIdx.x; j < n; j += blockDim.x) dst[first + j] = scratch[(i64)row * stride + j];
}
