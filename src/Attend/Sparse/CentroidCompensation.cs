using Attend.Masks;
using Attend.Tensors;

namespace Attend.Sparse;

/// <summary>
/// Compensation for the key blocks a plan skips, merged in LSE space: every skipped key block that is wholly visible
/// to a query row stands in as one centroid — score scale·q·k̄ plus ln(block size), value v̄ — the pooled
/// rectification of Rectified SpaAttn and the centroid compensation of SVG-EAR (its error-aware routing is not
/// built). By Jensen's inequality exp(q·k̄) ≤ mean exp(q·k), so the skipped mass is under- rather than
/// over-estimated. Costs O(S · skipped blocks · D) per head as two small matrix products per query block; no O(S²)
/// memory. Key blocks holding gathered tokens of the query block count as visited.
/// </summary>
public static class CentroidCompensation
{
    /// <summary>
    /// Adds the centroid estimate of <paramref name="plan"/>'s skipped blocks to <paramref name="output"/> and
    /// <paramref name="lse"/> (both from running that plan; float32 LSE in natural log). The plan must have blocks
    /// and no permutation.
    /// </summary>
    public static void Apply<T>(TensorView<T> q, TensorView<T> k, TensorView<T> v, SparsityPlan plan, bool causal, float? scale,
        TensorView<T> output, TensorView<float> lse, KernelTuning? tuning = null) where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(plan);
        AttentionShape shape = AttentionShape.Of(q, k, v);
        shape.RequireOutput(output, nameof(output));
        shape.RequireLse(lse, nameof(lse));
        if (plan.Blocks is not { } blocks) throw new ArgumentException("compensation needs a plan with blocks", nameof(plan));
        if (plan.Permutation is not null) throw new ArgumentException("compensation of permuted plans is not supported", nameof(plan));
        if (plan.Extent != shape.MaskExtent) throw new ArgumentException($"plan was built for {plan.Extent}; the inputs are {shape.MaskExtent}", nameof(plan));
        float s = scale ?? 1f / MathF.Sqrt(shape.HeadDim);
        int b = shape.Batch, h = shape.Heads, hkv = shape.KvHeads, sq = shape.QueryLength, skv = shape.KeyLength, d = shape.HeadDim, dv = shape.ValueDim;
        int bk = blocks.BlockK, bq = blocks.BlockQ, keyBlocks = (skv + bk - 1) / bk;
        long offset = causal ? (long)skv - sq : long.MaxValue / 2;

        // Block means of keys and values per (batch, kv head).
        var keyMeans = new PackedPanels[b * hkv];
        var valueMeans = new PackedPanels[b * hkv];
        var parallel = new ParallelOptions { MaxDegreeOfParallelism = tuning?.Threads is > 0 and var t ? t : Environment.ProcessorCount };
        Parallel.For(0, b * hkv, parallel, index =>
        {
            int bi = index / hkv, hi = index % hkv;
            var km = new float[keyBlocks * d];
            var vm = new float[keyBlocks * dv];
            var row = new float[Math.Max(d, dv)];
            for (int j = 0; j < skv; j++)
            {
                k.CopyRow(bi, j, hi, row.AsSpan(0, d));
                Linear.Vectors.Axpy(1f, row.AsSpan(0, d), km.AsSpan((j / bk) * d, d));
                v.CopyRow(bi, j, hi, row.AsSpan(0, dv));
                Linear.Vectors.Axpy(1f, row.AsSpan(0, dv), vm.AsSpan((j / bk) * dv, dv));
            }
            for (int j = 0; j < keyBlocks; j++)
            {
                float inv = 1f / (Math.Min(skv, (j + 1) * bk) - (j * bk));
                Linear.Vectors.Scale(km.AsSpan(j * d, d), inv);
                Linear.Vectors.Scale(vm.AsSpan(j * dv, dv), inv);
            }
            keyMeans[index] = new PackedPanels(km, keyBlocks, d);
            // Value means transposed ([Dv, blocks]) and packed: the weighted sum is then one more ScoreGemm product.
            var vt = new float[dv * keyBlocks];
            for (int j = 0; j < keyBlocks; j++)
                for (int x = 0; x < dv; x++) vt[(x * keyBlocks) + j] = vm[(j * dv) + x];
            valueMeans[index] = new PackedPanels(vt, dv, keyBlocks);
        });
        var logSizes = new float[keyBlocks];
        for (int j = 0; j < keyBlocks; j++) logSizes[j] = MathF.Log(Math.Min(skv, (j + 1) * bk) - (j * bk));

