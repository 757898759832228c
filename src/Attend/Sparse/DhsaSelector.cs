namespace Attend.Sparse;

/// <summary>
/// DHSA, dynamic hierarchical sparse attention (arXiv:2510.24606): the sequence is cut into <b>variable-length
/// chunks</b> where its content changes, each chunk is represented by its mean vector scaled by √(chunk length) (so a
/// long chunk weighs more than a short one with the same mean, as the sum of its scores would), chunk-level
/// similarities q̄_a·k̄_b decide which key chunks every query chunk attends, and the decision is upsampled to tokens:
/// each query block attends every key of the chunks its query chunks chose (gathered tokens), plus the sink and
/// diagonal blocks. DHSA learns its boundary predictor; here a boundary goes where the mean of the
/// <see cref="Window"/> tokens before differs most (cosine) from the mean of those after, searched between half and
/// twice <see cref="ChunkLength"/> from the previous one. Per query chunk the best key chunks are taken until they
/// hold <see cref="TokenBudget"/> keys. Cost: O(n·D) to cut, O((n/L)²·D) to score.
/// </summary>
public sealed class DhsaSelector : SparsitySelector
{
    private readonly int _chunk = 64, _window = 8, _budget = 1024;

    /// <summary>Mean chunk length in tokens (≥ 2; default 64): boundaries are searched in [L/2, 2L].</summary>
    public int ChunkLength
    {
        get => _chunk;
        init => _chunk = value >= 2 ? value : throw new ArgumentOutOfRangeException(nameof(ChunkLength), value, "ChunkLength must be ≥ 2");
    }

    /// <summary>Tokens on each side of a candidate boundary whose means are compared (≥ 1; default 8).</summary>
    public int Window
    {
        get => _window;
        init => _window = value >= 1 ? value : throw new ArgumentOutOfRangeException(nameof(Window), value, "Window must be ≥ 1");
    }

    /// <summary>Keys each query chunk attends, taken as whole chunks in order of chunk similarity (≥ 1; default 1024).</summary>
    public int TokenBudget
    {
        get => _budget;
        init => _budget = value >= 1 ? value : throw new ArgumentOutOfRangeException(nameof(TokenBudget), value, "TokenBudget must be ≥ 1");
    }

    /// <inheritdoc/>
    public override string Name => $"dhsa(L={ChunkLength}, budget={TokenBudget})";

    private protected override void SelectHead(HeadSelection head)
    {
        int d = head.HeadDim;
        int[] keyCuts = Cut(head.Keys, head.KeyLength, d), queryCuts = Cut(head.Queries, head.QueryLength, d);
        float[] keyChunks = Represent(head.Keys, keyCuts, d), queryChunks = Represent(head.Queries, queryCuts, d);
        int nk = keyCuts.Length - 1, bs = head.BlockSize;
        var scores = new float[nk];
        var order = new int[nk];
        var chosen = new HashSet<int>[head.QueryBlocks];
        for (int a = 0; a + 1 < queryCuts.Length; a++)
        {
            int q0 = queryCuts[a], q1 = queryCuts[a + 1];
            int visible = head.VisibleKeys(q1 - 1);   // causal: the chunk's last query sees the most
            if (visible == 0) continue;
            int candidates = 0;
            ReadOnlySpan<float> qa = queryChunks.AsSpan(a * d, d);
            for (int b = 0; b < nk && keyCuts[b] < visible; b++)
            {
                ReadOnlySpan<float> kb = keyChunks.AsSpan(b * d, d);
                float dot = 0;
                for (int c = 0; c < d; c++) dot += qa[c] * kb[c];
                scores[b] = dot;
                order[b] = b;
                candidates++;
            }
            Array.Sort(scores, order, 0, candidates, Comparer<float>.Create((x, y) => y.CompareTo(x)));
            int taken = 0;
            for (int r = 0; r < candidates && taken < TokenBudget; r++)
            {
                int b = order[r];
                int k0 = keyCuts[b], k1 = Math.Min(keyCuts[b + 1], visible);
                taken += k1 - k0;
                for (int qb = q0 / bs; qb <= (q1 - 1) / bs; qb++)
                {
                    (chosen[qb] ??= []).Add(b);
                }
            }
        }
        for (int qb = 0; qb < head.QueryBlocks; qb++)
        {
            int visibleBlocks = head.VisibleKeyBlocks(qb);
            if (visibleBlocks == 0) continue;
            head.AddBlock(qb, 0);
            head.AddBlock(qb, visibleBlocks - 1);
            if (chosen[qb] is null) continue;
            int skip0 = Math.Min(bs, head.KeyLength), skip1 = (visibleBlocks - 1) * bs;   // keys inside the sink / diagonal blocks need no token entry
            foreach (int b in chosen[qb])
            {
                for (int j = keyCuts[b]; j < keyCuts[b + 1]; j++)
                {
                    if (j >= skip0 && j < skip1) head.AddToken(qb, j);
                }
            }
        }
    }

    /// <summary>Chunk boundaries [0, c1, …, length]: each cut where the means of the windows before and after differ most.</summary>
    private int[] Cut(float[] rows, int length, int d)
    {
        // prefix[i] = Σ rows[< i] (float64) so any window mean costs O(D).
        var prefix = new double[(length + 1) * d];
        for (int i = 0; i < length; i++)
            for (int c = 0; c < d; c++) prefix[((i + 1) * d) + c] = prefix[(i * d) + c] + rows[(i * d) + c];
        var cuts = new List<int> { 0 };
        int start = 0;
        while (length - start > 2 * ChunkLength)
        {
            int best = start + ChunkLength;
            double bestScore = double.NegativeInfinity;
            for (int j = start + Math.Max(1, ChunkLength / 2); j <= start + (2 * ChunkLength); j++)
            {
                double score = 1 - Cosine(prefix, Math.Max(0, j - Window), j, j, Math.Min(length, j + Window), d);
                if (score > bestScore)
                {
                    bestScore = score;
                    best = j;
                }
            }
            cuts.Add(best);
            start = best;
        }
        cuts.Add(length);
        return [.. cuts];
    }

    private static double Cosine(double[] prefix, int a0, int a1, int b0, int b1, int d)
    {
        double dot = 0, na = 0, nb = 0;
        for (int c = 0; c < d; c++)
        {
            double x = prefix[(a1 * d) + c] - prefix[(a0 * d) + c], y = prefix[(b1 * d) + c] - prefix[(b0 * d) + c];
            dot += x * y;
            na += x * x;
            nb += y * y;
        }
        return na > 0 && nb > 0 ? dot / Math.Sqrt(na * nb) : 1;
    }

    /// <summary>Each chunk's mean row times √(its length) → [chunks, D].</summary>
    private static float[] Represent(float[] rows, int[] cuts, int d)
    {
        var result = new float[(cuts.Length - 1) * d];
        for (int a = 0; a + 1 < cuts.Length; a++)
        {
            Span<float> o = result.AsSpan(a * d, d);
            for (int i = cuts[a]; i < cuts[a + 1]; i++)
                for (int c = 0; c < d; c++) o[c] += rows[(i * d) + c];
            float scale = 1f / MathF.Sqrt(cuts[a + 1] - cuts[a]);   // mean × √len = sum / √len
            for (int c = 0; c < d; c++) o[c] *= scale;
        }
        return result;
    }
}
