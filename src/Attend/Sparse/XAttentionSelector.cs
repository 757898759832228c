using System.Globalization;

namespace Attend.Sparse;

/// <summary>
/// XAttention (Xu et al., arXiv:2503.16428): block importance from antidiagonal sums. Queries and keys are regrouped
/// in strides of <see cref="Stride"/> tokens — a query group concatenates its tokens in reverse order, a key group in
/// order — so one dot product of groups sums an antidiagonal of the stride × stride score tile, which meets every
/// row and column of the tile once. The group scores (divided by the stride) are softmaxed per query group, summed
/// into blocks, and each query-block row keeps its largest blocks until they hold <see cref="Threshold"/> of its
/// mass; the first and the diagonal block are always kept. Cost: Sq·Skv·D / Stride (half with causal).
/// </summary>
public sealed class XAttentionSelector : SparsitySelector
{
    private int _stride = 8;

    /// <summary>Cumulative block mass to keep per query-block row (paper: 0.9; default 0.9).</summary>
    public double Threshold { get; init; } = 0.9;

    /// <summary>Antidiagonal stride (paper: 8 or 16; default 8); must divide the block size.</summary>
    public int Stride
    {
        get => _stride;
        init => _stride = value is >= 1 and <= 64 ? value : throw new ArgumentOutOfRangeException(nameof(Stride), value, "Stride must be in 1..64");
    }

    /// <inheritdoc/>
    public override string Name => string.Create(CultureInfo.InvariantCulture, $"xattention(t={Threshold:0.###},s={Stride})");

    private protected override void Validate(int queryLength, int keyLength)
    {
        if (Threshold is not (> 0 and <= 1)) throw new ArgumentException($"xattention needs Threshold in (0, 1]; got {Threshold}");
        if (BlockSize % Stride != 0) throw new ArgumentException($"xattention needs Stride dividing BlockSize; got Stride={Stride}, BlockSize={BlockSize}");
    }

    private protected override void SelectHead(HeadSelection head)
    {
        int s = Stride, d = head.HeadDim, gd = s * d, bs = head.BlockSize;
        int qGroups = (head.QueryLength + s - 1) / s, kGroups = (head.KeyLength + s - 1) / s;
        float[] qg = Regroup(head.Queries, head.QueryLength, d, s, reverse: true);
        var kg = new PackedPanels(Regroup(head.Keys, head.KeyLength, d, s, reverse: false), kGroups, gd);
        int groupsPerBlock = bs / s;
        // Four query blocks per product: 4·B/s rows keep the key panel in cache long enough to run near the FMA peak.
        const int chunk = 4;
        var scores = new float[chunk * groupsPerBlock * kGroups];
        var blockMass = new float[head.KeyBlocks];
        float inv = 1f / s;
        for (int qb0 = 0; qb0 < head.QueryBlocks; qb0 += chunk)
        {
            int qb1 = Math.Min(qb0 + chunk, head.QueryBlocks);
            int g0 = qb0 * groupsPerBlock, g1 = Math.Min(qb1 * groupsPerBlock, qGroups), m = g1 - g0;
            int lastQuery = Math.Min(g1 * s, head.QueryLength) - 1;
            int n = Math.Min(kGroups, (head.VisibleKeys(lastQuery) + s - 1) / s);
            if (n == 0) continue;
            ScoreGemm.Multiply(qg.AsSpan(g0 * gd, m * gd), m, gd, kg, 0, n, scores);
            for (int qb = qb0; qb < qb1; qb++)
            {
                int visibleBlocks = head.VisibleKeyBlocks(qb);
                if (visibleBlocks == 0) continue;
                Array.Clear(blockMass);
                int r0 = (qb - qb0) * groupsPerBlock, r1 = Math.Min(r0 + groupsPerBlock, m);
                for (int r = r0; r < r1; r++)
                {
                    // A query group sees the key groups whose first key its last query may see.
                    int groupLast = Math.Min(((g0 + r) * s) + s, head.QueryLength) - 1;
                    int visible = Math.Min(n, (head.VisibleKeys(groupLast) + s - 1) / s);
                    Span<float> row = scores.AsSpan(r * n, visible);
                    for (int j = 0; j < visible; j++) row[j] *= inv;
                    SelectionMath.Softmax(row);
                    for (int j = 0; j < visible; j++) blockMass[j * s / bs] += row[j];
                }
                foreach (int kb in SelectionMath.CoverMass(blockMass.AsSpan(0, visibleBlocks), Threshold)) head.AddBlock(qb, kb);
                head.AddBlock(qb, 0);
                head.AddBlock(qb, visibleBlocks - 1);
            }
        }
    }

    /// <summary>Rows [length, d] → groups [ceil(length/s), s·d]; query groups take their tokens in reverse order; missing tokens are 0.</summary>
    private static float[] Regroup(float[] rows, int length, int d, int s, bool reverse)
    {
        int groups = (length + s - 1) / s;
        var g = new float[(long)groups * s * d];
        for (int t = 0; t < length; t++)
        {
            int group = t / s, within = t % s;
            int slot = reverse ? s - 1 - within : within;
            Array.Copy(rows, (long)t * d, g, ((long)group * s + slot) * d, d);
        }
        return g;
    }
}
