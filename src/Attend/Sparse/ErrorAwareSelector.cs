using Attend.Masks;
using Attend.Tensors;

namespace Attend.Sparse;

/// <summary>
/// Error-aware routing for centroid compensation (SVG-EAR): after <see cref="Inner"/> plans, every key block it
/// skipped would be stood in for by its centroid (<see cref="CentroidCompensation"/>); this selector spends an extra
/// budget of exact blocks where that stand-in is worst per cost, then compensates the rest. A skipped block's error
/// is estimated from pooled quantities: its mass share p̂_b = softmax over the row's blocks of q̄·k̄_b + ln n_b, times
/// the centroid's relative error exp(½ Σ_c q̄_c² σ²_bc) − 1 — the Jensen gap of log Σ exp(q·k_j) against q·k̄ + ln n
/// to second order, with the block's per-channel key variance σ²_bc. Every block costs the same, so the
/// <see cref="ExtraFraction"/> · visible blocks of largest error per query block are promoted. Cost O((n/B)² · D) per
/// head, as the pooled estimate.
/// </summary>
public sealed class ErrorAwareSelector : IValueAwareSelector
{
    private readonly double _extra;

    /// <summary>Routes the blocks <paramref name="inner"/> skips; <paramref name="extraFraction"/> of each row's visible blocks are promoted to exact.</summary>
    public ErrorAwareSelector(ISparsitySelector inner, double extraFraction = 0.05)
    {
        Inner = inner ?? throw new ArgumentNullException(nameof(inner));
        _extra = extraFraction is >= 0 and <= 1 ? extraFraction : throw new ArgumentOutOfRangeException(nameof(extraFraction), extraFraction, "extraFraction must be in [0, 1]");
    }

    /// <summary>The selector whose plan is routed.</summary>
    public ISparsitySelector Inner { get; }

    /// <summary>Share of each query block's visible key blocks added as exact blocks (default 0.05).</summary>
    public double ExtraFraction => _extra;

    /// <inheritdoc/>
    public string Name => string.Create(System.Globalization.CultureInfo.InvariantCulture, $"{Inner.Name}+ear({ExtraFraction:0.###})");

    /// <inheritdoc/>
    public override string ToString() => Name;

    /// <inheritdoc/>
    public SparsityPlan Plan<T>(TensorView<T> q, TensorView<T> k, TensorView<T> v, bool causal = true, float? scale = null, KernelTuning? tuning = null) where T : unmanaged =>
        Route(Inner is IValueAwareSelector valueAware ? valueAware.Plan(q, k, v, causal, scale, tuning) : Inner.Plan(q, k, causal, scale), q, k, causal, scale);

    /// <inheritdoc/>
    public SparsityPlan Plan<T>(TensorView<T> q, TensorView<T> k, bool causal = true, float? scale = null) where T : unmanaged =>
        Route(Inner.Plan(q, k, causal, scale), q, k, causal, scale);

