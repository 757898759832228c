using System.Globalization;

namespace Attend.Sparse;

/// <summary>
/// AnchorAttention (Zhang et al., arXiv:2505.23520): difference-aware selection at stripe (key column) granularity.
/// Per query block, the anchor is the mean over its queries of the row maximum against the first key block and the
/// local (diagonal and preceding) blocks — where the largest scores almost always are. A key outside those blocks is
/// kept as a stripe when the block's mean query scores it within <see cref="Theta"/> (natural-log units) of the
/// anchor. The anchor blocks run as blocks, the stripes as gathered key tokens of a <see cref="Masks.TokenSet"/>.
/// Cost: (Sq/B)·Skv·D for the stripe estimate plus B·3B·D per block for the anchor.
/// </summary>
public sealed class AnchorSelector : SparsitySelector
{
    /// <summary>Margin below the anchor within which a key becomes a stripe (default 10: tuned on the generator at 8k, where 4 kept almost no stripes and 11 reached recall 0.99).</summary>
    public double Theta { get; init; } = 10;

    /// <inheritdoc/>
    public override string Name => string.Create(CultureInfo.InvariantCulture, $"anchor(theta={Theta:0.##})");

    private protected override void Validate(int queryLength, int keyLength)
    {
        if (!(Theta >= 0) || double.IsInfinity(Theta)) throw new ArgumentException($"anchor needs a finite Theta ≥ 0; got {Theta}");
    }

    private protected override void SelectHead(HeadSelection head)
    {
        int bs = head.BlockSize, d = head.HeadDim, n = head.KeyLength;
        float[] meanQueries = head.PoolRows(head.Queries, head.QueryLength);
        // Stripe scores a group of query blocks at a time, each group against the keys its last block can see (causal:
        // half the product of scoring every key; one reused buffer instead of a [blocks, Skv] array — 64 MB a head at
        // S = 32768).
        const int group = 16;
        int panel = head.PackedKeys.Width;
        float[] stripeScores = head.Scratch((long)group * n);
        var anchorScores = new float[2 * bs * bs];
        var firstScores = new float[bs * bs];
        var rowMaxBuffer = new float[bs];
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
            int q0 = qb * bs, rows = Math.Min(q0 + bs, head.QueryLength) - q0;
            // Row maxima over the first block and the local pair (diagonal − 1, diagonal), which are contiguous: two
            // products instead of three, and vector maxima (SelectionMath.Max keeps Math.Max's NaN rule).
            head.AddBlock(qb, 0);
            int local0 = Math.Max(diagonal - 1, 0);
            head.AddBlock(qb, local0);
            head.AddBlock(qb, diagonal);
            int localKeys = Math.Min((diagonal + 1) * bs, n) - (local0 * bs);
            if (local0 > 0) ScoreGemm.Multiply(head.Queries.AsSpan(q0 * d, rows * d), rows, d, head.PackedKeys, 0, bs, firstScores);
            ScoreGemm.Multiply(head.Queries.AsSpan(q0 * d, rows * d), rows, d, head.PackedKeys, local0 * bs, localKeys, anchorScores);
            Span<float> rowMax = rowMaxBuffer.AsSpan(0, rows);
            for (int r = 0; r < rows; r++)
            {
                int visible = head.VisibleKeys(q0 + r);
                float max = SelectionMath.Max(anchorScores.AsSpan(r * localKeys, Math.Clamp(visible - (local0 * bs), 0, localKeys)));
                if (local0 > 0) max = Math.Max(max, SelectionMath.Max(firstScores.AsSpan(r * bs, Math.Clamp(visible, 0, bs))));
                rowMax[r] = max;
            }
            double anchor = 0;
            int counted = 0;
            foreach (float m in rowMax)
            {
                if (float.IsFinite(m))
                {
                    anchor += m;
                    counted++;
                }
            }
            if (counted == 0) continue;
            float cut = (float)((anchor / counted) - Theta);
            int stripeEnd = Math.Max(diagonal - 1, 0) * bs;
            ReadOnlySpan<float> scores = stripeScores.AsSpan((qb - groupStart) * groupKeys, groupKeys);
            for (int j = bs; j < stripeEnd; j++)
            {
                if (scores[j] >= cut) head.AddToken(qb, j);
            }
        }
    }
}
