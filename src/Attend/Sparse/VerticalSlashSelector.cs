namespace Attend.Sparse;

/// <summary>
/// MInference's vertical-slash pattern (Jiang et al., arXiv:2407.02490): the last <see cref="LastQueries"/> queries
/// are scored exactly against every key; column sums of their softmax rank the vertical lines (globally important
/// keys) and diagonal sums rank the slash lines (fixed relative offsets). The top <see cref="Verticals"/> columns
/// run as gathered key tokens (a <see cref="Masks.TokenSet"/>), the top <see cref="Slashes"/> diagonals as the key
/// blocks they cross, as in MInference's kernel. The first <see cref="SinkColumns"/> columns and the nearest
/// <see cref="LocalDiagonals"/> diagonals are always kept (MInference sets their scores to +∞).
/// Cost: <c>LastQueries · Skv · D</c> per head, negligible beside the attention.
/// </summary>
public sealed class VerticalSlashSelector : SparsitySelector
{
    /// <summary>Queries at the end of the sequence used for the estimate (default 64).</summary>
    public int LastQueries { get; init; } = 64;

    /// <summary>Vertical lines (key columns) kept per head (default 1000, MInference's most common setting).</summary>
    public int Verticals { get; init; } = 1000;

    /// <summary>
    /// Slash lines (diagonal offsets) kept per head, the forced local ones included (default 200). Each slash away from
    /// the others costs a whole block diagonal, so budgets tuned for 128k contexts (MInference's 6096) are far too
    /// dense at 8k–32k.
    /// </summary>
    public int Slashes { get; init; } = 200;

    /// <summary>Leading key columns always kept (default 30).</summary>
    public int SinkColumns { get; init; } = 30;

    /// <summary>Nearest diagonals always kept (default 100).</summary>
    public int LocalDiagonals { get; init; } = 100;

    /// <inheritdoc/>
    public override string Name => $"vertical-slash(v={Verticals},s={Slashes})";

    private protected override void Validate(int queryLength, int keyLength)
    {
        if (LastQueries < 1 || Verticals < 0 || Slashes < 0 || SinkColumns < 0 || LocalDiagonals < 0)
        {
            throw new ArgumentException($"vertical-slash needs LastQueries ≥ 1 and non-negative counts; got LastQueries={LastQueries}, Verticals={Verticals}, Slashes={Slashes}, SinkColumns={SinkColumns}, LocalDiagonals={LocalDiagonals}");
        }
    }

    internal override bool ReadsPackedKeys => true;

    private protected override void SelectHead(HeadSelection head)
    {
        (float[] vertical, float[] slash) = LastRowsProfile(head, LastQueries);
        for (int j = 0; j < Math.Min(SinkColumns, vertical.Length); j++) vertical[j] = float.PositiveInfinity;
        for (int o = 0; o < Math.Min(LocalDiagonals, slash.Length); o++) slash[o] = float.PositiveInfinity;
        int[] columns = SelectionMath.TopK(vertical, Math.Max(Verticals, Math.Min(SinkColumns, vertical.Length)));
        int[] offsets = SelectionMath.TopK(slash, Math.Max(Slashes, Math.Min(LocalDiagonals, slash.Length)));
        Array.Sort(columns);
        int bs = head.BlockSize;
        for (int qb = 0; qb < head.QueryBlocks; qb++)
        {
            int q0 = qb * bs, q1 = Math.Min(q0 + bs, head.QueryLength);
            int limit = head.VisibleKeys(q1 - 1);
            foreach (int j in columns)
            {
                if (j >= limit) break;
                head.AddToken(qb, j);
            }
            AddDiagonals(head, qb, offsets);
        }
    }

    /// <summary>Adds the key blocks that the diagonals at <paramref name="offsets"/> (key = query + Offset − o) cross in query block <paramref name="qb"/>.</summary>
    internal static void AddDiagonals(HeadSelection head, int qb, ReadOnlySpan<int> offsets)
    {
        int bs = head.BlockSize;
        int q0 = qb * bs, q1 = Math.Min(q0 + bs, head.QueryLength);
        foreach (int o in offsets)
        {
            long lo = (long)q0 + head.Offset - o, hi = (long)q1 - 1 + head.Offset - o;
            if (hi < 0 || lo >= head.KeyLength) continue;
            int kb0 = (int)(Math.Max(lo, 0) / bs), kb1 = (int)(Math.Min(hi, head.KeyLength - 1) / bs);
            for (int kb = kb0; kb <= kb1; kb++) head.AddBlock(qb, kb);
        }
    }

    /// <summary>
    /// Softmax of the last <paramref name="count"/> queries against all their visible keys, summed per column
    /// (vertical) and per diagonal offset o = query + Offset − key (slash), each divided by the number of rows.
    /// </summary>
    internal static (float[] Vertical, float[] Slash) LastRowsProfile(HeadSelection head, int count)
    {
        int rows = Math.Min(count, head.QueryLength), first = head.QueryLength - rows, n = head.KeyLength, d = head.HeadDim;
        float[] scores = head.Scratch((long)rows * n);
        var lastRows = new float[rows * d];
        head.CopyQueryRows([.. Enumerable.Range(first, rows)], lastRows);
        ScoreGemm.Multiply(lastRows, rows, d, head.PackedKeys, 0, n, scores);
        var vertical = new float[n];
        var slash = new float[n];
        var reversed = new float[n];
        for (int r = 0; r < rows; r++)
        {
            int visible = head.VisibleKeys(first + r);
            Span<float> row = scores.AsSpan(r * n, n);
            row[visible..].Fill(float.NegativeInfinity);
            SelectionMath.Softmax(row);
            // vertical[j] += p[j]; slash[o] += p[diagonal − o] (keys after the diagonal, non-causal, have no slash
            // offset) — as element-wise vector adds, the same sums as the scalar loop they replace.
            Linear.Vectors.Axpy(1f, row[..visible], vertical);
            int diagonal = first + r + head.Offset;
            int o0 = Math.Max(0, diagonal - visible + 1), o1 = Math.Min(n - 1, diagonal);
            if (o0 > o1) continue;
            Span<float> flipped = reversed.AsSpan(0, o1 - o0 + 1);
            row[(diagonal - o1)..(diagonal - o0 + 1)].CopyTo(flipped);
            flipped.Reverse();
            Linear.Vectors.Axpy(1f, flipped, slash.AsSpan(o0));
        }
        float inv = 1f / rows;
        for (int j = 0; j < n; j++)
        {
            vertical[j] *= inv;
            slash[j] *= inv;
        }
        return (vertical, slash);
    }
}