    private SparsityPlan Route<T>(SparsityPlan plan, TensorView<T> q, TensorView<T> k, bool causal, float? scale) where T : unmanaged
    {
        if (plan.Blocks is not { } blocks || plan.Permutation is not null)
        {
            throw new NotSupportedException($"error-aware routing needs a block plan without a permutation; {Inner.Name} gives {(plan.Blocks is null ? "no blocks" : "a permuted plan")}");
        }
        (int batch, int sq, int heads, int d, int skv, int kvHeads, float s) = SparsitySelector.CheckInputs(q, k, scale);
        int bq = blocks.BlockQ, bk = blocks.BlockK, queryBlocks = blocks.QueryBlocks, keyBlocks = blocks.KeyBlocks, group = heads / kvHeads;
        long offset = (long)skv - sq;
        var added = new List<int>[batch * heads * queryBlocks];
        Parallel.For(0, batch * heads, index =>
        {
            int b = index / heads, h = index % heads;
            float[] queries = SparsitySelector.Gather(q, b, h, sq, d, s), keys = SparsitySelector.Gather(k, b, h / group, skv, d, 1f);
            (float[] means, float[] variances) = KeyBlockMoments(keys, skv, d, bk);
            var pooled = new float[d];
            var logits = new double[keyBlocks];
            var error = new double[keyBlocks];
            for (int qb = 0; qb < queryBlocks; qb++)
            {
                int q0 = qb * bq, q1 = Math.Min(q0 + bq, sq);
                // Blocks every row of the query block sees whole (what compensation can stand in for).
                int whole = causal ? (int)Math.Clamp((q0 + offset + 1) / bk, 0, keyBlocks) : keyBlocks;
                int visible = causal ? (int)Math.Clamp((q1 - 1 + offset + bk) / bk, 0, keyBlocks) : keyBlocks;
                int extra = (int)Math.Ceiling(ExtraFraction * visible);
                if (extra == 0 || whole == 0) continue;
                Array.Clear(pooled);
                for (int i = q0; i < q1; i++)
                    for (int c = 0; c < d; c++) pooled[c] += queries[(i * d) + c] / (q1 - q0);
                ReadOnlySpan<int> kept = blocks.Row(b, h, qb, out _);
                double max = double.NegativeInfinity;
                for (int kb = 0; kb < visible; kb++)
                {
                    double dot = 0;
                    for (int c = 0; c < d; c++) dot += pooled[c] * means[(kb * d) + c];
                    logits[kb] = dot + Math.Log(Math.Min(skv, (kb + 1) * bk) - (kb * bk));
                    max = Math.Max(max, logits[kb]);
                }
                double total = 0;
                for (int kb = 0; kb < visible; kb++) total += Math.Exp(logits[kb] - max);
                var candidates = new List<int>();
                for (int kb = 0; kb < whole; kb++)
                {
                    if (kept.BinarySearch(kb) >= 0) continue;
                    double gap = 0;
                    for (int c = 0; c < d; c++) gap += pooled[c] * pooled[c] * variances[(kb * d) + c];
                    error[kb] = Math.Exp(logits[kb] - max) / total * (Math.Exp(Math.Min(0.5 * gap, 50)) - 1);
                    candidates.Add(kb);
                }
                candidates.Sort((x, y) => error[y].CompareTo(error[x]));
                added[(index * queryBlocks) + qb] = candidates.Take(extra).ToList();
            }
        });
        Mask? mask = blocks.Mask;
        BlockMask routed = BlockMask.FromBlocks(batch, heads, sq, skv, bq, bk, (b, h, qb) =>
        {
            List<(int, BlockClass)> row = [];
            ReadOnlySpan<int> cols = blocks.Row(b, h, qb, out ReadOnlySpan<BlockClass> kinds);
            for (int i = 0; i < cols.Length; i++) row.Add((cols[i], kinds[i]));
            foreach (int kb in added[(((b * heads) + h) * queryBlocks) + qb] ?? []) row.Add((kb, BlockClass.Full));   // wholly visible: Full
            return row;
        }, mask);
        return new SparsityPlan(routed, plan.Tokens, null, Compensation.Centroid);
    }

    /// <summary>Per key block: the mean key and the per-channel variance of its keys → two [blocks, D] arrays.</summary>
    private static (float[] Means, float[] Variances) KeyBlockMoments(float[] keys, int length, int d, int bk)
    {
        int blocks = (length + bk - 1) / bk;
        var means = new float[blocks * d];
        var variances = new float[blocks * d];
        var sum = new double[d];
        var squares = new double[d];
        for (int b = 0; b < blocks; b++)
        {
            Array.Clear(sum);
            Array.Clear(squares);
            int j0 = b * bk, j1 = Math.Min(j0 + bk, length);
            for (int j = j0; j < j1; j++)
                for (int c = 0; c < d; c++)
                {
                    double x = keys[(j * d) + c];
                    sum[c] += x;
                    squares[c] += x * x;
                }
            for (int c = 0; c < d; c++)
            {
                double mean = sum[c] / (j1 - j0);
                means[(b * d) + c] = (float)mean;
                variances[(b * d) + c] = (float)Math.Max(0, (squares[c] / (j1 - j0)) - (mean * mean));
            }
        }
        return (means, variances);
    }
}
