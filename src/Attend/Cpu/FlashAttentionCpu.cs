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
        public required T* Q, K, O;
        public required long[] QStrides, KStrides, OStrides;
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
        AttentionShape shape, float scale, AttentionOptions options, KernelTuning tuning, PackedKv? packed = null) where T : unmanaged
    {
        using PinnedView<T> qp = q.Pin();
        using PinnedView<T> kp = k.Pin();       // gathered key tokens are read from k's rows
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
            ValueDimPadded = PackedKv.PaddedValueDim(shape.ValueDim),
            ScaleLog2 = scale * Log2E,
            Softcap = options.Softcap,
            AlibiSlopes = options.AlibiSlopes is null ? null
                : Enumerable.Range(0, shape.Batch * shape.Heads).Select(bh => -Log2E * shape.AlibiSlope(options, bh / shape.Heads, bh % shape.Heads)).ToArray(),
            Q = qp.Pointer, K = kp.Pointer, O = op.Pointer,
            QStrides = q.Strides.ToArray(), KStrides = k.Strides.ToArray(), OStrides = output.Strides.ToArray(),
            Lse = lse.IsDefault ? null : lp.Pointer,
            LseStrides = lse.IsDefault ? null : lse.Strides.ToArray(),
            Bias = options.Bias.IsDefault ? null : bp.Pointer,
            BiasStrides = options.Bias.IsDefault ? null : options.Bias.Strides.ToArray(),
        };

        // K and V packed by the caller (SparseAttention packs before selection, so a selector scores the executor's
        // panels) or here.
        using PackedKv? owned = packed is null ? PackedKv.Pack(k, v, shape, tuning.EffectiveThreads) : null;
        PackedKv kv = packed ?? owned!;
        kv.Require(shape);
        problem.PackedK = kv.K;
        problem.PackedV = kv.V;
        problem.ValueBlockNonFinite = kv.ValueBlockNonFinite;
        switch (tuning.EffectivePath)
        {
            case KernelPath.Vector512: Run<T, Vector512<float>, V512Ops>(problem, tuning); break;
            case KernelPath.Vector256: Run<T, Vector256<float>, V256Ops>(problem, tuning); break;
            case KernelPath.Vector128: Run<T, Vector128<float>, V128Ops>(problem, tuning); break;
            default: Run<T, float, ScalarOps>(problem, tuning); break;
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
