using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using System.Runtime.InteropServices;
using Attend.Tensors;

namespace Attend.Cpu;

/// <summary>
/// The CPU attention executor: FlashAttention-style tiling with online softmax (Dao et al., arXiv:2205.14135,
/// 2307.08691). For each (batch, head, block of query rows) it walks the key blocks an <see cref="IBlockPlan"/>
/// lists, computing S = Q·Kᵀ and O += P·V with register-blocked micro-kernels over packed f32 tiles, so memory is
/// O(B·H·S·D) and time scales with the number of visited blocks. K and V are converted and packed once per call
/// (K transposed into [D × 64] panels, V into [64 × Dv'] panels); queries are packed per block with
/// scale·log2(e) folded in, so the softmax runs on exp2.
/// </summary>
internal static unsafe partial class FlashAttentionCpu
{
    /// <summary>Keys per block: the packed panel width. 64 = 4 vectors of 16 floats, one QK tile at 512 bits.</summary>
    public const int BlockKv = 64;

    private const float Log2E = 1.4426950408889634f;
    private const float Ln2 = 0.6931471805599453f;

    /// <summary>Everything a worker needs, as raw pointers and element strides (FlashAttention's flat params idea).</summary>
    private sealed class Problem<T> where T : unmanaged
    {
        public required AttentionShape Shape;
        public required IBlockPlan Plan;
        public required int BlockQ;
        public required int QueryBlocks;
        public required int KeyBlocks;
        public required int ValueDimPadded;
        public required float ScaleLog2;
        public required float Softcap;
        public required float[]? AlibiSlopes;   // [B·H], already negated and multiplied by log2(e); null: none
        public required T* Q, K, V, O;
        public required long[] QStrides, KStrides, VStrides, OStrides;
        public float* Lse;
        public long[]? LseStrides;
        public float* Bias;
        public long[]? BiasStrides;
        public float* PackedK;
        public float* PackedV;
        public bool* ValueBlockNonFinite;

        public long PanelIndex(int b, int hk, int kb) => (((long)b * Shape.KvHeads) + hk) * KeyBlocks + kb;
    }

