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
    /// <paramref name="lse"/> (both from running that plan; float32 LSE in natural log). A skipped block counts for a
    /// row when the plan's element mask allows the row every key of it (e.g. below the causal diagonal). The plan
    /// must have blocks and no permutation. <see cref="Attention.Forward{T}(TensorView{T}, TensorView{T}, TensorView{T}, TensorView{T}, AttentionOptions?, TensorView{float}, KernelTuning?)"/> calls this for plans with
    /// <see cref="Compensation.Centroid"/>.
    /// </summary>
    public static void Apply<T>(TensorView<T> q, TensorView<T> k, TensorView<T> v, SparsityPlan plan, float? scale,
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
        Mask? mask = blocks.Mask;
        MaskExtent extent = blocks.Extent;

        // Block means of keys (packed as the product's keys) and of values (transposed, packed: the weighted sum is
        // then a second product) per (batch, kv head).
        var keyMeans = new PackedPanels[b * hkv];
        var valueMeans = new PackedPanels[b * hkv];
        var parallel = new ParallelOptions { MaxDegreeOfParallelism = tuning?.Threads is > 0 and var t ? t : Environment.ProcessorCount };
        Parallel.For(0, b * hkv, parallel, index =>
        {
            int bi = index / hkv, hi = index % hkv;
            keyMeans[index] = new PackedPanels(BlockMeans(k, bi, hi, bk, transpose: false), keyBlocks, d);
            valueMeans[index] = new PackedPanels(BlockMeans(v, bi, hi, bk, transpose: true), dv, keyBlocks);
        });
        var logSizes = new float[keyBlocks];
        for (int j = 0; j < keyBlocks; j++) logSizes[j] = MathF.Log(Math.Min(skv, (j + 1) * bk) - (j * bk));

        int queryBlocks = (sq + bq - 1) / bq;
        Parallel.For(0, b * h * queryBlocks, parallel, work =>
        {
            int bi = work / (h * queryBlocks), hi = work / queryBlocks % h, qb = work % queryBlocks;
            int kvIndex = bi * hkv + hi / (h / hkv);
            int q0 = qb * bq, rows = Math.Min(bq, sq - q0);

            // Per skipped key block: Full = every row of the block sees all its keys, Partial = decide per row.
            var kinds = new BlockClass[keyBlocks];
            for (int j = 0; j < keyBlocks; j++)
            {
                kinds[j] = mask?.Classify(extent, bi, hi, q0, q0 + rows, j * bk, Math.Min(skv, (j + 1) * bk)) ?? BlockClass.Full;
            }
            foreach (int col in blocks.Row(bi, hi, qb, out _)) kinds[col] = BlockClass.Empty;   // visited: computed exactly
            if (plan.Tokens is { } tokens)
            {
                foreach (int token in tokens.Row(bi, hi, qb)) kinds[token / bk] = BlockClass.Empty;
            }

            // Candidate blocks: skipped, and wholly visible to some row of the block.
            int candidateCount = 0;
            Span<int> candidates = stackalloc int[keyBlocks <= 1024 ? keyBlocks : 0];
            int[]? heap = keyBlocks <= 1024 ? null : new int[keyBlocks];
            if (heap is not null) candidates = heap;
            for (int j = 0; j < keyBlocks; j++)
            {
                if (kinds[j] != BlockClass.Empty) candidates[candidateCount++] = j;
            }
            if (candidateCount == 0) return;   // nothing skipped that this query block may see
            candidates = candidates[..candidateCount];

            float[] queries = SparsitySelector.Gather(q.Slice(1, q0, rows), bi, hi, rows, d, s);
            var scores = new float[rows * keyBlocks];
            ScoreGemm.Multiply(queries, rows, d, keyMeans[kvIndex], 0, keyBlocks, scores);
            var lseC = new double[rows];
            Span<(int Start, int End)> runs = stackalloc (int, int)[2];
            for (int r = 0; r < rows; r++)
            {
                // The row's scores become its normalized weights over the candidates it may see (0 elsewhere).
                Span<float> rowScores = scores.AsSpan(r * keyBlocks, keyBlocks);
                float max = float.NegativeInfinity;
                foreach (int j in candidates)
                {
                    bool use = kinds[j] == BlockClass.Full || WhollyVisible(mask!, extent, bi, hi, q0 + r, j * bk, Math.Min(skv, (j + 1) * bk), runs);
                    float score = use ? rowScores[j] + logSizes[j] : float.NegativeInfinity;
                    rowScores[j] = score;
                    if (score > max) max = score;
                }
                if (!(max > float.NegativeInfinity))
                {
                    lseC[r] = double.NegativeInfinity;   // nothing skipped that this row may see
                    rowScores.Clear();
                    continue;
                }
                double total = 0;
                foreach (int j in candidates) total += rowScores[j] = rowScores[j] == float.NegativeInfinity ? 0 : MathF.Exp(rowScores[j] - max);
                float inverse = (float)(1 / total);
                int next = 0;
                for (int j = 0; j < keyBlocks; j++)
                {
                    bool candidate = next < candidates.Length && candidates[next] == j;
                    if (candidate) next++;
                    rowScores[j] = candidate ? rowScores[j] * inverse : 0;
                }
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
                float a = (float)(wS / (wS + wC)), c = (float)(wC / (wS + wC));
                output.CopyRow(bi, i, hi, current);
                Linear.Vectors.Scale(current, a);
                Linear.Vectors.Axpy(c, compensation.AsSpan(r * dv, dv), current);
                output.WriteRow(bi, i, hi, current, 1f);
                lse[bi, i, hi] = (float)(m + Math.Log(wS + wC));
            }
        });
    }

    /// <summary>Whether the mask lets row <paramref name="q"/> see every key of [k0, k1) (no run form: not counted).</summary>
    private static bool WhollyVisible(Mask mask, in MaskExtent extent, int b, int h, int q, int k0, int k1, Span<(int Start, int End)> runs) =>
        mask.RowRuns(extent, b, h, q, k0, k1, runs) == 1 && runs[0] == (k0, k1);

    /// <summary>
    /// Means of consecutive blocks of <paramref name="blockSize"/> rows of (b, h): [blocks, d], or [d, blocks] with
    /// <paramref name="transpose"/>. Streams one row at a time (a gathered copy of the head cost more in fresh pages
    /// than the sums).
    /// </summary>
    private static float[] BlockMeans<T>(TensorView<T> x, int b, int h, int blockSize, bool transpose) where T : unmanaged
    {
        int length = x.Dim(1), d = x.Dim(3), blocks = (length + blockSize - 1) / blockSize;
        var means = new float[blocks * d];
        var row = new float[d];
        for (int j = 0; j < blocks; j++)
        {
            Span<float> mean = means.AsSpan(j * d, d);
            int end = Math.Min(length, (j + 1) * blockSize);
            for (int i = j * blockSize; i < end; i++)
            {
                x.CopyRow(b, i, h, row);
                Linear.Vectors.Axpy(1f, row, mean);
            }
            Linear.Vectors.Scale(mean, 1f / (end - (j * blockSize)));
        }
        if (!transpose) return means;
        var transposed = new float[d * blocks];
        for (int j = 0; j < blocks; j++)
            for (int x0 = 0; x0 < d; x0++) transposed[(x0 * blocks) + j] = means[(j * d) + x0];
        return transposed;
    }
}

/// <summary>
/// A selector whose plans carry <see cref="Compensation.Centroid"/>, so the executor compensates their skipped blocks
/// (spec suffix <c>+centroid</c>, e.g. <c>pooled:budget=top8+centroid</c>).
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
        Inner.Plan(q, k, causal, scale).WithCompensation(Compensation.Centroid);

    /// <inheritdoc/>
    public SparsityPlan Plan<T>(TensorView<T> q, TensorView<T> k, TensorView<T> v, bool causal = true, float? scale = null, KernelTuning? tuning = null) where T : unmanaged =>
        (Inner is IValueAwareSelector valueAware ? valueAware.Plan(q, k, v, causal, scale, tuning) : Inner.Plan(q, k, causal, scale))
            .WithCompensation(Compensation.Centroid);
}
