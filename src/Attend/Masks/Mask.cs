namespace Attend.Masks;

/// <summary>The sizes a mask is evaluated against: batch, heads, query and key lengths.</summary>
/// <param name="Batch">B.</param>
/// <param name="Heads">H (query heads).</param>
/// <param name="QueryLength">Sq.</param>
/// <param name="KeyLength">Skv.</param>
public readonly record struct MaskExtent(int Batch, int Heads, int QueryLength, int KeyLength)
{
    /// <summary>Skv − Sq: the bottom-right alignment offset of causal masks (query i sees keys j ≤ i + offset).</summary>
    public long CausalOffset => (long)KeyLength - QueryLength;
}

/// <summary>How a block of (query, key) pairs relates to a mask.</summary>
public enum BlockClass
{
    /// <summary>No pair allowed: the block is skipped.</summary>
    Empty,
    /// <summary>Every pair allowed: computed without evaluating the mask.</summary>
    Full,
    /// <summary>Some pairs allowed: computed with the mask evaluated per element.</summary>
    Partial,
}

/// <summary>
/// Which (query, key) pairs attention computes, as an analyzable expression (FlexAttention's mask_mod, made
/// classifiable): <see cref="Allows"/> answers per pair, <see cref="Classify"/> per block (analytic for built-ins,
/// so a block plan costs O(blocks), not O(pairs)), <see cref="ToCuda"/> gives the C expression for GPU kernels.
/// Compose with <c>&amp;</c>, <c>|</c> and <c>!</c>.
/// </summary>
public abstract class Mask
{
    /// <summary>True when query <paramref name="q"/> of (batch, head) may attend key <paramref name="kv"/>.</summary>
    public abstract bool Allows(in MaskExtent extent, int batch, int head, int q, int kv);

    /// <summary>
    /// Classifies the block of queries [q0, q1) × keys [k0, k1). The default evaluates every pair (O(block area));
    /// built-ins override it with O(1) reasoning. A conservative <see cref="BlockClass.Partial"/> is always correct.
    /// </summary>
    public virtual BlockClass Classify(in MaskExtent extent, int batch, int head, int q0, int q1, int k0, int k1)
    {
        bool any = false, all = true;
        for (int q = q0; q < q1; q++)
            for (int kv = k0; kv < k1; kv++)
            {
                if (Allows(extent, batch, head, q, kv)) any = true;
                else all = false;
                if (any && !all) return BlockClass.Partial;
            }
        return any ? BlockClass.Full : BlockClass.Empty;
    }

    /// <summary>
    /// A superset of the keys that queries [q0, q1) may attend, as one key range [start, end): lets plans skip whole
    /// spans of key blocks without classifying them. The default is every key.
    /// </summary>
    public virtual (int Start, int End) KeyBounds(in MaskExtent extent, int batch, int head, int q0, int q1) => (0, extent.KeyLength);

    /// <summary>
    /// Like <see cref="KeyBounds"/> but as sorted, disjoint key ranges (a union such as sink | window keeps its
    /// gap), appended to <paramref name="ranges"/>. Plans walk only these ranges: O(non-empty blocks).
    /// </summary>
    public virtual void KeyRanges(in MaskExtent extent, int batch, int head, int q0, int q1, List<(int Start, int End)> ranges)
    {
        ArgumentNullException.ThrowIfNull(ranges);
        (int s, int e) = KeyBounds(extent, batch, head, q0, q1);
        if (e > s) ranges.Add((s, e));
    }

    /// <summary>
    /// When the keys query <paramref name="q"/> may attend within [k0, k1) form one interval [start, end), returns
    /// true with it (start = end: none). Lets executors mask a partial block row with two fills instead of one call
    /// per element. The default returns false (no interval form).
    /// </summary>
    public virtual bool TryRowInterval(in MaskExtent extent, int batch, int head, int q, int k0, int k1, out int start, out int end)
    {
        start = end = 0;
        return false;
    }