    /// <summary>Runs attention. Arguments are already validated by <see cref="Attention"/>.</summary>
    public static void Forward<T>(
        in TensorView<T> q, in TensorView<T> k, in TensorView<T> v, in TensorView<T> output, in TensorView<float> lse,
        AttentionShape shape, float scale, AttentionOptions options, KernelTuning tuning) where T : unmanaged
    {
        using PinnedView<T> qp = q.Pin();
        using PinnedView<T> kp = k.Pin();
        using PinnedView<T> vp = v.Pin();
        using PinnedView<T> op = output.Pin();
        using PinnedView<float> lp = lse.IsDefault ? default : lse.Pin();
        using PinnedView<float> bp = options.Bias.IsDefault ? default : options.Bias.Pin();

        int blockQ = Math.Min(tuning.BlockQ, (shape.QueryLength + 3) & ~3);
        int keyBlocks = (shape.KeyLength + BlockKv - 1) / BlockKv;
        IBlockPlan plan;
        if (options.Plan is not null || options.Mask is not null)
        {
            Masks.SparsityPlan sparsity = options.Plan ?? Masks.BlockMask.Create(CombinedMask(options), shape.Batch, shape.Heads,
                shape.QueryLength, shape.KeyLength, blockQ, BlockKv);
            var maskPlan = new SparsityPlanAdapter(sparsity);
            blockQ = maskPlan.BlockQ;       // the executor's query blocks are the plan's
            plan = maskPlan;
        }
        else
        {
            plan = new OptionsPlan(shape, options.Causal, options.Predicate);
        }
        var problem = new Problem<T>
        {
            Shape = shape,
            Plan = plan,
            BlockQ = blockQ,
            QueryBlocks = (shape.QueryLength + blockQ - 1) / blockQ,
            KeyBlocks = keyBlocks,
            ValueDimPadded = (shape.ValueDim + 15) & ~15,
            ScaleLog2 = scale * Log2E,
            Softcap = options.Softcap,
            AlibiSlopes = options.AlibiSlopes is null ? null
                : Enumerable.Range(0, shape.Batch * shape.Heads).Select(bh => -Log2E * shape.AlibiSlope(options, bh / shape.Heads, bh % shape.Heads)).ToArray(),
            Q = qp.Pointer, K = kp.Pointer, V = vp.Pointer, O = op.Pointer,
            QStrides = q.Strides.ToArray(), KStrides = k.Strides.ToArray(), VStrides = v.Strides.ToArray(), OStrides = output.Strides.ToArray(),
            Lse = lse.IsDefault ? null : lp.Pointer,
            LseStrides = lse.IsDefault ? null : lse.Strides.ToArray(),
            Bias = options.Bias.IsDefault ? null : bp.Pointer,
            BiasStrides = options.Bias.IsDefault ? null : options.Bias.Strides.ToArray(),
        };

        long panels = (long)shape.Batch * shape.KvHeads * keyBlocks;
        long keyFloats = panels * BlockKv * shape.HeadDim;
        using var packed = new PinnedScratch(keyFloats + (panels * BlockKv * problem.ValueDimPadded));
        problem.PackedK = packed.Pointer;
        problem.PackedV = packed.Pointer + keyFloats;   // keyFloats is a multiple of 64 floats: V stays 64-byte aligned
        problem.ValueBlockNonFinite = (bool*)NativeMemory.AllocZeroed((nuint)panels);
        try
        {
            switch (tuning.EffectivePath)
            {
                case KernelPath.Vector512: Run<T, Vector512<float>, V512Ops>(problem, tuning); break;
                case KernelPath.Vector256: Run<T, Vector256<float>, V256Ops>(problem, tuning); break;
                case KernelPath.Vector128: Run<T, Vector128<float>, V128Ops>(problem, tuning); break;
                default: Run<T, float, ScalarOps>(problem, tuning); break;
            }
        }
        finally
        {
            NativeMemory.Free(problem.ValueBlockNonFinite);
        }
    }

    /// <summary>Options' Mask AND Causal AND Predicate, as one mask.</summary>
    private static Masks.Mask CombinedMask(AttentionOptions options)
    {
        Masks.Mask mask = options.Mask ?? Masks.Mask.Full;
        if (options.Causal) mask = Masks.Mask.Causal & mask;
        if (options.Predicate is not null) mask &= Masks.Mask.FromPredicate(options.Predicate);
        return mask;
    }

    private static void Run<T, TV, TOps>(Problem<T> p, KernelTuning tuning)
        where T : unmanaged where TV : unmanaged where TOps : struct, ISimd<TV>
    {
        AttentionShape s = p.Shape;
        int threads = tuning.EffectiveThreads;
        int panels = s.Batch * s.KvHeads * p.KeyBlocks;
        WorkQueue.Run(panels, threads, () => 0, (i, _) => PackPanel(p, i));

        int bh = s.Batch * s.Heads;
        int items = bh * p.QueryBlocks;
        bool gathers = p.Plan is SparsityPlanAdapter;
        WorkQueue.Run(items, threads, () => new Scratch(p.BlockQ, s.HeadDim, p.ValueDimPadded, p.KeyBlocks, gathers ? s.KeyLength : 0), (i, scratch) =>
        {
            // Last query blocks first: under a causal plan they are the longest, which balances the threads' tails.
            int qb = p.QueryBlocks - 1 - (i / bh);
            int b = (i % bh) / s.Heads, h = i % s.Heads;
            QueryBlock<T, TV, TOps>(p, b, h, qb, scratch);
        }, scratch => scratch.Dispose());
    }

