using System.Globalization;

namespace Attend.Sparse;

/// <summary>
/// AnchorAttention (Zhang et al., arXiv:2505.23520): difference-aware selection at stripe (key column) granularity.
/// Per query block, the anchor is the mean over its queries (every <see cref="AnchorRowStride"/>-th) of the row maximum
/// against the first key block and the local (diagonal and preceding) blocks — where the largest scores almost always are. A key outside those blocks is
/// kept as a stripe when the block's mean query scores it within <see cref="Theta"/> (natural-log units) of the
/// anchor. The anchor blocks run as blocks, the stripes as gathered key tokens of a <see cref="Masks.TokenSet"/>.
/// Cost: (Sq/B)·Skv·D for the stripe estimate plus (B/N)·3B·D per block for the anchor.
/// </summary>
public sealed class AnchorSelector : SparsitySelector
{
    /// <summary>
    /// Margin below the anchor within which a key becomes a stripe (default 12.5). At S 32768 on the generator (H 8,
    /// D 128) 12.5 is the smallest of the margins measured that keeps issue 3's bars (seeds 1/2/3: rel. L2
    /// 0.044/0.032/0.031, recall 0.974–0.980, 3.6–5.8× dense); 12 reached L2 0.054, and 10 (the default before session
    /// 13, tuned at 8k) runs 19.7× dense at L2 0.106 — its retrieval needles are found at half the rate (0.55 vs 0.81).
    /// </summary>
    public double Theta { get; init; } = 12.5;

    /// <summary>
    /// The anchor (a mean of row maxima) is estimated from every N-th query row of a block, ending at its last row
    /// (default 8; 1 is every row, as the paper, whose kernel gets the maxima free while it attends the anchor blocks).
    /// At S 32768 (generator, H 8, D 128) rows/8 halved the selection (323 → 188 ms) at the same plan quality
    /// (rel. L2 0.1052 → 0.1057, recall 0.934 → 0.933); rows/16 saved 13 ms more (session 12).
    /// </summary>
    public int AnchorRowStride
    {
        get => _anchorRowStride;
        init => _anchorRowStride = value >= 1 ? value : throw new ArgumentOutOfRangeException(nameof(AnchorRowStride), value, "AnchorRowStride needs ≥ 1");
    }

    private readonly int _anchorRowStride = 8;

    /// <inheritdoc/>
    public override string Name => string.Create(CultureInfo.InvariantCulture, $"anchor(theta={Theta:0.##},rows/{AnchorRowStride})");

    private protected override void Validate(int queryLength, int keyLength)
    {
        if (!(Theta >= 0) || double.IsInfinity(Theta)) throw new ArgumentException($"anchor needs a finite Theta ≥ 0; got {Theta}");
    }

    private protected override bool UsesPooledQueries => true;

    internal override bool ReadsPackedKeys => true;

    private protected override void SelectHead(HeadSelection head)
    {
        int bs = head.BlockSize, d = head.HeadDim, n = head.KeyLength;
        float[] meanQueries = head.PooledQueries;
        // Stripe scores a group of query blocks at a time, each group against the keys its last block can see (causal:
        // half the product of scoring every key; one reused buffer instead of a [blocks, Skv] array — 64 MB a head at
        // S = 32768).
        const int group = 16;
        int panel = head.PackedKeys.Width;
        float[] stripeScores = head.Scratch((long)group * n);
        var anchorScores = new float[2 * bs * bs];
        var firstScores = new float[bs * bs];
        var sampledRows = new int[bs];
        var sampledQueries = new float[bs * d];
        int groupStart = 0, groupKeys = 0;
        for (int qb = 0; qb < head.QueryBlocks; qb++)
        {
            if (qb == groupStart + group || qb == 0)
            {
                groupStart = qb;
                int last = Math.Min(qb + group, head.QueryBlocks) - 1;
                groupKeys = Math.Min(n, (head.VisibleKeyBlocks(last) * bs + panel - 1) / panel * panel);
                ScoreGemm.Multiply(meanQueries.AsSpan(qb * d, (last - qb + 1) * d), last - qb + 1, d, head.PackedKeys, 0, groupKeys, stripeScores);
            }
            int visibleBlocks = head.VisibleKeyBlocks(qb);
            if (visibleBlocks == 0) continue;
            int diagonal = visibleBlocks - 1;
            int q0 = qb * bs, blockRows = Math.Min(q0 + bs, head.QueryLength) - q0;
            // The anchor is a mean of row maxima, so every AnchorRowStride-th row (ending at the block's last row)
            // estimates it; those rows are gathered contiguously for the products.
            int rows = 0;
            for (int r = (blockRows - 1) % AnchorRowStride; r < blockRows; r += AnchorRowStride) sampledRows[rows++] = q0 + r;
            Span<float> anchorQueries = sampledQueries.AsSpan(0, rows * d);
            head.CopyQueryRows(sampledRows.AsSpan(0, rows), anchorQueries);
            // Row maxima over the first block and the local pair (diagonal − 1, diagonal), which are contiguous: two
            // products instead of three, and vector maxima (SelectionMath.Max keeps Math.Max's NaN rule).
            head.AddBlock(qb, 0);
            int local0 = Math.Max(diagonal - 1, 0);
            head.AddBlock(qb, local0);
            head.AddBlock(qb, diagonal);
            int localKeys = Math.Min((diagonal + 1) * bs, n) - (local0 * bs);
            if (local0 > 0) ScoreGemm.Multiply(anchorQueries, rows, d, head.PackedKeys, 0, bs, firstScores);
            ScoreGemm.Multiply(anchorQueries, rows, d, head.PackedKeys, local0 * bs, localKeys, anchorScores);
            double anchor = 0;
            int counted = 0;
            for (int i = 0; i < rows; i++)
            {
                int visible = head.VisibleKeys(sampledRows[i]);
                float max = SelectionMath.Max(anchorScores.AsSpan(i * localKeys, Math.Clamp(visible - (local0 * bs), 0, localKeys)));
                if (local0 > 0) max = Math.Max(max, SelectionMath.Max(firstScores.AsSpan(i * bs, Math.Clamp(visible, 0, bs))));
                if (float.IsFinite(max))
                {
                    anchor += max;
                    counted++;
                }
            }
            if (counted == 0) continue;
            float cut = (float)((anchor / counted) - Theta);
            int stripeEnd = Math.Max(diagonal - 1, 0) * bs;
            if (stripeEnd > bs) head.AddTokensAtLeast(qb, stripeScores.AsSpan(((qb - groupStart) * groupKeys) + bs, stripeEnd - bs), bs, cut);
        }
    }
}
