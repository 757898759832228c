using Attend.Masks;
using Attend.Sparse;
using Attend.Tensors;

namespace Attend;

/// <summary>
/// Accuracy of an approximate attention against dense attention on the same inputs: what every sparse or linear
/// method reports beside its speed. All metrics take [B, S, H, D] outputs (or [B, S, H] LSEs) and an optional head
/// (−1: all heads). Rows whose dense output is not finite are skipped.
/// </summary>
public static class Metrics
{
    /// <summary>‖actual − expected‖₂ / ‖expected‖₂ over all elements (of one head).</summary>
    public static double RelativeL2<T>(TensorView<T> actual, TensorView<T> expected, int head = -1) where T : unmanaged
    {
        (double diff, double norm, _, _) = Sums(actual, expected, head);
        return norm == 0 ? (diff == 0 ? 0 : double.PositiveInfinity) : Math.Sqrt(diff / norm);
    }

    /// <summary>Cosine similarity of the flattened outputs (of one head).</summary>
    public static double Cosine<T>(TensorView<T> actual, TensorView<T> expected, int head = -1) where T : unmanaged
    {
        (_, double norm, double dot, double actualNorm) = Sums(actual, expected, head);
        return norm == 0 || actualNorm == 0 ? 0 : dot / Math.Sqrt(norm * actualNorm);
    }

    /// <summary>
    /// Attention recall: the mean over query rows of the share of the dense softmax mass the approximation computed,
    /// <c>exp(lse_plan − lse_dense)</c> — both LSEs from the executor (the plan's LSE sums only the pairs it computed).
    /// Rows with no key in the dense attention are skipped.
    /// </summary>
    public static double AttentionRecall(TensorView<float> planLse, TensorView<float> denseLse, int head = -1)
    {
        RequireSameShape(planLse, denseLse, nameof(planLse), rank: 3);
        double sum = 0;
        long rows = 0;
        int b0 = planLse.Shape[0], s0 = planLse.Shape[1], h0 = planLse.Shape[2];
        for (int b = 0; b < b0; b++)
            for (int s = 0; s < s0; s++)
                for (int h = head < 0 ? 0 : head; h < (head < 0 ? h0 : head + 1); h++)
                {
                    float dense = denseLse[b, s, h];
                    if (!float.IsFinite(dense)) continue;
                    float plan = planLse[b, s, h];
                    sum += float.IsNegativeInfinity(plan) ? 0 : Math.Min(1.0, Math.Exp(plan - (double)dense));
                    rows++;
                }
        return rows == 0 ? 1 : sum / rows;
    }

    /// <summary>Fraction of <paramref name="needles"/> (of one head) whose (query, key) pair the plan computes.</summary>
    public static double NeedleHitRate(SparsityPlan plan, IEnumerable<Needle> needles, int head = -1)
    {
        ArgumentNullException.ThrowIfNull(plan);
        ArgumentNullException.ThrowIfNull(needles);
        int hits = 0, count = 0;
        foreach (Needle n in needles)
        {
            if (head >= 0 && n.Head != head) continue;
            count++;
            if (plan.Allows(n.Batch, n.Head, n.Query, n.Key)) hits++;
        }
        return count == 0 ? 1 : (double)hits / count;
    }

    /// <summary>Fraction of the causal (or full) (query, key) pairs the plan computes (for one head, or all), from its visited blocks and tokens.</summary>
    public static double Density(SparsityPlan plan, bool causal, int head = -1)
    {
        ArgumentNullException.ThrowIfNull(plan);
        MaskExtent e = plan.Extent;
        double pairs = 0, total = 0;
        int bq = plan.BlockQ;
        for (int b = 0; b < e.Batch; b++)
            for (int h = head < 0 ? 0 : head; h < (head < 0 ? e.Heads : head + 1); h++)
                for (int qb = 0; qb < (e.QueryLength + bq - 1) / bq; qb++)
                {
                    int q0 = qb * bq, q1 = Math.Min(q0 + bq, e.QueryLength);
                    for (int q = q0; q < q1; q++) total += causal ? Math.Clamp(q + e.CausalOffset + 1, 0, e.KeyLength) : e.KeyLength;
                    double rows = q1 - q0;
                    if (plan.Blocks is { } blocks)
                    {
                        ReadOnlySpan<int> cols = blocks.Row(b, h, qb, out ReadOnlySpan<BlockClass> kinds);
                        for (int i = 0; i < cols.Length; i++)
                        {
                            int k0 = cols[i] * blocks.BlockK, k1 = Math.Min(k0 + blocks.BlockK, e.KeyLength);
                            pairs += kinds[i] == BlockClass.Full ? rows * (k1 - k0) : Allowed(blocks.Mask, e, b, h, q0, q1, k0, k1);
                        }
                    }
                    if (plan.Tokens is { } tokens)
                    {
                        foreach (int kv in tokens.Row(b, h, qb))
                        {
                            if (plan.Blocks?.Row(b, h, qb, out _).BinarySearch(kv / plan.Blocks.BlockK) >= 0) continue;
                            pairs += Allowed(tokens.Mask, e, b, h, q0, q1, kv, kv + 1);
                        }
                    }
                }
        return total == 0 ? 0 : pairs / total;
    }