    /// <summary>Converts and packs the keys and values of one block of one (batch, kv head).</summary>
    private static void PackPanel<T>(Problem<T> p, int index) where T : unmanaged
    {
        AttentionShape s = p.Shape;
        int kb = index % p.KeyBlocks;
        int hk = (index / p.KeyBlocks) % s.KvHeads;
        int b = index / (p.KeyBlocks * s.KvHeads);
        long panel = p.PanelIndex(b, hk, kb);
        float* kPanel = p.PackedK + panel * BlockKv * s.HeadDim;
        float* vPanel = p.PackedV + panel * BlockKv * p.ValueDimPadded;
        int kv0 = kb * BlockKv;
        if (typeof(T) == typeof(float) && p.KStrides[3] == 1 && p.VStrides[3] == 1)
        {
            p.ValueBlockNonFinite[panel] = PackSinglePanel(s, (float*)p.K + (b * p.KStrides[0]) + (hk * p.KStrides[2]), p.KStrides[1],
                (float*)p.V + (b * p.VStrides[0]) + (hk * p.VStrides[2]), p.VStrides[1], kv0, kPanel, vPanel, p.ValueDimPadded);
            return;
        }
        bool nonFinite = false;
        for (int jj = 0; jj < BlockKv; jj++)
        {
            int j = kv0 + jj;
            float* vRow = vPanel + (long)jj * p.ValueDimPadded;
            if (j >= s.KeyLength)
            {
                for (int d = 0; d < s.HeadDim; d++) kPanel[d * BlockKv + jj] = 0f;
                new Span<float>(vRow, p.ValueDimPadded).Clear();
                continue;
            }
            T* kRow = p.K + b * p.KStrides[0] + j * p.KStrides[1] + hk * p.KStrides[2];
            long kd = p.KStrides[3];
            for (int d = 0; d < s.HeadDim; d++) kPanel[d * BlockKv + jj] = ElementConvert.ToSingle(kRow[d * kd]);
            T* vSrc = p.V + b * p.VStrides[0] + j * p.VStrides[1] + hk * p.VStrides[2];
            long vd = p.VStrides[3];
            for (int d = 0; d < s.ValueDim; d++)
            {
                float x = ElementConvert.ToSingle(vSrc[d * vd]);
                nonFinite |= !float.IsFinite(x);
                vRow[d] = x;
            }
            for (int d = s.ValueDim; d < p.ValueDimPadded; d++) vRow[d] = 0f;
        }
        p.ValueBlockNonFinite[panel] = nonFinite;
    }

    /// <summary>
    /// <see cref="PackPanel{T}"/> for float rows with unit element stride (the common case): keys transposed eight
    /// rows at a time by 8 × 8 register tiles (<see cref="Transpose.Tile8"/>; session 11 used AVX2 gathers, which the
    /// selectors' panels measured 2× slower), values copied as spans and checked for NaN/Inf by vectors. Packing
    /// S 8192, 4 kv heads, D 64 element by element took 7–9 ms on the 2-core EPYC (a fresh buffer's page faults
    /// included); with gathers into the reused buffer 3.5–4.6 ms (docs/perf/sparse.md, session 11).
    /// Returns whether the block's values hold a non-finite entry.
    /// </summary>
    private static bool PackSinglePanel(AttentionShape s, float* k, long kRowStride, float* v, long vRowStride, int kv0,
        float* kPanel, float* vPanel, int valueDimPadded)
    {
        int d = s.HeadDim, rows = Math.Min(BlockKv, s.KeyLength - kv0);
        float* k0 = k + (kv0 * kRowStride);
        if (Avx.IsSupported && rows == BlockKv)
        {
            // Eight rows at a time: whole 8-channel tiles transposed in registers, the remaining channels one by one.
            int tiled = d / 8 * 8;
            for (int g = 0; g < BlockKv; g += 8)
            {
                float* groupRows = k0 + (g * kRowStride);
                for (int c = 0; c < tiled; c += 8) Transpose.Tile8(groupRows + c, kRowStride, kPanel + (c * BlockKv) + g, BlockKv);
                for (int jj = 0; jj < 8; jj++)
                    for (int c = tiled; c < d; c++) kPanel[(c * BlockKv) + g + jj] = groupRows[(jj * kRowStride) + c];
            }
        }
        else
        {
            for (int jj = 0; jj < BlockKv; jj++)
            {
                float* row = k0 + (jj * kRowStride);
                for (int c = 0; c < d; c++) kPanel[(c * BlockKv) + jj] = jj < rows ? row[c] : 0f;
            }
        }
        bool nonFinite = false;
        int dv = s.ValueDim;
        for (int jj = 0; jj < BlockKv; jj++)
        {
            var target = new Span<float>(vPanel + ((long)jj * valueDimPadded), valueDimPadded);
            if (jj >= rows)
            {
                target.Clear();
                continue;
            }
            var source = new ReadOnlySpan<float>(v + ((kv0 + jj) * vRowStride), dv);
            source.CopyTo(target);
            target[dv..].Clear();
            nonFinite |= !AllFinite(source);
        }
        return nonFinite;
    }

