using Attend.Masks;

namespace Attend.Cuda;

/// <summary>
/// A block-sparse plan in device memory: the CSR rows (per batch, head, query block: ascending key blocks, each Full or
/// Partial) that the attention kernel walks, and optionally gathered key tokens per row (a device
/// <see cref="TokenSet"/>: the vertical lines of a vertical-slash plan). Built on the device by a GPU selector
/// (<see cref="CudaSelectors"/>) or uploaded from a host <see cref="BlockMask"/>; run with
/// <c>CudaAttention.Forward(q, k, v, output, plan, options)</c>. The plan carries its causality (its Partial blocks
/// evaluate <see cref="Mask"/>, its tokens <see cref="TokenMask"/>); <see cref="AttentionOptions.Causal"/> is not
/// applied on top of it.
/// </summary>
public sealed class DeviceBlockPlan : IDisposable
{
    private static readonly System.Runtime.CompilerServices.ConditionalWeakTable<BlockMask, DeviceBlockPlan> Uploaded = new();

    internal DeviceBlockPlan(MaskExtent extent, int blockQ, int blockK, int planBatch, int planHeads,
        DeviceBuffer<int> rowStart, DeviceBuffer<int> columns, DeviceBuffer<byte> kinds, long visitedBlocks, Mask? mask,
        DeviceBuffer<int>? tokenRowStart = null, DeviceBuffer<int>? tokens = null, long tokenCount = 0, Mask? tokenMask = null)
    {
        TokenRowStart = tokenRowStart;
        Tokens = tokens;
        TokenCount = tokenCount;
        TokenMask = tokenMask;
        Extent = extent;
        BlockQ = blockQ;
        BlockK = blockK;
        PlanBatch = planBatch;
        PlanHeads = planHeads;
        RowStart = rowStart;
        Columns = columns;
        Kinds = kinds;
        VisitedBlocks = visitedBlocks;
        Mask = mask;
    }

    /// <summary>The (batch, heads, query length, key length) the plan was built for.</summary>
    public MaskExtent Extent { get; }

    /// <summary>Queries per block row.</summary>
    public int BlockQ { get; }

    /// <summary>Keys per block.</summary>
    public int BlockK { get; }

    /// <summary>Batch entries stored (1: broadcast over the batch).</summary>
    public int PlanBatch { get; }

    /// <summary>Heads stored (1: broadcast over the heads).</summary>
    public int PlanHeads { get; }

    /// <summary>Query blocks per (batch, head).</summary>
    public int QueryBlocks => (Extent.QueryLength + BlockQ - 1) / BlockQ;

    /// <summary>Key blocks per row when dense.</summary>
    public int KeyBlocks => (Extent.KeyLength + BlockK - 1) / BlockK;

    /// <summary>Visited blocks over all stored rows.</summary>
    public long VisitedBlocks { get; }

    /// <summary>
    /// Visited blocks over all blocks of the stored rows (1 − FlexAttention's sparsity); gathered tokens count as
    /// tokens / <see cref="BlockK"/> blocks.
    /// </summary>
    public double Density => (VisitedBlocks + ((double)TokenCount / BlockK)) / ((long)PlanBatch * PlanHeads * QueryBlocks * KeyBlocks);

    /// <summary>Gathered key tokens over all stored rows (outside each row's visited blocks); 0 for a block-only plan.</summary>
    public long TokenCount { get; }

    /// <summary>The element mask of the gathered tokens (causal for causal selector plans; null: none).</summary>
    public Mask? TokenMask { get; }

    /// <summary>Whether the plan carries gathered tokens (rows of <see cref="BlockQ"/> queries, like its blocks).</summary>
    public bool HasTokens => Tokens is not null;

    internal DeviceBuffer<int>? TokenRowStart { get; }

    internal DeviceBuffer<int>? Tokens { get; }

    /// <summary>The element mask of Partial blocks (the causal mask for causal selector plans; null: none).</summary>
    public Mask? Mask { get; }

    internal DeviceBuffer<int> RowStart { get; }

    internal DeviceBuffer<int> Columns { get; }

    internal DeviceBuffer<byte> Kinds { get; }

    /// <summary>Uploads a host plan (a new device copy, owned by the caller).</summary>
    public static DeviceBlockPlan Upload(BlockMask plan)
    {
        ArgumentNullException.ThrowIfNull(plan);
        (int[] rowStart, int[] columns, BlockClass[] kinds) = plan.Csr;
        return Create(plan.Extent, plan.BlockQ, plan.BlockK, plan.PlanBatch, plan.PlanHeads, rowStart, columns, [.. kinds.Select(k => (byte)k)], plan.Mask);
    }

    /// <summary>The device copy of a caller's host plan, uploaded once per plan object and kept with it.</summary>
    internal static DeviceBlockPlan For(BlockMask plan) => Uploaded.GetValue(plan, Upload);