    /// <summary>
    /// How concentrated causal attention is (the data README's measure): mean over the last <paramref name="lastQueries"/>
    /// queries of the share of the softmax mass held by the top <paramref name="keyFraction"/> of each row's visible keys.
    /// Near 1: sharp attention a sparse method can exploit; near <paramref name="keyFraction"/>: uniform.
    /// </summary>
    public static double TopKeyMassShare<T>(TensorView<T> q, TensorView<T> k, int head, double keyFraction = 0.05, int lastQueries = 256, float? scale = null) where T : unmanaged
    {
        if (q.Rank != 4 || k.Rank != 4) throw new ArgumentException("q and k must be [B, S, H, D]", nameof(q));
        int s = q.Shape[1], h = q.Shape[2], d = q.Shape[3], skv = k.Shape[1], group = h / k.Shape[2];
        if ((uint)head >= (uint)h) throw new ArgumentOutOfRangeException(nameof(head), head, $"head must be in 0..{h - 1}");
        float sc = scale ?? 1f / MathF.Sqrt(d);
        int rows = Math.Min(lastQueries, s), first = s - rows;
        float[] qa = SparsitySelector.Gather(q.Slice(1, first, rows), 0, head, rows, d, sc);
        float[] ka = SparsitySelector.Gather(k, 0, head / group, skv, d, 1f);
        var scores = new float[(long)rows * skv];
        ScoreGemm.Multiply(qa, rows, d, new PackedPanels(ka, skv, d), 0, skv, scores);
        double total = 0;
        for (int i = 0; i < rows; i++)
        {
            int visible = Math.Clamp(first + i + skv - s + 1, 1, skv);
            Span<float> row = scores.AsSpan(i * skv, visible);
            SelectionMath.Softmax(row);
            row.Sort();
            int top = Math.Max(1, (int)Math.Ceiling(keyFraction * visible));
            double share = 0;
            for (int j = visible - top; j < visible; j++) share += row[j];
            total += share;
        }
        return total / rows;
    }

    private static double Allowed(Mask? mask, MaskExtent e, int b, int h, int q0, int q1, int k0, int k1)
    {
        double n = 0;
        if (mask is null) return (double)(q1 - q0) * (k1 - k0);
        if (ReferenceEquals(mask, Mask.Causal))
        {
            // Row q sees keys ≤ q + offset: count in closed form.
            for (int q = q0; q < q1; q++) n += Math.Clamp(q + e.CausalOffset + 1 - k0, 0, k1 - k0);
            return n;
        }
        for (int q = q0; q < q1; q++)
        {
            for (int kv = k0; kv < k1; kv++)
            {
                if (mask.Allows(e, b, h, q, kv)) n++;
            }
        }
        return n;
    }

    internal static (double Diff, double Norm, double Dot, double ActualNorm) Sums<T>(TensorView<T> actual, TensorView<T> expected, int head) where T : unmanaged
    {
        RequireSameShape(actual, expected, nameof(actual), rank: 4);
        int b0 = actual.Shape[0], s0 = actual.Shape[1], h0 = actual.Shape[2], d = actual.Shape[3];
        if (head >= h0) throw new ArgumentOutOfRangeException(nameof(head), head, $"head must be < H={h0} (or −1 for all)");
        var a = new float[d];
        var e = new float[d];
        double diff = 0, norm = 0, dot = 0, an = 0;
        for (int b = 0; b < b0; b++)
            for (int s = 0; s < s0; s++)
                for (int h = head < 0 ? 0 : head; h < (head < 0 ? h0 : head + 1); h++)
                {
                    actual.CopyRow(b, s, h, a);
                    expected.CopyRow(b, s, h, e);
                    double rowNorm = 0;
                    for (int c = 0; c < d; c++) rowNorm += (double)e[c] * e[c];
                    if (!double.IsFinite(rowNorm)) continue;
                    for (int c = 0; c < d; c++)
                    {
                        double x = a[c], y = e[c];
                        diff += (x - y) * (x - y);
                        dot += x * y;
                        an += x * x;
                    }
                    norm += rowNorm;
                }
        return (diff, norm, dot, an);
    }

    private static void RequireSameShape<TA, TB>(TensorView<TA> a, TensorView<TB> b, string name, int rank) where TA : unmanaged where TB : unmanaged
    {
        if (a.Rank != rank || b.Rank != rank || !a.Shape.SequenceEqual(b.Shape))
        {
            throw new ArgumentException($"{name} and its reference must both be rank {rank} of one shape; got [{string.Join(", ", a.Shape.ToArray())}] and [{string.Join(", ", b.Shape.ToArray())}]", name);
        }
    }
}