    private static bool AllFinite(ReadOnlySpan<float> x)
    {
        // x − x is 0 for finite x and NaN for NaN or ±Inf; one NaN in the running sum of those differences persists.
        var sum = Vector256<float>.Zero;
        int i = 0;
        for (; i <= x.Length - 8; i += 8)
        {
            var e = Vector256.Create(x.Slice(i, 8));
            sum += e - e;
        }
        float rest = 0;
        for (; i < x.Length; i++) rest += x[i] - x[i];
        return float.IsFinite(Vector256.Sum(sum) + rest);
    }

    /// <summary>Per-worker buffers, allocated once per call and reused for every work item.</summary>
    private sealed class Scratch : IDisposable
    {
        public readonly float* Q;        // [BlockQ, D] packed, scaled queries
        public readonly float* S;        // [BlockQ, 64] scores, then probabilities
        public readonly float* O;        // [BlockQ, Dv'] unnormalized output accumulator
        public readonly float* RowMax;   // [BlockQ] running max (log2 units)
        public readonly float* RowSum;   // [BlockQ] running sum of exp2(s − max)
        public readonly float* Alpha;    // [BlockQ] rescale factor of the current block
        public readonly int[] Blocks;
        public readonly BlockKind[] Kinds;
        public readonly int[] Tokens;    // gathered key tokens of the current query block (TokenSet plans)
        public readonly float* KGather;  // [D, 64] gathered keys, transposed like a K panel
        public readonly float* VGather;  // [64, Dv'] gathered values

        public Scratch(int blockQ, int headDim, int valueDimPadded, int keyBlocks, int maxTokens)
        {
            Tokens = new int[maxTokens];
            KGather = maxTokens > 0 ? Alloc(headDim * BlockKv) : null;
            VGather = maxTokens > 0 ? Alloc(BlockKv * valueDimPadded) : null;
            Q = Alloc(blockQ * headDim);
            S = Alloc(blockQ * BlockKv);
            O = Alloc(blockQ * valueDimPadded);
            RowMax = Alloc(blockQ);
            RowSum = Alloc(blockQ);
            Alpha = Alloc(blockQ);
            Blocks = new int[keyBlocks];
            Kinds = new BlockKind[keyBlocks];
        }

        private static float* Alloc(int count) => (float*)NativeMemory.AlignedAlloc((nuint)(Math.Max(count, 16) * sizeof(float)), 64);

        public void Dispose()
        {
            NativeMemory.AlignedFree(Q);
            NativeMemory.AlignedFree(S);
            NativeMemory.AlignedFree(O);
            NativeMemory.AlignedFree(RowMax);
            NativeMemory.AlignedFree(RowSum);
            NativeMemory.AlignedFree(Alpha);
            if (KGather != null) NativeMemory.AlignedFree(KGather);
            if (VGather != null) NativeMemory.AlignedFree(VGather);
        }
    }
}
