namespace Attend.Sparse;

/// <summary>
/// Hierarchical top-k (HiP, Lee et al., arXiv:2406.09827; the log-linear hierarchy of LLSA): for each query block the
/// key blocks it can see are cut into <see cref="TopK"/> ranges; every round each range splits in two, each half is
/// scored by the block's mean (scaled) query against the half's mean key, and the <see cref="TopK"/> best halves
/// survive; after ⌈log2(visible / TopK)⌉ rounds every range is one key block. Coarse-to-fine: a region is dropped once
/// its mean key scores below the others, so selection costs O(n/B · k · log(n/B) · D) per head instead of the pooled
/// estimate's O((n/B)² · D). Range means come from prefix sums of the key blocks (float64) in O(D) each.
/// HiP scores a range by a representative token; the mean key is LLSA's coarse token and needs no extra pass.
/// LLSA's enrichment (coarse tokens of the pruned regions join the attention) is the <c>+centroid</c> compensation.
/// </summary>
public sealed class HierarchicalSelector : SparsitySelector
{
    private readonly int _topK = 16;

    /// <summary>Key blocks kept per query block besides the sink and diagonal (≥ 1; default 16).</summary>
    public int TopK
    {
        get => _topK;
        init => _topK = value >= 1 ? value : throw new ArgumentOutOfRangeException(nameof(TopK), value, "TopK must be ≥ 1");
    }

    /// <summary>Always keep the first key block (attention sink) and the diagonal block (local context); default true.</summary>
    public bool KeepSinkAndDiagonal { get; init; } = true;

    /// <inheritdoc/>
    public override string Name => $"hierarchical(k={TopK})";

    private protected override bool UsesPooledQueries => true;

    private protected override void SelectHead(HeadSelection head)
    {
        int d = head.HeadDim, bs = head.BlockSize, keyBlocks = head.KeyBlocks;
        float[] pooledQueries = head.PooledQueries;
        // prefix[b] = Σ of the keys of blocks < b (float64: ranges are differences of large sums).
        var prefix = new double[(keyBlocks + 1) * d];
        float[] keys = head.Keys;
        for (int b = 0; b < keyBlocks; b++)
        {
            Span<double> next = prefix.AsSpan((b + 1) * d, d);
            prefix.AsSpan(b * d, d).CopyTo(next);
            for (int j = b * bs; j < Math.Min((b + 1) * bs, head.KeyLength); j++)
            {
                ReadOnlySpan<float> key = keys.AsSpan(j * d, d);
                for (int c = 0; c < d; c++) next[c] += key[c];
            }
        }
        var ranges = new List<(int Start, int End)>(2 * TopK);
        var children = new List<(int Start, int End, double Score)>(2 * TopK);
        for (int qb = 0; qb < head.QueryBlocks; qb++)
        {
            int visible = head.VisibleKeyBlocks(qb);
            if (visible == 0) continue;
            if (KeepSinkAndDiagonal)
            {
                head.AddBlock(qb, 0);
                head.AddBlock(qb, visible - 1);
            }
            if (visible <= TopK)
            {
                for (int kb = 0; kb < visible; kb++) head.AddBlock(qb, kb);
                continue;
            }
            ReadOnlySpan<float> query = pooledQueries.AsSpan(qb * d, d);
            ranges.Clear();
            for (int r = 0; r < TopK; r++) ranges.Add(((int)((long)r * visible / TopK), (int)((long)(r + 1) * visible / TopK)));
            while (ranges.Exists(r => r.End - r.Start > 1))
            {
                children.Clear();
                foreach ((int start, int end) in ranges)
                {
                    if (end - start == 1)
                    {
                        children.Add((start, end, Score(query, start, end)));
                        continue;
                    }
                    int mid = (start + end) / 2;
                    children.Add((start, mid, Score(query, start, mid)));
                    children.Add((mid, end, Score(query, mid, end)));
                }
                children.Sort((a, b) => b.Score != a.Score ? b.Score.CompareTo(a.Score) : a.Start.CompareTo(b.Start));
                ranges.Clear();
                for (int i = 0; i < Math.Min(TopK, children.Count); i++) ranges.Add((children[i].Start, children[i].End));
            }
            foreach ((int start, _) in ranges) head.AddBlock(qb, start);
        }

        // The pooled query against the mean key of blocks [start, end) (the last block may be short).
        double Score(ReadOnlySpan<float> query, int start, int end)
        {
            ReadOnlySpan<double> hi = prefix.AsSpan(end * d, d), lo = prefix.AsSpan(start * d, d);
            double dot = 0;
            for (int c = 0; c < d; c++) dot += query[c] * (hi[c] - lo[c]);
            int count = Math.Min(end * bs, head.KeyLength) - (start * bs);
            return dot / count;
        }
    }
}