        int queryBlocks = (sq + bq - 1) / bq;
        Parallel.For(0, b * h * queryBlocks, parallel, work =>
        {
            int bi = work / (h * queryBlocks), hi = work / queryBlocks % h, qb = work % queryBlocks;
            int kvIndex = bi * hkv + hi / (h / hkv);
            int q0 = qb * bq, rows = Math.Min(bq, sq - q0);
            var visited = new bool[keyBlocks];
            foreach (int col in blocks.Row(bi, hi, qb, out _)) visited[col] = true;
            if (plan.Tokens is { } tokens)
            {
                foreach (int token in tokens.Row(bi, hi, qb)) visited[token / bk] = true;
            }
            var queries = new float[rows * d];
            for (int r = 0; r < rows; r++)
            {
                q.CopyRow(bi, q0 + r, hi, queries.AsSpan(r * d, d));
                Linear.Vectors.Scale(queries.AsSpan(r * d, d), s);
            }
            var scores = new float[rows * keyBlocks];
            ScoreGemm.Multiply(queries, rows, d, keyMeans[kvIndex], 0, keyBlocks, scores);
            var lseC = new double[rows];
            for (int r = 0; r < rows; r++)
            {
                long limit = q0 + r + offset;   // last key this row may see
                Span<float> rowScores = scores.AsSpan(r * keyBlocks, keyBlocks);
                float max = float.NegativeInfinity;
                for (int j = 0; j < keyBlocks; j++)
                {
                    bool use = !visited[j] && Math.Min(skv, (j + 1) * bk) - 1 <= limit;
                    rowScores[j] = use ? rowScores[j] + logSizes[j] : float.NegativeInfinity;
                    if (rowScores[j] > max) max = rowScores[j];
                }
                if (!(max > float.NegativeInfinity))
                {
                    lseC[r] = double.NegativeInfinity;   // nothing skipped that this row may see
                    rowScores.Clear();
                    continue;
                }
                double total = 0;
                for (int j = 0; j < keyBlocks; j++) total += rowScores[j] = rowScores[j] == float.NegativeInfinity ? 0 : MathF.Exp(rowScores[j] - max);
                Linear.Vectors.Scale(rowScores, (float)(1 / total));
                lseC[r] = max + Math.Log(total);
            }
            // Normalized weights [rows, blocks] × value means [blocks, Dv].
            var compensation = new float[rows * dv];
            ScoreGemm.Multiply(scores, rows, keyBlocks, valueMeans[kvIndex], 0, dv, compensation);
            var current = new float[dv];
            for (int r = 0; r < rows; r++)
            {
                if (double.IsNegativeInfinity(lseC[r])) continue;
                int i = q0 + r;
                double lseS = lse[bi, i, hi];
                double m = Math.Max(lseS, lseC[r]);
                double wS = double.IsNegativeInfinity(lseS) ? 0 : Math.Exp(lseS - m), wC = Math.Exp(lseC[r] - m);
                output.CopyRow(bi, i, hi, current);
                float a = (float)(wS / (wS + wC)), c = (float)(wC / (wS + wC));
                ReadOnlySpan<float> comp = compensation.AsSpan(r * dv, dv);
                for (int x = 0; x < dv; x++) output[bi, i, hi, x] = ElementConvert.FromSingle<T>((a * current[x]) + (c * comp[x]));
                lse[bi, i, hi] = (float)(m + Math.Log(wS + wC));
            }
        });
    }
}

/// <summary>
/// A selector whose skipped blocks are compensated by <see cref="CentroidCompensation"/> when run through
/// <see cref="SparseAttention.Forward"/> (spec suffix <c>+centroid</c>, e.g. <c>pooled:budget=top8+centroid</c>).
/// </summary>
public sealed class CompensatedSelector(ISparsitySelector inner) : IValueAwareSelector
{
    /// <summary>The selector that plans.</summary>
    public ISparsitySelector Inner { get; } = inner ?? throw new ArgumentNullException(nameof(inner));

    /// <inheritdoc/>
    public string Name => Inner.Name + "+centroid";

    /// <inheritdoc/>
    public override string ToString() => Name;

    /// <inheritdoc/>
    public SparsityPlan Plan<T>(TensorView<T> q, TensorView<T> k, bool causal = true, float? scale = null) where T : unmanaged =>
        Inner.Plan(q, k, causal, scale);

    /// <inheritdoc/>
    public SparsityPlan Plan<T>(TensorView<T> q, TensorView<T> k, TensorView<T> v, bool causal = true, float? scale = null, KernelTuning? tuning = null) where T : unmanaged =>
        Inner is IValueAwareSelector valueAware ? valueAware.Plan(q, k, v, causal, scale, tuning) : Inner.Plan(q, k, causal, scale);
}
