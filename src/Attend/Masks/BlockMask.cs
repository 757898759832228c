using System.Text;

namespace Attend.Masks;

/// <summary>
/// A block-sparse plan (FlexAttention's BlockMask, built analytically): for each (batch, head, query block) the
/// ascending list of key blocks to visit, each <see cref="BlockClass.Full"/> (no mask evaluation) or
/// <see cref="BlockClass.Partial"/> (the mask is evaluated per element). Stored as CSR. When the mask does not
/// depend on batch or head, one plan row set is shared (broadcast), so memory stays O(blocks of one head).
/// </summary>
public sealed class BlockMask : BlockRows
{
    private readonly int[] _columns;
    private readonly BlockClass[] _kinds;

    private BlockMask(MaskExtent extent, int blockQ, int blockK, int planBatch, int planHeads, int[] rowStart, int[] columns, BlockClass[] kinds, Mask? mask)
        : base(extent, blockQ, planBatch, planHeads, rowStart)
    {
        BlockK = blockK;
        _columns = columns;
        _kinds = kinds;
        Mask = mask;
    }

    /// <summary>Keys per block.</summary>
    public int BlockK { get; }

    /// <summary>A plan from CSR arrays built elsewhere (a GPU selector's plan brought back to the host); rows ascending, no Empty kinds.</summary>
    internal static BlockMask FromCsr(MaskExtent extent, int blockQ, int blockK, int planBatch, int planHeads, int[] rowStart, int[] columns, BlockClass[] kinds, Mask? mask) =>
        new(extent, blockQ, blockK, planBatch, planHeads, rowStart, columns, kinds, mask);

    /// <summary>The CSR arrays (row starts, key blocks, kinds) for backends that upload the plan (CUDA).</summary>
    internal (int[] RowStart, int[] Columns, BlockClass[] Kinds) Csr => (RowStart, _columns, _kinds);

    /// <summary>The element mask of Partial blocks (null for plans from <see cref="FromBlocks"/> without one).</summary>
    public Mask? Mask { get; }

    /// <summary>Key blocks per query block row when dense.</summary>
    public int KeyBlocks => (Extent.KeyLength + BlockK - 1) / BlockK;

    /// <summary>Stored (visited) blocks over all stored rows.</summary>
    public int VisitedBlocks => _columns.Length;

    /// <summary>Fraction of blocks skipped (FlexAttention's sparsity): 1 − visited / (query blocks × key blocks).</summary>
    public double Sparsity => 1.0 - (double)_columns.Length / ((long)PlanBatch * PlanHeads * QueryBlocks * KeyBlocks);

    /// <summary>
    /// Builds the plan of <paramref name="mask"/>: for each query block only the key ranges the mask can reach are
    /// classified, so built-in masks cost O(non-empty blocks), not O(Sq·Skv).
    /// </summary>
    public static BlockMask Create(Mask mask, int batch, int heads, int queryLength, int keyLength, int blockQ = 128, int blockK = 128)
    {
        ArgumentNullException.ThrowIfNull(mask);
        if (batch < 1 || heads < 1 || queryLength < 1 || keyLength < 1)
        {
            throw new ArgumentException($"BlockMask needs B, H, Sq, Skv ≥ 1; got B={batch}, H={heads}, Sq={queryLength}, Skv={keyLength}");
        }
        if (blockQ < 1 || blockK < 1) throw new ArgumentException($"block sizes must be ≥ 1; got {blockQ}×{blockK}", nameof(blockQ));
        var extent = new MaskExtent(batch, heads, queryLength, keyLength);
        int planBatch = mask.DependsOnBatch ? batch : 1, planHeads = mask.DependsOnHead ? heads : 1;
        int queryBlocks = (queryLength + blockQ - 1) / blockQ;
        var columns = new List<int>();
        var kinds = new List<BlockClass>();
        var ranges = new List<(int Start, int End)>();
        int[] rowStart = BuildRows(planBatch, planHeads, queryBlocks, columns, (b, h, qb, cols) =>
        {
            int q0 = qb * blockQ, q1 = Math.Min(q0 + blockQ, queryLength);
            ranges.Clear();
            mask.KeyRanges(extent, b, h, q0, q1, ranges);
            int last = -1;
            foreach ((int start, int end) in ranges)
            {
                for (int kb = Math.Max(start / blockK, last + 1); kb * blockK < end; kb++)
                {
                    BlockClass c = mask.Classify(extent, b, h, q0, q1, kb * blockK, Math.Min((kb + 1) * blockK, keyLength));
                    if (c != BlockClass.Empty)
                    {
                        cols.Add(kb);
                        kinds.Add(c);
                    }
                    last = kb;
                }
            }
        });
        return new BlockMask(extent, blockQ, blockK, planBatch, planHeads, rowStart, [.. columns], [.. kinds], mask);
    }

