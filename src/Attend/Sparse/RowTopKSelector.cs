using Attend.Masks;
using Attend.Tensors;

namespace Attend.Sparse;

/// <summary>
/// Per-row top-k (the sparse global attention of DLGSANet, Li et al., arXiv:2301.02031): every query keeps the
/// <see cref="TopK"/> keys with the highest estimated score and attends to exactly those: a <see cref="TokenSet"/> over
/// blocks of 4 queries (the CPU executor's smallest query block) listing the union of their keys, with an element mask
/// that lets each query see its own keys only (and causal when asked). CPU only (the mask has no CUDA form). The estimate is the exact q·k (<see cref="EstimateDims"/> = 0)
/// or q·k through a shared Gaussian projection to <see cref="EstimateDims"/> dimensions (Johnson–Lindenstrauss: the
/// cost of scoring drops from D to that many multiply-adds per pair; the selection, not the attention, is approximate).
/// Scores come from the selectors' SIMD product in chunks of 64 queries (O(64·Skv) memory); the k-th largest by
/// quickselect.
/// </summary>
public sealed class RowTopKSelector : ISparsitySelector
{
    private readonly int _topK = 64, _dims;

    /// <summary>Keys per query (≥ 1; default 64).</summary>
    public int TopK
    {
        get => _topK;
        init => _topK = value >= 1 ? value : throw new ArgumentOutOfRangeException(nameof(TopK), value, "TopK must be ≥ 1");
    }

    /// <summary>Dimensions of the score estimate: 0 = exact q·k (default), else a random projection to this many (≥ 1).</summary>
    public int EstimateDims
    {
        get => _dims;
        init => _dims = value >= 0 ? value : throw new ArgumentOutOfRangeException(nameof(EstimateDims), value, "EstimateDims must be ≥ 0");
    }

    /// <summary>Seed of the projection.</summary>
    public int Seed { get; init; }

    /// <inheritdoc/>
    public string Name => EstimateDims == 0 ? $"topk(k={TopK})" : $"topk(k={TopK}, dims={EstimateDims})";

    /// <inheritdoc/>
    public override string ToString() => Name;

    /// <inheritdoc/>
    public SparsityPlan Plan<T>(TensorView<T> q, TensorView<T> k, bool causal = true, float? scale = null) where T : unmanaged
    {
        (int batch, int sq, int heads, int d, int skv, int kvHeads, _) = SparsitySelector.CheckInputs(q, k, scale);
        int group = heads / kvHeads, dims = EstimateDims == 0 ? d : EstimateDims;
        long offset = (long)skv - sq;
        float[]? projection = null;
        if (EstimateDims > 0)
        {
            var rng = new Random(Seed);
            projection = new float[d * dims];
            for (int i = 0; i < projection.Length; i++) projection[i] = (float)Gaussian.Next(rng);
        }
        var chosen = new int[batch * heads][][];
        Parallel.For(0, batch * heads, index =>
        {
            int b = index / heads, h = index % heads;
            float[] keys = Project(SparsitySelector.Gather(k, b, h / group, skv, d, 1f), skv, d, projection, dims);
            float[] queries = Project(SparsitySelector.Gather(q, b, h, sq, d, 1f), sq, d, projection, dims);
            var panels = new PackedPanels(keys, skv, dims);
            const int chunk = 64;
            var scores = new float[chunk * skv];
            var rows = new int[sq][];
            var order = new int[skv];
            for (int i0 = 0; i0 < sq; i0 += chunk)
            {
                int m = Math.Min(chunk, sq - i0);
                ScoreGemm.Multiply(queries.AsSpan(i0 * dims, m * dims), m, dims, panels, 0, skv, scores);
                for (int r = 0; r < m; r++)
                {
                    int i = i0 + r;
                    int visible = causal ? (int)Math.Clamp(i + offset + 1, 0, skv) : skv;
                    rows[i] = TopIndices(scores.AsSpan(r * skv, visible), TopK, order);
                }
            }
            chosen[index] = rows;
        });
        const int group4 = 4;
        var rowMask = new RowSets(chosen, heads);
        TokenSet tokens = TokenSet.Create(batch, heads, sq, skv, group4, (b, h, qb) =>
            Enumerable.Range(qb * group4, Math.Min(group4, sq - (qb * group4))).SelectMany(i => chosen[(b * heads) + h][i]),
            causal ? Mask.Causal & rowMask : rowMask);
        return new SparsityPlan(null, tokens);
    }

    /// <summary>x·P for every row (or x itself without a projection).</summary>
    private static float[] Project(float[] x, int n, int d, float[]? projection, int dims)
    {
        if (projection is null) return x;
        var y = new float[n * dims];
        for (int i = 0; i < n; i++)
            for (int c = 0; c < d; c++)
            {
                float v = x[(i * d) + c];
                if (v != 0f) Linear.Vectors.Axpy(v, projection.AsSpan(c * dims, dims), y.AsSpan(i * dims, dims));
            }
        return y;
    }

    /// <summary>The indices of the <paramref name="k"/> largest scores (all when fewer), ascending; quickselect (Hoare partition) on a copy of the order.</summary>
    internal static int[] TopIndices(ReadOnlySpan<float> scores, int k, int[] scratch)
    {
        int n = scores.Length;
        if (n <= k) return Enumerable.Range(0, n).ToArray();
        Span<int> idx = scratch.AsSpan(0, n);
        for (int i = 0; i < n; i++) idx[i] = i;
        // Partition so that idx[0..k) hold the k largest (NaN scores count as largest: they stay in the row's output).
        int lo = 0, hi = n - 1, target = k - 1;
        while (lo < hi)
        {
            float pivot = Key(scores[idx[lo + ((hi - lo) / 2)]]);        // middle element: no generator per row
            int i = lo, j = hi;
            while (i <= j)
            {
                while (Key(scores[idx[i]]) > pivot) i++;
                while (Key(scores[idx[j]]) < pivot) j--;
                if (i <= j)
                {
                    (idx[i], idx[j]) = (idx[j], idx[i]);
                    i++;
                    j--;
                }
            }
            if (target <= j) hi = j;
            else if (target >= i) lo = i;
            else break;
        }
        int[] top = idx[..k].ToArray();
        Array.Sort(top);
        return top;
    }

    private static float Key(float score) => float.IsNaN(score) ? float.PositiveInfinity : score;

    /// <summary>Query q sees key kv when kv is one of q's own chosen keys.</summary>
    private sealed class RowSets(int[][][] chosen, int heads) : Mask
    {
        public override bool Allows(in MaskExtent extent, int batch, int head, int q, int kv) =>
            Array.BinarySearch(chosen[(batch * heads) + head][q], kv) >= 0;

        public override BlockClass Classify(in MaskExtent extent, int batch, int head, int q0, int q1, int k0, int k1) => BlockClass.Partial;

        public override bool DependsOnBatch => true;

        public override bool DependsOnHead => true;

        public override string ToCuda(in MaskExtent extent) => throw new NotSupportedException("per-row top-k plans run on the CPU only");

        public override string ToString() => "row-topk";
    }
}
