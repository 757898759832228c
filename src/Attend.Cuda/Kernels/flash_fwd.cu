// Fused attention forward, FlashAttention-2 structure (Dao, arXiv:2307.08691) on warp-level tensor-core MMA:
// one thread block per (query block of BLOCK_M rows, head, batch); each warp owns ROWS = BLOCK_M / WARPS query rows
// and walks the key blocks of BLOCK_N keys: S = Q·Kᵀ (mma.sync m16n8k16, operands from shared memory through
// ldmatrix), online softmax in registers on exp2 with the scale folded in, then O += P·V with P reused from the
// S accumulators as the A operand (no round trip through shared memory). K/V tiles stream through a two-stage
// cp.async pipeline. No CUDA headers: built-ins and inline PTX only, so any NVRTC >= 11.8 compiles it.
//
// Compile-time parameters (-D):
//   HEAD_DIM   padded head dim, a multiple of 64 (the real D <= HEAD_DIM is a run-time parameter; zero padded)
//   BLOCK_M    query rows per block        BLOCK_N  keys per block        WARPS  warps per block
//   IS_BF16    1: bf16 operands, 0: f16     IS_CAUSAL  0/1                HAS_SOFTCAP  0/1
//   HAS_PLAN   1: walk the key blocks of a block-sparse plan (CSR rows per (batch, head, query block), each block
//              Full or Partial) instead of all of them; Partial blocks keep the pairs where MASK_EXPR — a C
//              expression over ints b, h, q, kv (Mask.ToCuda) — is true. IS_CAUSAL is 0 then (causal is in the mask).
//   HAS_TOKENS 1: after its plan blocks, each query block also attends gathered key rows (a TokenSet: CSR rows of key
//              indices per (batch, head, query block), the tokens inside visited blocks already removed on the host)
//              in tiles of BLOCK_N gathered rows; pairs where TOKEN_MASK_EXPR (over b, h, q, kv) is false are skipped.
//   USE_WGMMA  (sm_90a only; WARPS 4, BLOCK_M 128, BLOCK_N 64, HEAD_DIM 64 or 128) Hopper's warpgroup MMA instead
//              of ldmatrix + mma.sync: 1 — S = Q·Kᵀ (wgmma m64n64k16, Q and K read by the tensor cores from shared
//              memory in the 128-byte-swizzle K-major layout); 2 — also O += P·V (wgmma m64nDk16, P from registers,
//              V as an MN-major shared operand). The four warps are one warpgroup; warp w owns rows
//              16w.. of each of the two m64 tiles.
// Layout: q [B, Sq, H, D], k/v [B, Skv, Hkv, D], o [B, Sq, H, D] with D contiguous and the other strides in
// elements (multiples of 8, 16-byte aligned rows); lse [B, Sq, H] f32 (optional).

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef BLOCK_M
#define BLOCK_M 128
#endif
#ifndef BLOCK_N
#define BLOCK_N 64
#endif
#ifndef WARPS
#define WARPS 8
#endif
#ifndef IS_BF16
#define IS_BF16 1
#endif
#ifndef IS_CAUSAL
#define IS_CAUSAL 0
#endif
#ifndef HAS_SOFTCAP
#define HAS_SOFTCAP 0
#endif
#ifndef HAS_PLAN
#define HAS_PLAN 0
#endif
#ifndef MASK_EXPR
#define MASK_EXPR true
#endif
#ifndef USE_WGMMA
#define USE_WGMMA 0
#endif
#ifndef HAS_TOKENS
#define HAS_TOKENS 0
#endif
#ifndef TOKEN_MASK_EXPR
#define TOKEN_MASK_EXPR true
#endif
#if HAS_TOKENS && !HAS_PLAN
#error "HAS_TOKENS runs with HAS_PLAN (a token-only plan comes with an empty block plan)"
#endif

#define ROWS (BLOCK_M / WARPS)          // query rows per warp
#define M_TILES (ROWS / 16)             // m16 tiles per warp
#define N_TILES (BLOCK_N / 8)           // n8 tiles of S per warp
#define D_TILES (HEAD_DIM / 8)          // n8 tiles of O per warp
#define CHUNKS (HEAD_DIM / 8)           // 16-byte chunks per row

static_assert(HEAD_DIM % 64 == 0, "HEAD_DIM must be a multiple of 64 (swizzle of 8 chunks)");
static_assert(ROWS % 16 == 0, "each warp needs whole m16 tiles");
static_assert(BLOCK_N % 16 == 0, "BLOCK_N must be a multiple of 16");
#if USE_WGMMA
static_assert(WARPS == 4 && BLOCK_M == 128 && BLOCK_N == 64, "the wgmma path is one warpgroup over two m64 tiles and n64 key blocks");
// Warp w's m16 tile mt: rows 64·mt + 16·w of the block (the wgmma accumulator layout).
#define MT_ROW(warp, mt) ((mt) * 64 + (warp) * 16)
#else
// Warp w's m16 tile mt: rows ROWS·w + 16·mt of the block.
#define MT_ROW(warp, mt) ((warp) * ROWS + (mt) * 16)
#endif

#define NEG_INF __int_as_float(0xff800000)

#define MMA_F16 (!IS_BF16)
#include "mma.cuh"

struct FlashParams
{
    const u16* q;
    const u16* k;
    const u16* v;
    u16* o;
    float* lse;                         // null: not written
    i64 q_batch, q_row, q_head;         // strides in elements
    i64 k_batch, k_row, k_head;
    i64 v_batch, v_row, v_head;
    i64 o_batch, o_row, o_head;
    i64 lse_batch, lse_row, lse_head;
    int seqlen_q, seqlen_k, heads, group, head_dim;
    int causal_offset;                  // seqlen_k - seqlen_q: query i sees keys j <= i + offset
    float scale_log2;                   // scale * log2(e)
    float softcap_pre;                  // scale / cap
    float softcap_post;                 // cap * log2(e)
    // Block-sparse plan (HAS_PLAN): CSR rows r = ((pb * plan_heads) + ph) * plan_q_blocks + qb, pb/ph 0 when the
    // plan is broadcast over batch/heads; plan_cols[i] is a key block of plan_block_k = plan_expand · BLOCK_N keys,
    // plan_kinds[i] 1 = Full (no mask), 2 = Partial (MASK_EXPR per element).
    const int* plan_row_start;
    const int* plan_cols;
    const unsigned char* plan_kinds;
    int plan_batch, plan_heads, plan_q_blocks, plan_block_q, plan_expand;
    // Gathered tokens (HAS_TOKENS): CSR rows r = ((tb · token_heads) + th) · token_q_blocks + qb of key indices.
    const int* token_row_start;
    const int* tokens;
    int token_batch, token_heads, token_q_blocks, token_block_q;
    // Data a mask expression reads (Mask.CudaData: bucket ids and positions of a permuted bucket plan), or null.
    const int* mask_data;
};