    /// <summary>
    /// A plan built elsewhere (a sparse selector): <paramref name="blocks"/> gives, for (batch, head, query block), the
    /// key blocks and whether each is Full or Partial. Partial blocks need <paramref name="mask"/> for their elements.
    /// </summary>
    public static BlockMask FromBlocks(int batch, int heads, int queryLength, int keyLength, int blockQ, int blockK,
        Func<int, int, int, IEnumerable<(int KeyBlock, BlockClass Kind)>> blocks, Mask? mask = null)
    {
        ArgumentNullException.ThrowIfNull(blocks);
        var extent = new MaskExtent(batch, heads, queryLength, keyLength);
        int queryBlocks = (queryLength + blockQ - 1) / blockQ, keyBlocks = (keyLength + blockK - 1) / blockK;
        var columns = new List<int>();
        var kinds = new List<BlockClass>();
        int[] rowStart = BuildRows(batch, heads, queryBlocks, columns, (b, h, qb, cols) =>
        {
            int first = cols.Count;
            foreach ((int kb, BlockClass kind) in blocks(b, h, qb).Where(x => x.Kind != BlockClass.Empty).OrderBy(x => x.KeyBlock))
            {
                if (kb < 0 || kb >= keyBlocks) throw new ArgumentException($"key block {kb} of (b={b}, h={h}, query block {qb}) is outside 0..{keyBlocks - 1}", nameof(blocks));
                if (kind == BlockClass.Partial && mask is null) throw new ArgumentException("Partial blocks need a mask for their elements", nameof(mask));
                if (cols.Count > first && cols[^1] == kb) continue;
                cols.Add(kb);
                kinds.Add(kind);
            }
        });
        return new BlockMask(extent, blockQ, blockK, batch, heads, rowStart, [.. columns], [.. kinds], mask);
    }

    /// <summary>The key blocks (ascending) and kinds that (batch, head, query block) visits.</summary>
    public ReadOnlySpan<int> Row(int batch, int head, int queryBlock, out ReadOnlySpan<BlockClass> kinds)
    {
        (int s, int e) = RowRange(batch, head, queryBlock);
        kinds = _kinds.AsSpan(s, e - s);
        return _columns.AsSpan(s, e - s);
    }

    /// <summary>Whether (q, kv) is computed by this plan: its block is visited and, if Partial, the mask allows it.</summary>
    public bool Allows(int batch, int head, int q, int kv)
    {
        ReadOnlySpan<int> cols = Row(batch, head, q / BlockQ, out ReadOnlySpan<BlockClass> kinds);
        int i = cols.BinarySearch(kv / BlockK);
        if (i < 0) return false;
        return kinds[i] == BlockClass.Full || (Mask?.Allows(Extent, batch, head, q, kv) ?? true);
    }

    /// <summary>The element-level [Sq, Skv] picture of one (batch, head). Debugging only: O(Sq·Skv) memory.</summary>
    public bool[,] ToDense(int batch = 0, int head = 0)
    {
        var dense = new bool[Extent.QueryLength, Extent.KeyLength];
        for (int q = 0; q < Extent.QueryLength; q++)
            for (int kv = 0; kv < Extent.KeyLength; kv++)
                dense[q, kv] = Allows(batch, head, q, kv);
        return dense;
    }

    /// <summary>ASCII picture of (batch 0, head 0): one character per block, '#' Full, '+' Partial, '.' skipped.</summary>
    public override string ToString() => ToString(0, 0, maxRows: 64, maxColumns: 128);

    /// <summary>ASCII picture of one (batch, head), at most the given number of block rows and columns.</summary>
    public string ToString(int batch, int head, int maxRows, int maxColumns)
    {
        var sb = new StringBuilder();
        sb.Append($"BlockMask {Extent.QueryLength}x{Extent.KeyLength}, blocks {BlockQ}x{BlockK}, sparsity {Sparsity:P1}").AppendLine();
        for (int qb = 0; qb < Math.Min(QueryBlocks, maxRows); qb++)
        {
            var line = new char[Math.Min(KeyBlocks, maxColumns)];
            Array.Fill(line, '.');
            ReadOnlySpan<int> cols = Row(batch, head, qb, out ReadOnlySpan<BlockClass> kinds);
            for (int i = 0; i < cols.Length; i++)
            {
                if (cols[i] < line.Length) line[cols[i]] = kinds[i] == BlockClass.Full ? '#' : '+';
            }
            sb.Append(line).AppendLine();
        }
        if (QueryBlocks > maxRows) sb.Append($"... {QueryBlocks - maxRows} more block rows").AppendLine();
        return sb.ToString();
    }
}