    /// <summary>No blocks in any row: the block walk of a token-only plan.</summary>
    internal static DeviceBlockPlan Empty(TokenSet tokens) =>
        Create(tokens.Extent, tokens.BlockQ, tokens.BlockQ, tokens.PlanBatch, tokens.PlanHeads, new int[(tokens.PlanBatch * tokens.PlanHeads * tokens.QueryBlocks) + 1], [], [], null);

    /// <summary>
    /// A plan of gathered tokens only (CSR rows <paramref name="tokenRowStart"/> over <paramref name="tokens"/>, no
    /// element mask), uploaded: no blocks in any row.
    /// </summary>
    internal static DeviceBlockPlan TokensOnly(MaskExtent extent, int blockQ, int blockK, int planBatch, int planHeads, int[] tokenRowStart, int[] tokens)
    {
        DeviceBlockPlan empty = Create(extent, blockQ, blockK, planBatch, planHeads, new int[tokenRowStart.Length], [], [], null);
        DeviceBuffer<int> starts = DeviceBuffer<int>.Allocate(tokenRowStart.Length);
        starts.CopyFrom(tokenRowStart);
        DeviceBuffer<int> gathered = DeviceBuffer<int>.Allocate(Math.Max(tokens.Length, 1));
        if (tokens.Length > 0) gathered.CopyFrom(tokens);
        return new DeviceBlockPlan(extent, blockQ, blockK, planBatch, planHeads, empty.RowStart, empty.Columns, empty.Kinds, 0, null, starts, gathered, tokens.Length, null);
    }

    private static DeviceBlockPlan Create(MaskExtent extent, int blockQ, int blockK, int planBatch, int planHeads, int[] rowStart, int[] columns, byte[] kinds, Mask? mask)
    {
        DeviceBuffer<int> starts = DeviceBuffer<int>.Allocate(rowStart.Length);
        starts.CopyFrom(rowStart);
        DeviceBuffer<int> cols = DeviceBuffer<int>.Allocate(Math.Max(columns.Length, 1));
        if (columns.Length > 0) cols.CopyFrom(columns);
        DeviceBuffer<byte> kindBuffer = DeviceBuffer<byte>.Allocate(Math.Max(kinds.Length, 1));
        if (kinds.Length > 0) kindBuffer.CopyFrom(kinds);
        return new DeviceBlockPlan(extent, blockQ, blockK, planBatch, planHeads, starts, cols, kindBuffer, columns.Length, mask);
    }

    /// <summary>The block part of the plan on the host (downloads it): to run it on the CPU executor or inspect it.</summary>
    public BlockMask ToHost()
    {
        var rowStart = new int[((long)PlanBatch * PlanHeads * QueryBlocks) + 1];
        RowStart.CopyTo(rowStart);
        var columns = new int[VisitedBlocks];
        var kinds = new byte[VisitedBlocks];
        Columns.CopyTo(columns);
        Kinds.CopyTo(kinds);
        return BlockMask.FromCsr(Extent, BlockQ, BlockK, PlanBatch, PlanHeads, rowStart, columns, [.. kinds.Select(k => (BlockClass)k)], Mask);
    }

    /// <summary>The whole plan on the host — blocks and gathered tokens (downloads it).</summary>
    public SparsityPlan ToHostPlan()
    {
        BlockMask blocks = ToHost();
        if (Tokens is null) return new SparsityPlan(blocks);
        var rowStart = new int[((long)PlanBatch * PlanHeads * QueryBlocks) + 1];
        TokenRowStart!.CopyTo(rowStart);
        var tokens = new int[TokenCount];
        Tokens.CopyTo(tokens);
        int heads = PlanHeads, queryBlocks = QueryBlocks;
        TokenSet set = TokenSet.Create(PlanBatch, PlanHeads, Extent.QueryLength, Extent.KeyLength, BlockQ, (b, h, qb) =>
        {
            int row = ((b * heads) + h) * queryBlocks + qb;
            return new ArraySegment<int>(tokens, rowStart[row], rowStart[row + 1] - rowStart[row]);
        }, TokenMask);
        return new SparsityPlan(blocks, set);
    }

    /// <summary>Throws unless the plan fits attention over <paramref name="shape"/>.</summary>
    internal void RequireFits(AttentionShape shape)
    {
        if (Extent.QueryLength != shape.QueryLength || Extent.KeyLength != shape.KeyLength
            || (PlanBatch != 1 && PlanBatch != shape.Batch) || (PlanHeads != 1 && PlanHeads != shape.Heads))
        {
            throw new ArgumentException(
                $"plan was built for B={PlanBatch}, H={PlanHeads}, Sq={Extent.QueryLength}, Skv={Extent.KeyLength}; the call has B={shape.Batch}, H={shape.Heads}, Sq={shape.QueryLength}, Skv={shape.KeyLength} (plan B and H may also be 1: broadcast)",
                "plan");
        }
    }

    /// <inheritdoc/>
    public void Dispose()
    {
        RowStart.Dispose();
        Columns.Dispose();
        Kinds.Dispose();
        TokenRowStart?.Dispose();
        Tokens?.Dispose();
    }
}
