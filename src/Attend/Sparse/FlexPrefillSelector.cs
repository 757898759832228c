using System.Globalization;

namespace Attend.Sparse;

/// <summary>
/// FlexPrefill (Lai et al., ICLR 2025, arXiv:2502.20766): per head, the last query block is scored exactly against
/// every key. If the square-root Jensen–Shannon divergence between that estimate (summed per key block) and the
/// pooled estimate (mean last query · mean-pooled keys) is below <see cref="Tau"/>, the head is "query-aware": the
/// pooled block scores of every query block are trusted and blocks are taken, largest first over the whole head,
/// until they hold <see cref="Gamma"/> of the estimated mass. Otherwise the head is vertical-slash: the fewest key
/// columns and diagonals holding <see cref="Gamma"/> of the last block's mass set how many vertical block columns
/// and block diagonals to keep, within [<see cref="MinBudget"/>, <see cref="MaxBudget"/>] tokens. The first block
/// column and the block diagonal are always kept.
/// </summary>
public sealed class FlexPrefillSelector : SparsitySelector
{
    /// <summary>Cumulative attention to cover (paper: 0.9–0.95; default 0.95).</summary>
    public double Gamma { get; init; } = 0.95;

    /// <summary>Threshold on the square-root JS divergence below which a head is query-aware (paper: 0.1).</summary>
    public double Tau { get; init; } = 0.1;

    /// <summary>Fewest tokens of verticals and of slashes per head (default 1024, the paper's).</summary>
    public int MinBudget { get; init; } = 1024;

    /// <summary>Most tokens of verticals and of slashes per head (default: no limit).</summary>
    public int MaxBudget { get; init; } = int.MaxValue;

    /// <inheritdoc/>
    public override string Name => string.Create(CultureInfo.InvariantCulture, $"flexprefill(g={Gamma:0.###},t={Tau:0.###})");

    private protected override void Validate(int queryLength, int keyLength)
    {
        if (Gamma is not (> 0 and <= 1) || Tau < 0 || double.IsNaN(Tau) || MinBudget < 0 || MaxBudget < MinBudget)
        {
            throw new ArgumentException($"flexprefill needs Gamma in (0, 1], Tau ≥ 0 and 0 ≤ MinBudget ≤ MaxBudget; got Gamma={Gamma}, Tau={Tau}, MinBudget={MinBudget}, MaxBudget={MaxBudget}");
        }
    }

    internal override bool ReadsPackedKeys => true;

    private protected override void SelectHead(HeadSelection head)
    {
        int bs = head.BlockSize, kBlocks = head.KeyBlocks, d = head.HeadDim;
        (float[] vertical, float[] slash) = VerticalSlashSelector.LastRowsProfile(head, bs);
        int maxBlocks = (int)Math.Min(kBlocks, ((long)MaxBudget + bs - 1) / bs);
        int minBlocks = Math.Min((int)(((long)MinBudget + bs - 1) / bs), maxBlocks);
        int verticalBlocks = Math.Clamp((SelectionMath.CoverMass(vertical, Gamma).Length / bs) + 1, minBlocks, maxBlocks);
        int slashBlocks = Math.Clamp((SelectionMath.CoverMass(slash, Gamma).Length / bs) + 1, minBlocks, maxBlocks);
        float[] verticalPooled = SumPool(vertical, bs, kBlocks);
        float[] slashPooled = SumPool(slash, bs, kBlocks);

        // The pattern test: does the pooled estimate of the last block agree with its exact one?
        int rows = Math.Min(bs, head.QueryLength), first = head.QueryLength - rows;
        var meanQuery = new float[d];
        var lastRows = new float[rows * d];
        head.CopyQueryRows([.. Enumerable.Range(first, rows)], lastRows);
        for (int r = 0; r < rows; r++)
        {
            for (int c = 0; c < d; c++) meanQuery[c] += lastRows[(r * d) + c] / rows;
        }
        float[] pooledKeys = head.PooledKeys;
        var pooled = new float[kBlocks];
        for (int kb = 0; kb < kBlocks; kb++) pooled[kb] = Linear.Vectors.Dot(meanQuery, pooledKeys.AsSpan(kb * d, d));
        SelectionMath.Softmax(pooled);
        bool queryAware = SelectionMath.SqrtJensenShannon(pooled, verticalPooled) < Tau;

        if (queryAware)
        {
            verticalBlocks = slashBlocks = minBlocks;
            AddQueryAwareBlocks(head);
        }
        verticalPooled[0] = float.PositiveInfinity;
        slashPooled[0] = float.PositiveInfinity;
        int[] columns = SelectionMath.TopK(verticalPooled, Math.Max(verticalBlocks, 1));
        int[] diagonals = SelectionMath.TopK(slashPooled, Math.Max(slashBlocks, 1));
        for (int qb = 0; qb < head.QueryBlocks; qb++)
        {
            int diagonal = head.DiagonalBlock(qb);
            foreach (int kb in columns) head.AddBlock(qb, kb);
            foreach (int s in diagonals) head.AddBlock(qb, diagonal - s);
        }
    }

    /// <summary>Pooled scores of every query block, softmax per row, then the largest over the head until Gamma of the rows' total mass.</summary>
    private void AddQueryAwareBlocks(HeadSelection head)
    {
        float[] scores = PooledBlockSelector.PooledScores(head);
        int kBlocks = head.KeyBlocks;
        for (int qb = 0; qb < head.QueryBlocks; qb++)
        {
            int visible = head.VisibleKeyBlocks(qb);
            Span<float> row = scores.AsSpan(qb * kBlocks, kBlocks);
            row[visible..].Clear();
            if (visible == 0) continue;
            SelectionMath.Softmax(row[..visible]);
        }
        foreach (int flat in SelectionMath.CoverMass(scores, Gamma))
        {
            if (scores[flat] > 0) head.AddBlock(flat / kBlocks, flat % kBlocks);
        }
    }

    private static float[] SumPool(float[] x, int block, int blocks)
    {
        var pooled = new float[blocks];
        for (int i = 0; i < x.Length; i++) pooled[i / block] += x[i];
        return pooled;
    }
}