    /// <summary>
    /// The allowed keys of row <paramref name="q"/> inside [k0, k1) as ascending disjoint runs written to
    /// <paramref name="runs"/> (count returned), or −1 when the mask has no run form there (the executor then
    /// evaluates <see cref="Allows"/> per element). The default uses <see cref="TryRowInterval"/>; masks whose rows
    /// are a few runs (neighborhoods over a grid) override it.
    /// </summary>
    public virtual int RowRuns(in MaskExtent extent, int batch, int head, int q, int k0, int k1, Span<(int Start, int End)> runs)
    {
        if (!TryRowInterval(extent, batch, head, q, k0, k1, out int start, out int end)) return -1;
        if (start >= end) return 0;
        runs[0] = (start, end);
        return 1;
    }

    /// <summary>A C boolean expression over <c>int b, h, q, kv</c> with the mask's constants inlined, for CUDA kernels.</summary>
    /// <exception cref="NotSupportedException">for masks that exist only on the CPU (predicates).</exception>
    public abstract string ToCuda(in MaskExtent extent);

    /// <summary>
    /// Data the mask's CUDA expression reads as <c>p.mask_data[i]</c> (uploaded once per mask object by the CUDA
    /// backend), or null. Only a plan's top-level mask may carry data.
    /// </summary>
    internal virtual int[]? CudaData => null;

    /// <summary>True when the mask differs between batch entries (plans are then built per batch entry).</summary>
    public virtual bool DependsOnBatch => false;

    /// <summary>True when the mask differs between heads (plans are then built per head).</summary>
    public virtual bool DependsOnHead => false;

    /// <summary>Pairs both masks allow.</summary>
    public static Mask operator &(Mask left, Mask right) => new AndMask(left, right);

    /// <summary>Pairs either mask allows.</summary>
    public static Mask operator |(Mask left, Mask right) => new OrMask(left, right);

    /// <summary>Pairs the mask excludes.</summary>
    public static Mask operator !(Mask mask) => new NotMask(mask);

    /// <summary>Same as <c>&amp;</c>.</summary>
    public static Mask BitwiseAnd(Mask left, Mask right) => left & right;

    /// <summary>Same as <c>|</c>.</summary>
    public static Mask BitwiseOr(Mask left, Mask right) => left | right;

    /// <summary>Same as <c>!</c>.</summary>
    public static Mask LogicalNot(Mask mask) => !mask;

    /// <summary>Every pair (dense attention).</summary>
    public static Mask Full { get; } = new FullMask();

    /// <summary>Causal, aligned bottom-right: query i sees key j when j ≤ i + Skv − Sq (FlashAttention ≥ 2.1).</summary>
    public static Mask Causal { get; } = new CausalMask();

    /// <summary>
    /// Query i sees keys j with −<paramref name="right"/> ≤ (i + Skv − Sq) − j ≤ <paramref name="left"/>
    /// (FlashAttention's window_size=(left, right), bottom-right aligned). Combine with <see cref="Causal"/> or use right = 0.
    /// </summary>
    public static Mask SlidingWindow(int left, int right = 0) => new WindowMask(left, right);

    /// <summary>The first <paramref name="tokens"/> keys (attention sinks, StreamingLLM arXiv:2309.17453): <c>Sink(64) | SlidingWindow(w)</c> is the "A-shape".</summary>
    public static Mask Sink(int tokens) => new SinkMask(tokens);

    /// <summary>Packed sequences: a query sees keys of the same document (ids per token, one array for queries and keys when Sq = Skv).</summary>
    public static Mask Document(int[] queryDocuments, int[]? keyDocuments = null) => new DocumentMask(queryDocuments, keyDocuments ?? queryDocuments);

    /// <summary>Prefix-LM: keys of the first <paramref name="prefix"/> tokens are visible to every query (combine with <see cref="Causal"/> by |).</summary>
    public static Mask Prefix(int prefix) => new SinkMask(prefix);

