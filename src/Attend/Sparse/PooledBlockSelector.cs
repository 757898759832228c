using System.Globalization;

namespace Attend.Sparse;

/// <summary>How many estimated blocks of a query-block row a selector keeps.</summary>
public abstract record BlockBudget
{
    private protected BlockBudget() { }

    /// <summary>The <paramref name="blocks"/> highest-scoring key blocks (MInference block-sparse, DraftAttention).</summary>
    public static BlockBudget TopK(int blocks) =>
        blocks >= 1 ? new TopKBudget(blocks) : throw new ArgumentOutOfRangeException(nameof(blocks), blocks, "TopK needs ≥ 1 block");

    /// <summary>The fewest highest-scoring blocks holding <paramref name="mass"/> of the estimated softmax mass (SVG2's top-p).</summary>
    public static BlockBudget TopP(double mass) =>
        mass is > 0 and <= 1 ? new TopPBudget(mass) : throw new ArgumentOutOfRangeException(nameof(mass), mass, "TopP needs a mass in (0, 1]");

    /// <summary>Every block whose estimated probability is ≥ <paramref name="probability"/> (Video-BLADE-style adaptive threshold).</summary>
    public static BlockBudget Threshold(double probability) =>
        probability is >= 0 and < 1 ? new ThresholdBudget(probability) : throw new ArgumentOutOfRangeException(nameof(probability), probability, "Threshold needs a probability in [0, 1)");

    /// <summary>The chosen entries of one row of estimated probabilities (summing to 1).</summary>
    internal abstract int[] Select(ReadOnlySpan<float> probabilities);

    /// <summary>The budget as the GPU selector takes it: kind 0 top-k, 1 top-p, 2 threshold, and its value.</summary>
    internal abstract (int Kind, double Value) Device { get; }

    private sealed record TopKBudget(int Blocks) : BlockBudget
    {
        internal override int[] Select(ReadOnlySpan<float> p) => SelectionMath.TopK(p, Blocks);
        internal override (int Kind, double Value) Device => (0, Blocks);
        public override string ToString() => $"top{Blocks}";
    }

    private sealed record TopPBudget(double Mass) : BlockBudget
    {
        internal override int[] Select(ReadOnlySpan<float> p) => SelectionMath.CoverMass(p, Mass);
        internal override (int Kind, double Value) Device => (1, Mass);
        public override string ToString() => string.Create(CultureInfo.InvariantCulture, $"p{Mass:0.###}");
    }

    private sealed record ThresholdBudget(double Probability) : BlockBudget
    {
        internal override (int Kind, double Value) Device => (2, Probability);

        internal override int[] Select(ReadOnlySpan<float> p)
        {
            var picked = new List<int>();
            for (int i = 0; i < p.Length; i++)
            {
                if (p[i] >= Probability) picked.Add(i);
            }
            return [.. picked];
        }

        public override string ToString() => string.Create(CultureInfo.InvariantCulture, $"t{Probability:0.####}");
    }
}

/// <summary>
/// Pooled block estimate: mean-pool queries and keys per block, score every (query block, key block) pair with one
/// small product, softmax per query-block row, keep blocks by <see cref="Budget"/>. The estimate of MInference's
/// block-sparse pattern (Jiang et al., arXiv:2407.02490), DraftAttention's low-resolution draft (arXiv:2505.14708),
/// Video-BLADE's adaptive block-sparse attention and SVG2's top-p budget (arXiv:2505.18875). Cost O((n/B)²·D).
/// </summary>
public sealed class PooledBlockSelector : SparsitySelector
{
    /// <summary>Which blocks to keep per row (default: top-p 0.95 of the estimated mass).</summary>
    public BlockBudget Budget { get; init; } = BlockBudget.TopP(0.95);

    /// <summary>Always keep the first key block (attention sink) and the diagonal block (local context); default true.</summary>
    public bool KeepSinkAndDiagonal { get; init; } = true;

    /// <inheritdoc/>
    public override string Name => $"pooled({Budget})";

    private protected override bool UsesPooledQueries => true;

    private protected override void SelectHead(HeadSelection head)
    {
        float[] scores = PooledScores(head);
        int kBlocks = head.KeyBlocks;
        for (int qb = 0; qb < head.QueryBlocks; qb++)
        {
            int visible = head.VisibleKeyBlocks(qb);
            if (visible == 0) continue;
            Span<float> row = scores.AsSpan(qb * kBlocks, visible);
            SelectionMath.Softmax(row);
            foreach (int kb in Budget.Select(row)) head.AddBlock(qb, kb);
            if (KeepSinkAndDiagonal)
            {
                head.AddBlock(qb, 0);
                head.AddBlock(qb, visible - 1);
            }
        }
    }

    /// <summary>Scores [query blocks, key blocks] of mean-pooled (scaled) queries against mean-pooled keys.</summary>
    internal static float[] PooledScores(HeadSelection head)
    {
        float[] pq = head.PooledQueries;
        float[] pk = head.PooledKeys;
        int kBlocks = head.KeyBlocks;
        var scores = new float[head.QueryBlocks * kBlocks];
        ScoreGemm.Multiply(pq, head.QueryBlocks, head.HeadDim, new PackedPanels(pk, kBlocks, head.HeadDim), 0, kBlocks, scores);
        return scores;
    }
}