// Swizzled element offset of (row, 16-byte chunk) in a [rows, HEAD_DIM] tile: chunk ^ (row % 8) spreads the 8 rows
// an ldmatrix reads over all 32 banks.
__device__ __forceinline__ int swz(int row, int chunk)
{
    return row * HEAD_DIM + ((chunk ^ (row & 7)) << 3);
}

// wgmma's 128-byte-swizzle K-major layout of a [TILE_ROWS, HEAD_DIM] tile: the 64-column halves one after the
// other, each [TILE_ROWS, 64] with 128-byte rows, 16-byte chunk c of row r stored at chunk c ^ (r % 8) — what the
// hardware's swizzle does on address bits [4:6] ^ [7:9], so each half must start 1024-byte aligned.
template <int TILE_ROWS>
__device__ __forceinline__ int swz_kmajor(int row, int chunk)
{
    return (chunk >> 3) * (TILE_ROWS * 64) + row * 64 + (((chunk & 7) ^ (row & 7)) << 3);
}

__device__ __forceinline__ float fast_exp2(float x)
{
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float fast_log2(float x)
{
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float fast_tanh(float x)
{
    float y;
    asm("tanh.approx.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

#if USE_WGMMA
// Shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format"): start address >> 4 in bits 0-13, leading
// byte offset >> 4 in 16-29 (unused by K-major swizzled operands whose k16 slice fits the 128-byte row: 1), stride
// byte offset >> 4 in 32-45 (1024: from one 8-row group to the next), swizzle mode in 62-63 (1 = 128-byte).
// For an MN-major operand (V: N = the head dim contiguous) the leading byte offset is the distance between 64-column
// halves (CUTLASS's canonical SW128 MN-major layout ((64, m), (8, k)) : ((1, LBO), (64, SBO))).
__device__ __forceinline__ unsigned long long wgmma_desc(const u16* tile, unsigned long long leading_bytes = 16)
{
    const unsigned long long addr = smem_u32(tile);
    return ((addr & 0x3FFFFull) >> 4) | ((leading_bytes >> 4) << 16) | ((1024ull >> 4) << 32) | (1ull << 62);
}

// Orders the accumulators around the asynchronous MMA: the compiler must not read or move them across this point.
template <int TILES>
__device__ __forceinline__ void wgmma_fence_operands(float (&d)[TILES][4])
{
#pragma unroll
    for (int n = 0; n < TILES; n++)
#pragma unroll
        for (int r = 0; r < 4; r++) asm volatile("" : "+f"(d[n][r]) :: "memory");
}

// D[64×64] += A[64×16]·B[16×64]: A (queries) and B (keys, K-major) from shared memory through their descriptors.
__device__ __forceinline__ void wgmma_m64n64k16(float (&d)[N_TILES][4], unsigned long long desc_a, unsigned long long desc_b)
{
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
#if IS_BF16
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
#else
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
#endif
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "%32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "l"(desc_a), "l"(desc_b), "r"(1));
}

// O[64×HEAD_DIM] += P[64×16]·V[16×HEAD_DIM]: P from registers (the mma.sync A-fragment layout, which wgmma's register
// operand shares), V from shared memory as an MN-major operand (imm-trans-b = 1): rows of V are the K dimension.
__device__ __forceinline__ void wgmma_pv(float (&d)[D_TILES][4], const u32 (&a)[4], unsigned long long desc_b)
{
#if HEAD_DIM == 128
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
#if IS_BF16
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
#else
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
#endif
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        :
          "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),
          "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
          "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
          "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),
          "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
#elif HEAD_DIM == 64
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
#if IS_BF16
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
#else
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
#endif
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "{%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        :
          "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
#else
#error "the wgmma P·V path covers HEAD_DIM 64 and 128"
#endif
}
#endif

// Copies `rows` valid rows (of BLOCK rows) of a [rows, D] global tile into a swizzled shared tile; rows past the
// end and chunks past D are zero-filled.
template <int BLOCK, bool KMAJOR = false>
__device__ __forceinline__ void load_tile(u16* smem, const u16* gmem, i64 row_stride, int valid_rows, int head_dim)
{
    // Thread i copies chunk i % CHUNKS of rows i / CHUNKS + k·ROWS_PER_PASS: a constant trip count, so the loop
    // unrolls and the swizzled destination is one base plus constant steps (row & 7 is the same every pass).
    constexpr int THREADS = WARPS * 32;
    if constexpr (THREADS % CHUNKS != 0 || (THREADS / CHUNKS) % 8 != 0 || BLOCK % (THREADS / CHUNKS) != 0)
    {
        // Where a pass does not cover a multiple of 8 rows (the swizzle period), e.g. D = 192 or 256 with 4 warps:
        // the plain strided loop.
        for (int i = threadIdx.x; i < BLOCK * CHUNKS; i += THREADS)
        {
            int row = i / CHUNKS, c = i % CHUNKS;
            bool valid = row < valid_rows && c * 8 < head_dim;
            cp_async16(smem_u32(smem + (KMAJOR ? swz_kmajor<BLOCK>(row, c) : swz(row, c))), valid ? gmem + row * row_stride + c * 8 : gmem, valid);
        }
        return;
    }
    constexpr int ROWS_PER_PASS = THREADS / CHUNKS > 0 ? THREADS / CHUNKS : 1;
    const int chunk = threadIdx.x % CHUNKS, row0 = threadIdx.x / CHUNKS;
    const bool chunk_valid = chunk * 8 < head_dim;
    const u32 dst0 = smem_u32(smem + (KMAJOR ? swz_kmajor<BLOCK>(row0, chunk) : swz(row0, chunk)));
    constexpr int SMEM_ROW = KMAJOR ? 64 : HEAD_DIM;   // elements from one row to the next in shared memory
    const u16* src0 = gmem + row0 * row_stride + chunk * 8;
#pragma unroll
    for (int k = 0; k < BLOCK / ROWS_PER_PASS; k++)
    {
        const int row = row0 + k * ROWS_PER_PASS;
        const bool valid = chunk_valid && row < valid_rows;
        cp_async16(dst0 + k * ROWS_PER_PASS * SMEM_ROW * 2, valid ? src0 + k * ROWS_PER_PASS * row_stride : gmem, valid);
    }
}

// Gathered rows: row r of the tile is global row idx[r] (r < count); the rest and chunks past D are zero-filled.
template <int BLOCK, bool KMAJOR = false>
__device__ __forceinline__ void load_tile_gather(u16* smem, const u16* gmem, i64 row_stride, const int* idx, int count, int head_dim)
{
    for (int i = threadIdx.x; i < BLOCK * CHUNKS; i += WARPS * 32)
    {
        const int row = i / CHUNKS, c = i % CHUNKS;
        const bool valid = row < count && c * 8 < head_dim;
        cp_async16(smem_u32(smem + (KMAJOR ? swz_kmajor<BLOCK>(row, c) : swz(row, c))), valid ? gmem + (i64)idx[row] * row_stride + c * 8 : gmem, valid);
    }
}

// Sets excluded (row, key) scores to -inf: keys past the end, and above the causal diagonal. Per row only a
// limit is computed (keys n_start + [0, limit) are allowed), compared with each element's constant column.
__device__ __forceinline__ void mask_scores(float (&acc_s)[M_TILES][N_TILES][4], const FlashParams& p, int m_start, int warp, int n_start, int g, int t)
{
#pragma unroll
    for (int mt = 0; mt < M_TILES; mt++)
#pragma unroll
        for (int half = 0; half < 2; half++)
        {
            int limit = p.seqlen_k - n_start;
            if (IS_CAUSAL) limit = min(limit, m_start + MT_ROW(warp, mt) + g + half * 8 + p.causal_offset - n_start + 1);
            limit -= 2 * t;
#pragma unroll
            for (int n = 0; n < N_TILES; n++)
            {
                if (n * 8 >= limit) acc_s[mt][n][half * 2] = NEG_INF;
                if (n * 8 + 1 >= limit) acc_s[mt][n][half * 2 + 1] = NEG_INF;
            }
        }
}

// Partial plan blocks: keeps the pairs MASK_EXPR allows (and keys before the end), element by element.
__device__ __forceinline__ void mask_scores_expr(float (&acc_s)[M_TILES][N_TILES][4], const FlashParams& p, int batch, int head,
    int m_start, int warp, int n_start, int g, int t)
{
    const int b = batch, h = head;
    (void)b; (void)h;
#pragma unroll
    for (int mt = 0; mt < M_TILES; mt++)
#pragma unroll
        for (int half = 0; half < 2; half++)
        {
            const int q = m_start + MT_ROW(warp, mt) + g + half * 8;
            (void)q;
#pragma unroll
            for (int n = 0; n < N_TILES; n++)
#pragma unroll
                for (int e = 0; e < 2; e++)
                {
                    const int kv = n_start + n * 8 + 2 * t + e;
                    if (kv >= p.seqlen_k || !(MASK_EXPR)) acc_s[mt][n][half * 2 + e] = NEG_INF;
                }
        }
}

// Gathered tiles: column j holds key cols[j] (-1 past the tile's tokens); keeps the pairs TOKEN_MASK_EXPR allows.
__device__ __forceinline__ void mask_scores_tokens(float (&acc_s)[M_TILES][N_TILES][4], const FlashParams& p, int batch, int head,
    int m_start, int warp, const int* cols, int g, int t)
{
    const int b = batch, h = head;
    (void)b; (void)h; (void)p;
#pragma unroll
    for (int mt = 0; mt < M_TILES; mt++)
#pragma unroll
        for (int half = 0; half < 2; half++)
        {
            const int q = m_start + MT_ROW(warp, mt) + g + half * 8;
            (void)q;
#pragma unroll
            for (int n = 0; n < N_TILES; n++)
#pragma unroll
                for (int e = 0; e < 2; e++)
                {
                    const int kv = cols[n * 8 + 2 * t + e];
                    if (kv < 0 || !(TOKEN_MASK_EXPR)) acc_s[mt][n][half * 2 + e] = NEG_INF;
                }
        }
}

// Online softmax over one block of raw scores in registers. Each quad of lanes holds one row's 2·N_TILES values;
// the row max is reduced across the quad, the row sum stays per-thread until the end.
// The reference max is updated only when the block max exceeds it by more than RESCALE_SLACK (log2 units), as in
// FlashAttention-4: probabilities then stay <= 2^RESCALE_SLACK (no overflow in f32 or bf16), the result is exact
// (output and LSE do not depend on the reference), and most blocks skip rescaling the O accumulators.
#define RESCALE_SLACK 8.f
__device__ __forceinline__ void online_softmax(float (&acc_s)[M_TILES][N_TILES][4], float (&acc_o)[M_TILES][D_TILES][4],
    float (&row_max)[M_TILES][2], float (&row_sum)[M_TILES][2], const FlashParams& p)
{
#if HAS_SOFTCAP
    const float scale = 1.f;                 // softcapped scores are already in log2 units
#else
    const float scale = p.scale_log2;        // > 0 (checked on the host)
#endif
    float alpha[M_TILES][2];
    bool rescale = false;
#pragma unroll
    for (int mt = 0; mt < M_TILES; mt++)
    {
#pragma unroll
        for (int half = 0; half < 2; half++)
        {
            // Tree reductions instead of 2·N_TILES-long dependent max/add chains ("wait" was ncu's top stall).
            // Measured on the H100: no change (0.84 ms at S=4096, 12.70 vs 12.75 ms at S=16384); kept as the
            // shorter dependency path.
            float m[N_TILES];
#pragma unroll
            for (int n = 0; n < N_TILES; n++) m[n] = fmaxf(acc_s[mt][n][half * 2], acc_s[mt][n][half * 2 + 1]);
#pragma unroll
            for (int w = N_TILES / 2; w >= 1; w /= 2)
#pragma unroll
                for (int n = 0; n < w; n++) m[n] = fmaxf(m[n], m[n + w]);
            float mx = m[0];
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float old_max = row_max[mt][half];
            const float block_max = mx * scale;
            alpha[mt][half] = 1.f;
            if (block_max > old_max + RESCALE_SLACK)
            {
                alpha[mt][half] = fast_exp2(old_max - block_max);   // 0 when old_max is -inf
                row_max[mt][half] = block_max;
                rescale = true;
            }
            const float used_max = row_max[mt][half] == NEG_INF ? 0.f : row_max[mt][half];   // never -inf - -inf
            float part[N_TILES];
#pragma unroll
            for (int n = 0; n < N_TILES; n++)
            {
                float p0 = fast_exp2(fmaf(acc_s[mt][n][half * 2], scale, -used_max));
                float p1 = fast_exp2(fmaf(acc_s[mt][n][half * 2 + 1], scale, -used_max));
                acc_s[mt][n][half * 2] = p0;
                acc_s[mt][n][half * 2 + 1] = p1;
                part[n] = p0 + p1;
            }
#pragma unroll
            for (int w = N_TILES / 2; w >= 1; w /= 2)
#pragma unroll
                for (int n = 0; n < w; n++) part[n] += part[n + w];
            const float sum = part[0];
            row_sum[mt][half] = row_sum[mt][half] * alpha[mt][half] + sum;
        }
    }
    if (__any_sync(0xffffffffu, rescale))
    {
#pragma unroll
        for (int mt = 0; mt < M_TILES; mt++)
#pragma unroll
            for (int d = 0; d < D_TILES; d++)
            {
                acc_o[mt][d][0] *= alpha[mt][0];
                acc_o[mt][d][1] *= alpha[mt][0];
                acc_o[mt][d][2] *= alpha[mt][1];
                acc_o[mt][d][3] *= alpha[mt][1];
            }
    }
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
flash_fwd(const FlashParams p)
{
    extern __shared__ __align__(1024) u16 smem[];      // 1024: the wgmma swizzle atoms
    constexpr bool KMAJOR = USE_WGMMA >= 1;             // Q and K tiles in wgmma's layout
    constexpr bool VMAJOR = USE_WGMMA >= 2;             // V too
    u16* sQ = smem;                                 // [BLOCK_M, HEAD_DIM]
    u16* sK = sQ + BLOCK_M * HEAD_DIM;              // [2][BLOCK_N, HEAD_DIM]
    u16* sV = sK + 2 * BLOCK_N * HEAD_DIM;          // [2][BLOCK_N, HEAD_DIM]

    const int m_blocks = (p.seqlen_q + BLOCK_M - 1) / BLOCK_M;
    const int m_block = IS_CAUSAL ? m_blocks - 1 - blockIdx.x : blockIdx.x;   // longest causal rows first
    const int head = blockIdx.y, batch = blockIdx.z;
    const int kv_head = head / p.group;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;          // mma fragment coordinates
    const int m_start = m_block * BLOCK_M;

    const u16* q = p.q + batch * p.q_batch + head * p.q_head + (i64)m_start * p.q_row;
    const u16* k = p.k + batch * p.k_batch + kv_head * p.k_head;
    const u16* v = p.v + batch * p.v_batch + kv_head * p.v_head;

    // Key blocks this query block needs: all of them, up to the diagonal of its last row, or the plan's row
    // (entry j of the walk is key block plan_cols[first + j / expand] · expand + j % expand).
    int n_end = (p.seqlen_k + BLOCK_N - 1) / BLOCK_N;
    if (IS_CAUSAL)
    {
        int last_key = min(p.seqlen_q, m_start + BLOCK_M) - 1 + p.causal_offset;   // last key any row sees
        n_end = min(n_end, last_key < 0 ? 0 : last_key / BLOCK_N + 1);
    }
#if HAS_PLAN
    const int plan_row = ((p.plan_batch == 1 ? 0 : batch) * p.plan_heads + (p.plan_heads == 1 ? 0 : head)) * p.plan_q_blocks
        + m_start / p.plan_block_q;
    const int plan_first = p.plan_row_start[plan_row];
    n_end = (p.plan_row_start[plan_row + 1] - plan_first) * p.plan_expand;
#define KEY_BLOCK(j) (p.plan_cols[plan_first + (j) / p.plan_expand] * p.plan_expand + (j) % p.plan_expand)
#else
#define KEY_BLOCK(j) (j)
#endif

    float acc_o[M_TILES][D_TILES][4];
    float row_max[M_TILES][2], row_sum[M_TILES][2];
#pragma unroll
    for (int mt = 0; mt < M_TILES; mt++)
    {
#pragma unroll
        for (int d = 0; d < D_TILES; d++) acc_o[mt][d][0] = acc_o[mt][d][1] = acc_o[mt][d][2] = acc_o[mt][d][3] = 0.f;
        row_max[mt][0] = row_max[mt][1] = NEG_INF;
        row_sum[mt][0] = row_sum[mt][1] = 0.f;
    }

    int n_total = n_end;                             // key blocks, then gathered tiles
#if HAS_TOKENS
    const int tok_row = ((p.token_batch == 1 ? 0 : batch) * p.token_heads + (p.token_heads == 1 ? 0 : head)) * p.token_q_blocks
        + m_start / p.token_block_q;
    const int tok_first = p.token_row_start[tok_row];
    const int tok_count = p.token_row_start[tok_row + 1] - tok_first;
    n_total += (tok_count + BLOCK_N - 1) / BLOCK_N;
    int* s_tok = (int*)(sV + 2 * BLOCK_N * HEAD_DIM);   // [2][BLOCK_N]: the key index of each gathered column, -1 past the end
#endif
    // Issues the loads of walk entry j (a key block, or a tile of gathered tokens) into pipeline stage st.
    auto issue = [&](int j, int st)
    {
        u16* dK = sK + st * BLOCK_N * HEAD_DIM;
        u16* dV = sV + st * BLOCK_N * HEAD_DIM;
        if (j < n_end)
        {
            const int first = KEY_BLOCK(j) * BLOCK_N;
            load_tile<BLOCK_N, KMAJOR>(dK, k + (i64)first * p.k_row, p.k_row, p.seqlen_k - first, p.head_dim);
            load_tile<BLOCK_N, VMAJOR>(dV, v + (i64)first * p.v_row, p.v_row, p.seqlen_k - first, p.head_dim);
        }
#if HAS_TOKENS
        else
        {
            const int t0 = (j - n_end) * BLOCK_N, count = min(BLOCK_N, tok_count - t0);
            const int* idx = p.tokens + tok_first + t0;
            load_tile_gather<BLOCK_N, KMAJOR>(dK, k, p.k_row, idx, count, p.head_dim);
            load_tile_gather<BLOCK_N, VMAJOR>(dV, v, p.v_row, idx, count, p.head_dim);
            for (int i = threadIdx.x; i < BLOCK_N; i += WARPS * 32) s_tok[st * BLOCK_N + i] = i < count ? idx[i] : -1;
        }
#endif
        cp_async_commit();
    };

    if (n_total > 0)
    {
        load_tile<BLOCK_M, KMAJOR>(sQ, q, p.q_row, p.seqlen_q - m_start, p.head_dim);
        issue(0, 0);
    }

    for (int n_block = 0; n_block < n_total; n_block++)
    {
        const int stage = n_block & 1;
        const bool gathered = n_block >= n_end;
        const int n_start = gathered ? 0 : KEY_BLOCK(n_block) * BLOCK_N;
        cp_async_wait_all();
#if USE_WGMMA
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");   // cp.async writes, read next by the tensor cores
#endif
        __syncthreads();                            // tile n_block visible to all; every warp is done with n_block - 1
        if (n_block + 1 < n_total) issue(n_block + 1, stage ^ 1);
        const u16* tK = sK + stage * BLOCK_N * HEAD_DIM;
        const u16* tV = sV + stage * BLOCK_N * HEAD_DIM;

        // S = Q·Kᵀ for this warp's rows.  acc_s: (M_TILES, N_TILES) fragments of m16n8
        float acc_s[M_TILES][N_TILES][4];
#pragma unroll
        for (int mt = 0; mt < M_TILES; mt++)
#pragma unroll
            for (int n = 0; n < N_TILES; n++) acc_s[mt][n][0] = acc_s[mt][n][1] = acc_s[mt][n][2] = acc_s[mt][n][3] = 0.f;
#if USE_WGMMA
#pragma unroll
        for (int mt = 0; mt < M_TILES; mt++) wgmma_fence_operands(acc_s[mt]);
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int kk = 0; kk < HEAD_DIM / 16; kk++)
        {
            // k16 slice kk: half kk / 4 of the tile, 32 bytes in per slice (the swizzle acts on the final address).
            const unsigned long long desc_k = wgmma_desc(tK + (kk / 4) * (BLOCK_N * 64) + (kk % 4) * 16);
#pragma unroll
            for (int mt = 0; mt < M_TILES; mt++)
                wgmma_m64n64k16(acc_s[mt], wgmma_desc(sQ + (kk / 4) * (BLOCK_M * 64) + mt * 64 * 64 + (kk % 4) * 16), desc_k);
        }
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#pragma unroll
        for (int mt = 0; mt < M_TILES; mt++) wgmma_fence_operands(acc_s[mt]);
#else
#pragma unroll
        for (int kk = 0; kk < HEAD_DIM / 16; kk++)
        {
            u32 a[M_TILES][4];
#pragma unroll
            for (int mt = 0; mt < M_TILES; mt++)
            {
                int row = MT_ROW(warp, mt) + (lane % 16);
                ldmatrix_x4(smem_u32(sQ + swz(row, kk * 2 + lane / 16)), a[mt][0], a[mt][1], a[mt][2], a[mt][3]);
            }
#pragma unroll
            for (int np = 0; np < N_TILES / 2; np++)
            {
                u32 b0, b1, b2, b3;
                int key = np * 16 + (lane % 8) + (lane / 16) * 8;
                ldmatrix_x4(smem_u32(tK + swz(key, kk * 2 + (lane / 8) % 2)), b0, b1, b2, b3);
#pragma unroll
                for (int mt = 0; mt < M_TILES; mt++)
                {
                    mma16816(acc_s[mt][2 * np], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b0, b1);
                    mma16816(acc_s[mt][2 * np + 1], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b2, b3);
                }
            }
        }
#endif

        // Masks, online softmax: scores stay raw (q·k) so the scale folds into one FFMA per element,
        // p = 2^(s·scale·log2e − max·scale·log2e) (FlashAttention's scale_softmax_log2).
        const bool needs_mask = n_start + BLOCK_N > p.seqlen_k
            || (IS_CAUSAL && n_start + BLOCK_N - 1 > m_start + p.causal_offset);
#if HAS_SOFTCAP
        // Soft-capping before masking, so excluded pairs stay at -inf: s = cap·tanh(s·scale/cap), in log2 units.
#pragma unroll
        for (int mt = 0; mt < M_TILES; mt++)
#pragma unroll
            for (int n = 0; n < N_TILES; n++)
#pragma unroll
                for (int r = 0; r < 4; r++) acc_s[mt][n][r] = p.softcap_post * fast_tanh(acc_s[mt][n][r] * p.softcap_pre);
#endif
#if HAS_TOKENS
        if (gathered) mask_scores_tokens(acc_s, p, batch, head, m_start, warp, s_tok + stage * BLOCK_N, g, t);
        else
#endif
#if HAS_PLAN
        if (p.plan_kinds[plan_first + n_block / p.plan_expand] != 1) mask_scores_expr(acc_s, p, batch, head, m_start, warp, n_start, g, t);
        else if (needs_mask) mask_scores(acc_s, p, m_start, warp, n_start, g, t);
#else
        if (needs_mask) mask_scores(acc_s, p, m_start, warp, n_start, g, t);
#endif
        online_softmax(acc_s, acc_o, row_max, row_sum, p);

        // O += P·V: the C fragments of two n8 tiles are exactly the A fragment of one k16 step.
#if USE_WGMMA >= 2
        {
            u32 pa[M_TILES][BLOCK_N / 16][4];
#pragma unroll
            for (int mt = 0; mt < M_TILES; mt++)
#pragma unroll
                for (int kk = 0; kk < BLOCK_N / 16; kk++)
                {
                    pa[mt][kk][0] = pack2(acc_s[mt][2 * kk][0], acc_s[mt][2 * kk][1]);
                    pa[mt][kk][1] = pack2(acc_s[mt][2 * kk][2], acc_s[mt][2 * kk][3]);
                    pa[mt][kk][2] = pack2(acc_s[mt][2 * kk + 1][0], acc_s[mt][2 * kk + 1][1]);
                    pa[mt][kk][3] = pack2(acc_s[mt][2 * kk + 1][2], acc_s[mt][2 * kk + 1][3]);
                }
#pragma unroll
            for (int mt = 0; mt < M_TILES; mt++) wgmma_fence_operands(acc_o[mt]);
            asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
            for (int kk = 0; kk < BLOCK_N / 16; kk++)
            {
                // Keys 16·kk.. of the tile: two 1024-byte row groups in; the halves of D are BLOCK_N·128 bytes apart.
                const unsigned long long desc_v = wgmma_desc(tV + kk * 16 * 64, BLOCK_N * 128ull);
#pragma unroll
                for (int mt = 0; mt < M_TILES; mt++) wgmma_pv(acc_o[mt], pa[mt][kk], desc_v);
            }
            asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
            asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#pragma unroll
            for (int mt = 0; mt < M_TILES; mt++) wgmma_fence_operands(acc_o[mt]);
        }
#else
#pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; kk++)
        {
            u32 a[M_TILES][4];
#pragma unroll
            for (int mt = 0; mt < M_TILES; mt++)
            {
                a[mt][0] = pack2(acc_s[mt][2 * kk][0], acc_s[mt][2 * kk][1]);
                a[mt][1] = pack2(acc_s[mt][2 * kk][2], acc_s[mt][2 * kk][3]);
                a[mt][2] = pack2(acc_s[mt][2 * kk + 1][0], acc_s[mt][2 * kk + 1][1]);
                a[mt][3] = pack2(acc_s[mt][2 * kk + 1][2], acc_s[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int dp = 0; dp < D_TILES / 2; dp++)
            {
                u32 b0, b1, b2, b3;
                int key = kk * 16 + (lane % 16);
                ldmatrix_x4_trans(smem_u32(tV + swz(key, dp * 2 + lane / 16)), b0, b1, b2, b3);
#pragma unroll
                for (int mt = 0; mt < M_TILES; mt++)
                {
                    mma16816(acc_o[mt][2 * dp], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b0, b1);
                    mma16816(acc_o[mt][2 * dp + 1], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b2, b3);
                }
            }
        }
#endif
    }

    // Normalize and store. A row without keys has sum 0: output 0, LSE -inf.
#pragma unroll
    for (int mt = 0; mt < M_TILES; mt++)
    {
#pragma unroll
        for (int half = 0; half < 2; half++)
        {
            float sum = row_sum[mt][half];
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            const int row = m_start + MT_ROW(warp, mt) + g + half * 8;
            if (row >= p.seqlen_q) continue;
            const float inv = sum == 0.f ? 0.f : 1.f / sum;
            u16* o = p.o + batch * p.o_batch + head * p.o_head + (i64)row * p.o_row;
#pragma unroll
            for (int d = 0; d < D_TILES; d++)
            {
                int col = d * 8 + 2 * t;
                if (col < p.head_dim)
                {
                    *(u32*)(o + col) = pack2(acc_o[mt][d][half * 2] * inv, acc_o[mt][d][half * 2 + 1] * inv);
                }
            }
            if (p.lse != nullptr && t == 0)
            {
                p.lse[batch * p.lse_batch + row * p.lse_row + head * p.lse_head] =
                    sum == 0.f ? NEG_INF : (row_max[mt][half] + fast_log2(sum)) * 0.6931471805599453f;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Decoding (flash-decoding, split-K): one query token per sequence against a long K/V. The group's query heads
// (GQA: Hq / Hkv ≤ 16 of them) are packed as the rows of one m16 tile, so every K/V byte is read once per kv head.
// One thread block per (key split, kv head, batch): it walks its split in tiles of DEC_TILE keys through the same
// two-stage cp.async pipeline; warp w owns keys [16w, 16w + 16) of each tile with its own online softmax; at the
// end the warps' states merge in shared memory and the block writes its split's normalized output and LSE (log2).
// decode_merge then combines the splits exactly (LSE-weighted).
// ---------------------------------------------------------------------------------------------------------------
#define DEC_TILE (16 * WARPS)

struct DecodeParams
{
    const u16* q;            // [B, Hq, D]
    const u16* k;            // [B, Skv, Hkv, D]
    const u16* v;
    u16* o;                  // [B, Hq, D]
    float* lse;              // [B, Hq] natural log, optional
    float* part_o;           // [B, Hq, splits, HEAD_DIM] f32
    float* part_lse;         // [B, Hq, splits] log2 units
    i64 q_batch, q_head;
    i64 k_batch, k_row, k_head;
    i64 v_batch, v_row, v_head;
    i64 o_batch, o_head;
    i64 lse_batch, lse_head;
    int seqlen_k, heads, group, head_dim, split_len, splits;
    float scale_log2;
    // Paged cache (page_table non-null): k and v point at page pools [pages, DEC_TILE slots, Hkv, D] (k_row the slot
    // stride, k_head the head stride, page_stride between pages) shared by many sequences; batch row b decodes
    // sequence batch_seq[b] (b when null), whose lengths[seq] tokens sit in the pool pages page_table[seq · table_stride
    // + logical page]. Without page_list every logical page is read; with it, page_list [B, Hkv, list_stride] holds
    // ascending logical pages to read (a policy's selection), page_count[b·Hkv + h] of them — entries at or past the
    // sequence's pages (a batch's shorter sequences under one budget) sort last and are not read. Each thread block
    // reads pages_per_split of them. seqlen_k is unused.
    const int* page_table;
    const int* page_list;
    const int* page_count;
    i64 page_stride;
    int table_stride, list_stride, pages_per_split;
    const int* lengths;
    const int* batch_seq;
    // Optional (H2O's attention feedback): per (batch row, query head, list position, warp) the log2 of the warp's
    // 16 keys' unnormalized softmax mass, [B, Hq, list_stride, WARPS]; null: not written.
    float* page_lse;
};

// Where tile `tile` of this block's split reads its keys and values, and how many of its rows are keys.
// (Paged: seq and len are the batch row's sequence and its length.)
__device__ __forceinline__ int decode_tile(const DecodeParams& p, int batch, int kv_head, int first, int k0, int k1, int tile,
    int seq, int len, const u16*& k, const u16*& v)
{
    if (p.page_table != nullptr)
    {
        const int logical = p.page_list != nullptr
            ? p.page_list[((i64)batch * (p.heads / p.group) + kv_head) * p.list_stride + first + tile]
            : first + tile;
        const i64 page = p.page_table[(i64)seq * p.table_stride + logical];
        k = p.k + page * p.page_stride + kv_head * p.k_head;
        v = p.v + page * p.page_stride + kv_head * p.v_head;
        return min(DEC_TILE, len - logical * DEC_TILE);
    }
    const int n_start = tile * DEC_TILE;
    k = p.k + batch * p.k_batch + kv_head * p.k_head + (i64)(k0 + n_start) * p.k_row;
    v = p.v + batch * p.v_batch + kv_head * p.v_head + (i64)(k0 + n_start) * p.v_row;
    return k1 - k0 - n_start;
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
flash_decode(const DecodeParams p)
{
    extern __shared__ __align__(128) u16 smem[];
    u16* sQ = smem;                                 // [16, HEAD_DIM]
    u16* sK = sQ + 16 * HEAD_DIM;                   // [2][DEC_TILE, HEAD_DIM]
    u16* sV = sK + 2 * DEC_TILE * HEAD_DIM;         // [2][DEC_TILE, HEAD_DIM]

    const int split = blockIdx.x, kv_head = blockIdx.y, batch = blockIdx.z;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int k0 = split * p.split_len, k1 = min(k0 + p.split_len, p.seqlen_k);
    int first = 0, tiles = (k1 - k0 + DEC_TILE - 1) / DEC_TILE, seq = batch, len = p.seqlen_k;
    if (p.page_table != nullptr)
    {
        seq = p.batch_seq != nullptr ? p.batch_seq[batch] : batch;
        len = p.lengths[seq];
        const int pages = (len + DEC_TILE - 1) / DEC_TILE;
        const int count = p.page_list != nullptr ? min(p.page_count[batch * (p.heads / p.group) + kv_head], pages) : pages;
        first = split * p.pages_per_split;
        tiles = max(0, min(p.pages_per_split, count - first));
    }
    const u16* q = p.q + batch * p.q_batch + (i64)(kv_head * p.group) * p.q_head;
    const u16* k;
    const u16* v;
    int valid = tiles > 0 ? decode_tile(p, batch, kv_head, first, k0, k1, 0, seq, len, k, v) : 0;

    for (int i = threadIdx.x; i < 16 * CHUNKS; i += WARPS * 32)
    {
        int row = i / CHUNKS, c = i % CHUNKS;
        bool valid = row < p.group && c * 8 < p.head_dim;
        cp_async16(smem_u32(sQ + swz(row, c)), valid ? q + row * p.q_head + c * 8 : q, valid);
    }
    if (tiles > 0)
    {
        load_tile<DEC_TILE>(sK, k, p.k_row, valid, p.head_dim);
        load_tile<DEC_TILE>(sV, v, p.v_row, valid, p.head_dim);
    }
    cp_async_commit();

    float acc_o[D_TILES][4];
#pragma unroll
    for (int d = 0; d < D_TILES; d++) acc_o[d][0] = acc_o[d][1] = acc_o[d][2] = acc_o[d][3] = 0.f;
    float row_max[2] = {NEG_INF, NEG_INF}, row_sum[2] = {0.f, 0.f};

    for (int tile = 0; tile < tiles; tile++)
    {
        const int stage = tile & 1, current = valid;
        cp_async_wait_all();
        __syncthreads();
        if (tile + 1 < tiles)
        {
            valid = decode_tile(p, batch, kv_head, first, k0, k1, tile + 1, seq, len, k, v);
            load_tile<DEC_TILE>(sK + (stage ^ 1) * DEC_TILE * HEAD_DIM, k, p.k_row, valid, p.head_dim);
            load_tile<DEC_TILE>(sV + (stage ^ 1) * DEC_TILE * HEAD_DIM, v, p.v_row, valid, p.head_dim);
            cp_async_commit();
        }
        const u16* tK = sK + stage * DEC_TILE * HEAD_DIM;
        const u16* tV = sV + stage * DEC_TILE * HEAD_DIM;

        float acc_s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int kk = 0; kk < HEAD_DIM / 16; kk++)
        {
            u32 a0, a1, a2, a3, b0, b1, b2, b3;
            ldmatrix_x4(smem_u32(sQ + swz(lane % 16, kk * 2 + lane / 16)), a0, a1, a2, a3);
            int key = warp * 16 + (lane % 8) + (lane / 16) * 8;
            ldmatrix_x4(smem_u32(tK + swz(key, kk * 2 + (lane / 8) % 2)), b0, b1, b2, b3);
            mma16816(acc_s[0], a0, a1, a2, a3, b0, b1);
            mma16816(acc_s[1], a0, a1, a2, a3, b2, b3);
        }
        // Rows past the tile's keys (the split's or the sequence's end) are excluded.
#pragma unroll
        for (int n = 0; n < 2; n++)
#pragma unroll
            for (int e = 0; e < 2; e++)
                if (warp * 16 + n * 8 + 2 * t + e >= current) acc_s[n][e] = acc_s[n][2 + e] = NEG_INF;

        float alpha[2];
#pragma unroll
        for (int half = 0; half < 2; half++)
        {
            float mx = fmaxf(fmaxf(acc_s[0][half * 2], acc_s[0][half * 2 + 1]), fmaxf(acc_s[1][half * 2], acc_s[1][half * 2 + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float new_max = fmaxf(row_max[half], mx * p.scale_log2);
            const float used = new_max == NEG_INF ? 0.f : new_max;
            alpha[half] = fast_exp2(row_max[half] - used);      // 0 when the old max is -inf
            row_max[half] = new_max;
            float sum = 0.f;
#pragma unroll
            for (int n = 0; n < 2; n++)
#pragma unroll
                for (int e = 0; e < 2; e++)
                {
                    float pr = fast_exp2(fmaf(acc_s[n][half * 2 + e], p.scale_log2, -used));
                    acc_s[n][half * 2 + e] = pr;
                    sum += pr;
                }
            row_sum[half] = row_sum[half] * alpha[half] + sum;
            if (p.page_lse != nullptr)
            {
                float keys16 = sum + __shfl_xor_sync(0xffffffffu, sum, 1);
                keys16 += __shfl_xor_sync(0xffffffffu, keys16, 2);
                const int row = g + half * 8;
                if (t == 0 && row < p.group)
                {
                    const i64 slot = ((i64)batch * p.heads + kv_head * p.group + row) * p.list_stride + first + tile;
                    p.page_lse[slot * WARPS + warp] = keys16 > 0.f ? used + fast_log2(keys16) : NEG_INF;
                }
            }
        }
#pragma unroll
        for (int d = 0; d < D_TILES; d++)
        {
            acc_o[d][0] *= alpha[0];
            acc_o[d][1] *= alpha[0];
            acc_o[d][2] *= alpha[1];
            acc_o[d][3] *= alpha[1];
        }
        const u32 a0 = pack2(acc_s[0][0], acc_s[0][1]), a1 = pack2(acc_s[0][2], acc_s[0][3]);
        const u32 a2 = pack2(acc_s[1][0], acc_s[1][1]), a3 = pack2(acc_s[1][2], acc_s[1][3]);
#pragma unroll
        for (int dp = 0; dp < D_TILES / 2; dp++)
        {
            u32 b0, b1, b2, b3;
            ldmatrix_x4_trans(smem_u32(tV + swz(warp * 16 + (lane % 16), dp * 2 + lane / 16)), b0, b1, b2, b3);
            mma16816(acc_o[2 * dp], a0, a1, a2, a3, b0, b1);
            mma16816(acc_o[2 * dp + 1], a0, a1, a2, a3, b2, b3);
        }
    }

    // Merge the warps' states: shared memory holds each warp's max, sum and unnormalized rows.
    cp_async_wait_all();
    __syncthreads();
    float* sO = (float*)sK;                          // [WARPS][16][HEAD_DIM]
    float* sM = sO + WARPS * 16 * HEAD_DIM;          // [WARPS][16]
    float* sL = sM + WARPS * 16;                     // [WARPS][16]
#pragma unroll
    for (int half = 0; half < 2; half++)
    {
        float sum = row_sum[half];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const int row = g + half * 8;
        if (t == 0)
        {
            sM[warp * 16 + row] = row_max[half];
            sL[warp * 16 + row] = sum;
        }
#pragma unroll
        for (int d = 0; d < D_TILES; d++)
        {
            sO[(warp * 16 + row) * HEAD_DIM + d * 8 + 2 * t] = acc_o[d][half * 2];
            sO[(warp * 16 + row) * HEAD_DIM + d * 8 + 2 * t + 1] = acc_o[d][half * 2 + 1];
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < p.group * HEAD_DIM; i += WARPS * 32)
    {
        const int row = i / HEAD_DIM, d = i % HEAD_DIM;
        float m = NEG_INF;
        for (int w = 0; w < WARPS; w++) m = fmaxf(m, sM[w * 16 + row]);
        float l = 0.f, o = 0.f;
        if (m != NEG_INF)
        {
            for (int w = 0; w < WARPS; w++)
            {
                float f = fast_exp2(sM[w * 16 + row] - m);
                l += sL[w * 16 + row] * f;
                o += sO[(w * 16 + row) * HEAD_DIM + d] * f;
            }
        }
        const i64 slot = ((i64)batch * p.heads + kv_head * p.group + row) * p.splits + split;
        p.part_o[slot * HEAD_DIM + d] = l > 0.f ? o / l : 0.f;
        if (d == 0) p.part_lse[slot] = l > 0.f ? m + fast_log2(l) : NEG_INF;
    }
}

// Combines the splits of each (batch, query head): o = Σ o_s · 2^(lse_s − lse), lse = log2 Σ 2^lse_s.
extern "C" __global__ void decode_merge(const DecodeParams p)
{
    const int head = blockIdx.x, batch = blockIdx.y;
    const i64 base = ((i64)batch * p.heads + head) * p.splits;
    float m = NEG_INF;
    for (int s = 0; s < p.splits; s++) m = fmaxf(m, p.part_lse[base + s]);
    float total = 0.f;
    if (m != NEG_INF)
        for (int s = 0; s < p.splits; s++) total += fast_exp2(p.part_lse[base + s] - m);
    for (int d = threadIdx.x; d < p.head_dim; d += blockDim.x)
    {
        float acc = 0.f;
        if (m != NEG_INF)
            for (int s = 0; s < p.splits; s++) acc += p.part_o[(base + s) * HEAD_DIM + d] * fast_exp2(p.part_lse[base + s] - m);
        float out = total > 0.f ? acc / total : 0.f;
        p.o[batch * p.o_batch + head * p.o_head + d] = (u16)(pack2(out, 0.f) & 0xffffu);
    }
    if (threadIdx.x == 0 && p.lse != nullptr)
        p.lse[batch * p.lse_batch + head * p.lse_head] = total > 0.f ? (m + fast_log2(total)) * 0.6931471805599453f : NEG_INF;
}