    /// <summary>
    /// Neighborhood attention (NATTEN) over a row-major grid of tokens: per axis kernel size (odd unless causal),
    /// dilation, causality and stride (groups of <c>stride</c> queries share their leader's window; 1 ≤ stride ≤
    /// kernel); windows near borders shift inside the grid. Sq = Skv = product of the grid.
    /// </summary>
    public static Mask Neighborhood(int[] grid, int[] kernel, int[]? dilation = null, bool[]? causal = null, int[]? stride = null) =>
        new NeighborhoodMask(grid, kernel, dilation, causal, stride);

    /// <summary>1-D dilated causal window: keys i + Skv − Sq − t·<paramref name="dilation"/> for t &lt; <paramref name="window"/>.</summary>
    public static Mask DilatedWindow(int window, int dilation) => new DilatedWindowMask(window, dilation);

    /// <summary>
    /// Block-causal (blockwise causal, as in the Long-Context Attention Benchmark's "causal blockwise" pattern): query
    /// i sees all keys of its own block of <paramref name="blockSize"/> and of every earlier block (bottom-right aligned).
    /// </summary>
    public static Mask BlockCausal(int blockSize) => new BlockCausalMask(blockSize);

    /// <summary>LongLoRA shifted groups (arXiv:2309.12307): groups of <paramref name="groupSize"/> tokens, the second half of the heads shifted by half a group.</summary>
    public static Mask ShiftedGroups(int groupSize) => new ShiftedGroupsMask(groupSize);

    /// <summary>S2-Attention / DKernel local-stride shards (arXiv:2407.17678): per head, the last <paramref name="localBlocks"/> blocks plus every <paramref name="vertStride"/>-th block, phase shifted by head; causal.</summary>
    public static Mask StridedShards(int blockSize, int localBlocks, int vertStride) => new StridedShardsMask(blockSize, localBlocks, vertStride);

    /// <summary>MoA per-head causal windows (arXiv:2406.14909): head h sees its last <c>windows[h]</c> keys.</summary>
    public static Mask HeadWindows(params int[] windows) => new PerHeadWindowMask(windows);

    /// <summary>LongHeads per-head chunk lists (arXiv:2402.10685): head h attends the key chunks <c>chunks[h]</c>.</summary>
    public static Mask HeadChunks(int chunkSize, int[][] chunks) => new HeadChunksMask(chunkSize, chunks);

    /// <summary>Global tokens as rows and columns: the positions see every key and every query sees them.</summary>
    public static Mask GlobalTokens(params int[] positions) => new GlobalTokensMask(positions, rows: true, columns: true);

    /// <summary>Global rows only: the listed queries see every key (BlockRank's designated rows: <c>Document(segments) | GlobalRows(rows)</c>).</summary>
    public static Mask GlobalRows(params int[] positions) => new GlobalTokensMask(positions, rows: true, columns: false);

    /// <summary>Global columns only: every query sees the listed keys.</summary>
    public static Mask GlobalColumns(params int[] positions) => new GlobalTokensMask(positions, rows: false, columns: true);

    /// <summary>BlockRank-style block-diagonal segments, plus designated query rows that see all.</summary>
    public static Mask BlockDiagonal(int[] segments, params int[] allSeeingRows) => Document(segments) | GlobalRows(allSeeingRows);

    /// <summary>A list of rectangles [q0, q1) × [k0, k1) of allowed pairs (ART-style region lists).</summary>
    public static Mask Regions(IEnumerable<(int QueryStart, int QueryEnd, int KeyStart, int KeyEnd)> regions) => new RegionsMask(regions);

    /// <summary>An arbitrary per-pair function (CPU only; blocks are classified by evaluating them: O(Sq·Skv)).</summary>
    public static Mask FromPredicate(MaskPredicate predicate, bool dependsOnBatch = true, bool dependsOnHead = true) =>
        new PredicateMask(predicate, dependsOnBatch, dependsOnHead);
}
