namespace Attend.Masks;

/// <summary>
/// What <see cref="BlockMask"/> and <see cref="TokenSet"/> share: rows of a CSR plan, one per stored (batch, head,
/// query block), broadcast over batch and/or heads when only one of them is stored.
/// </summary>
public abstract class BlockRows
{
    private protected BlockRows(MaskExtent extent, int blockQ, int planBatch, int planHeads, int[] rowStart)
    {
        Extent = extent;
        BlockQ = blockQ;
        PlanBatch = planBatch;
        PlanHeads = planHeads;
        RowStart = rowStart;
    }

    /// <summary>B, H, Sq, Skv the plan was built for.</summary>
    public MaskExtent Extent { get; }

    /// <summary>Query rows per block.</summary>
    public int BlockQ { get; }

    /// <summary>Batch entries stored (1 when broadcast over batch).</summary>
    public int PlanBatch { get; }

    /// <summary>Heads stored (1 when broadcast over heads).</summary>
    public int PlanHeads { get; }

    /// <summary>Query blocks per (batch, head).</summary>
    public int QueryBlocks => (Extent.QueryLength + BlockQ - 1) / BlockQ;

    /// <summary>Per stored row, its first entry; one extra at the end.</summary>
    private protected int[] RowStart { get; }

    /// <summary>The [start, end) entry range of (batch, head, query block).</summary>
    private protected (int Start, int End) RowRange(int batch, int head, int queryBlock)
    {
        int b = PlanBatch == 1 ? 0 : batch, h = PlanHeads == 1 ? 0 : head;
        int r = ((b * PlanHeads) + h) * QueryBlocks + queryBlock;
        return (RowStart[r], RowStart[r + 1]);
    }

    /// <summary>Builds CSR rows by asking <paramref name="row"/> for every stored (batch, head, query block) in order.</summary>
    private protected static int[] BuildRows<TItem>(int planBatch, int planHeads, int queryBlocks, List<TItem> entries, Action<int, int, int, List<TItem>> row)
    {
        var rowStart = new int[planBatch * planHeads * queryBlocks + 1];
        int r = 0;
        for (int b = 0; b < planBatch; b++)
            for (int h = 0; h < planHeads; h++)
                for (int qb = 0; qb < queryBlocks; qb++)
                {
                    rowStart[r++] = entries.Count;
                    row(b, h, qb, entries);
                }
        rowStart[r] = entries.Count;
        return rowStart;
    }
}
