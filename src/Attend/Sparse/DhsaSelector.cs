using System.Runtime.Intrinsics;

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
        int[] keyCuts = Cut(head, head.Keys, head.KeyLength, d), queryCuts = Cut(head, head.Queries, head.QueryLength, d);
        float[] keyChunks = Represent(head.Keys, keyCuts, d), queryChunks = Represent(head.Queries, queryCuts, d);
        int nk = keyCuts.Length - 1, nq = queryCuts.Length - 1, bs = head.BlockSize;
        // Every chunk pair's similarity in one product ([query chunks, key chunks]), then per query chunk its visible
        // key chunks by descending similarity (sorted by negated keys: no comparer delegate).
        var similarity = new float[(long)nq * nk];
        ScoreGemm.Multiply(queryChunks, nq, d, new PackedPanels(keyChunks, nk, d), 0, nk, similarity);
        var negated = new float[nk];
        var order = new int[nk];
        var chosen = new HashSet<int>[head.QueryBlocks];
        for (int a = 0; a < nq; a++)
        {
            int q0 = queryCuts[a], q1 = queryCuts[a + 1];
            int visible = head.VisibleKeys(q1 - 1);   // causal: the chunk's last query sees the most
            if (visible == 0) continue;
            int candidates = 0;
            for (int b = 0; b < nk && keyCuts[b] < visible; b++)
            {
                negated[b] = -similarity[((long)a * nk) + b];
                order[b] = b;
                candidates++;
            }
            Array.Sort(negated, order, 0, candidates);
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
    private int[] Cut(HeadSelection head, float[] rows, int length, int d)
    {
        // prefix[i] = Σ rows[< i] (float64) so any window mean costs O(D); in the worker's reused array (a fresh 32 MB
        // one per side and head cost ≈ 20 ms of page faults at S = 32768).
        double[] prefix = head.DoubleScratch((long)(length + 1) * d);
        prefix.AsSpan(0, d).Clear();
        for (int i = 0; i < length; i++)
        {
            Span<double> next = prefix.AsSpan((i + 1) * d, d);
            ReadOnlySpan<double> previous = prefix.AsSpan(i * d, d);
            ReadOnlySpan<float> row = rows.AsSpan(i * d, d);
            int c = 0;
            for (; c + 8 <= d; c += 8)
            {
                (var lo, var hi) = Vector256.Widen(Vector256.Create(row.Slice(c, 8)));
                Vector256.CopyTo(Vector256.Create(previous.Slice(c, 4)) + lo, next.Slice(c, 4));
                Vector256.CopyTo(Vector256.Create(previous.Slice(c + 4, 4)) + hi, next.Slice(c + 4, 4));
            }
            for (; c < d; c++) next[c] = previous[c] + row[c];
        }
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

    /// <summary>Cosine of the sums of rows [a0, a1) and [b0, b1) from the prefix sums (four lanes of float64).</summary>
    private static double Cosine(double[] prefix, int a0, int a1, int b0, int b1, int d)
    {
        ReadOnlySpan<double> pa0 = prefix.AsSpan(a0 * d, d), pa1 = prefix.AsSpan(a1 * d, d), pb0 = prefix.AsSpan(b0 * d, d), pb1 = prefix.AsSpan(b1 * d, d);
        var dot = Vector256<double>.Zero;
        var na = dot;
        var nb = dot;
        int c = 0;
        for (; c + 4 <= d; c += 4)
        {
            var x = Vector256.Create(pa1.Slice(c, 4)) - Vector256.Create(pa0.Slice(c, 4));
            var y = Vector256.Create(pb1.Slice(c, 4)) - Vector256.Create(pb0.Slice(c, 4));
            dot += x * y;
            na += x * x;
            nb += y * y;
        }
        double sdot = Vector256.Sum(dot), sna = Vector256.Sum(na), snb = Vector256.Sum(nb);
        for (; c < d; c++)
        {
            double x = pa1[c] - pa0[c], y = pb1[c] - pb0[c];
            sdot += x * y;
            sna += x * x;
            snb += y * y;
        }
        return sna > 0 && snb > 0 ? sdot / Math.Sqrt(sna * snb) : 1;
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
