namespace Attend.Cpu;

/// <summary>How the executor treats one key block of a query block.</summary>
internal enum BlockKind : byte
{
    /// <summary>Every pair allowed: no mask evaluation.</summary>
    Full,
    /// <summary>Some pairs excluded: <see cref="IBlockPlan.ApplyMask"/> runs on the block's scores.</summary>
    Partial,
}

/// <summary>
/// Which key blocks each query block visits, and the element mask of the partial ones. The CPU executor walks
/// this list with online softmax; dense attention is "every block, all Full". (The block-sparse issue generalizes
/// this into BlockMask/TokenSet plans; the executor does not change.)
/// </summary>
internal unsafe interface IBlockPlan
{
    /// <summary>
    /// Writes the ascending key-block indices (blocks of <see cref="FlashAttentionCpu.BlockKv"/> keys) that query rows
    /// [qStart, qEnd) of (batch, head) visit, with their kinds; returns how many. Spans hold every block of the row.
    /// </summary>
    int KeyBlocks(int batch, int head, int qStart, int qEnd, Span<int> blocks, Span<BlockKind> kinds);

    /// <summary>Sets to −∞ the scores of excluded pairs in a block: rows [q0, q0+rows), keys [kv0, kv0+cols), row stride ld.</summary>
    void ApplyMask(int batch, int head, int q0, int rows, int kv0, int cols, float* scores, int ld);

    /// <summary>Writes the sorted key tokens the query block gathers beyond its blocks; returns how many (0: none).</summary>
    int GatherTokens(int batch, int head, int qStart, Span<int> tokens) => 0;

    /// <summary>Sets to −∞ the excluded pairs among gathered tokens: rows [q0, q0+rows), keys <paramref name="keys"/>.</summary>
    void ApplyTokenMask(int batch, int head, int q0, int rows, ReadOnlySpan<int> keys, float* scores, int ld)
    {
    }
}

/// <summary>The plan of <see cref="AttentionOptions"/>: dense, causal (bottom-right), and/or an element predicate.</summary>
internal sealed unsafe class OptionsPlan(AttentionShape shape, bool causal, MaskPredicate? predicate) : IBlockPlan
{
    private readonly long _offset = (long)shape.KeyLength - shape.QueryLength;
    private readonly int _keyBlocks = (shape.KeyLength + FlashAttentionCpu.BlockKv - 1) / FlashAttentionCpu.BlockKv;

    public int KeyBlocks(int batch, int head, int qStart, int qEnd, Span<int> blocks, Span<BlockKind> kinds)
    {
        int count = 0;
        for (int kb = 0; kb < _keyBlocks; kb++)
        {
            long kv0 = (long)kb * FlashAttentionCpu.BlockKv;
            long kvLast = Math.Min(kv0 + FlashAttentionCpu.BlockKv, shape.KeyLength) - 1;
            BlockKind kind = BlockKind.Full;
            if (causal)
            {
                if (kv0 > qEnd - 1 + _offset) break;            // above the diagonal for every row: skipped
                if (kvLast > qStart + _offset) kind = BlockKind.Partial;
            }
            if (predicate is not null) kind = BlockKind.Partial;
            blocks[count] = kb;
            kinds[count] = kind;
            count++;
        }
        return count;
    }

    public void ApplyMask(int batch, int head, int q0, int rows, int kv0, int cols, float* scores, int ld)
    {
        for (int r = 0; r < rows; r++)
        {
            float* row = scores + (long)r * ld;
            int q = q0 + r;
            int first = 0;
            if (causal)
            {
                long limit = q + _offset - kv0 + 1;           // keys kv0 + [0, limit) are allowed
                first = (int)Math.Clamp(limit, 0, cols);
                for (int c = first; c < cols; c++) row[c] = float.NegativeInfinity;
            }
            if (predicate is not null)
            {
                for (int c = 0; c < (causal ? first : cols); c++)
                {
                    if (!predicate(batch, head, q, kv0 + c)) row[c] = float.NegativeInfinity;
                }
            }
        }
    }
}

/// <summary>
/// A <see cref="Masks.SparsityPlan"/> as the executor's plan: each BlockMask key block expands into BlockK / 64
/// executor key blocks of the same kind (Partial blocks evaluate the mask per element); TokenSet tokens outside the
/// visited blocks are gathered.
/// </summary>
internal sealed unsafe class SparsityPlanAdapter : IBlockPlan
{
    private readonly Masks.BlockMask? _blocks;
    private readonly Masks.TokenSet? _tokens;
    private readonly int _expand;
    private readonly int _executorKeyBlocks;

    public SparsityPlanAdapter(Masks.SparsityPlan plan)
    {
        _blocks = plan.Blocks;
        _tokens = plan.Tokens;
        if (_blocks is not null && _blocks.BlockK % FlashAttentionCpu.BlockKv != 0)
        {
            throw new ArgumentException($"the CPU executor needs BlockK to be a multiple of {FlashAttentionCpu.BlockKv}; the plan has {_blocks.BlockK}", nameof(plan));
        }
        if (plan.BlockQ % 4 != 0 || plan.BlockQ > 256)
        {
            throw new ArgumentException($"the CPU executor needs BlockQ to be a multiple of 4 up to 256; the plan has {plan.BlockQ}", nameof(plan));
        }
        BlockQ = plan.BlockQ;
        _expand = (_blocks?.BlockK ?? FlashAttentionCpu.BlockKv) / FlashAttentionCpu.BlockKv;
        _executorKeyBlocks = (plan.Extent.KeyLength + FlashAttentionCpu.BlockKv - 1) / FlashAttentionCpu.BlockKv;
    }

    public int BlockQ { get; }

    public int KeyBlocks(int batch, int head, int qStart, int qEnd, Span<int> blocks, Span<BlockKind> kinds)
    {
        if (_blocks is null) return 0;
        ReadOnlySpan<int> cols = _blocks.Row(batch, head, qStart / BlockQ, out ReadOnlySpan<Masks.BlockClass> classes);
        int count = 0;
        for (int i = 0; i < cols.Length; i++)
        {
            BlockKind kind = classes[i] == Masks.BlockClass.Full ? BlockKind.Full : BlockKind.Partial;
            for (int e = 0; e < _expand; e++)
            {
                int kb = (cols[i] * _expand) + e;
                if (kb >= _executorKeyBlocks) break;
                blocks[count] = kb;
                kinds[count] = kind;
                count++;
            }
        }
        return count;
    }

    public void ApplyMask(int batch, int head, int q0, int rows, int kv0, int cols, float* scores, int ld)
    {
        Masks.Mask? mask = _blocks?.Mask;
        if (mask is null) return;
        Masks.MaskExtent extent = _blocks!.Extent;
        Span<(int Start, int End)> runs = stackalloc (int, int)[FlashAttentionCpu.BlockKv];
        for (int r = 0; r < rows; r++)
        {
            float* row = scores + (long)r * ld;
            int n = mask.RowRuns(extent, batch, head, q0 + r, kv0, kv0 + cols, runs);
            if (n >= 0)
            {
                // Run-form masks (causal, windows, sinks and their intersections; neighborhoods): fill the gaps.
                // Measured (masks suite, S = 8192): 2-D neighborhood 64×128 k13 ran at 2% of the FMA peak with a
                // virtual Allows per element.
                int at = kv0;
                for (int i = 0; i < n; i++)
                {
                    new Span<float>(row + (at - kv0), runs[i].Start - at).Fill(float.NegativeInfinity);
                    at = runs[i].End;
                }
                new Span<float>(row + (at - kv0), kv0 + cols - at).Fill(float.NegativeInfinity);
                continue;
            }
            for (int c = 0; c < cols; c++)
            {
                if (!mask.Allows(extent, batch, head, q0 + r, kv0 + c)) row[c] = float.NegativeInfinity;
            }
        }
    }

    public int GatherTokens(int batch, int head, int qStart, Span<int> tokens)
    {
        if (_tokens is null) return 0;
        ReadOnlySpan<int> listed = _tokens.Row(batch, head, qStart / BlockQ);
        ReadOnlySpan<int> visited = _blocks is null ? default : _blocks.Row(batch, head, qStart / BlockQ, out _);
        int count = 0;
        foreach (int t in listed)
        {
            if (_blocks is not null && visited.BinarySearch(t / _blocks.BlockK) >= 0) continue;   // inside a visited block
            tokens[count++] = t;
        }
        return count;
    }

    public void ApplyTokenMask(int batch, int head, int q0, int rows, ReadOnlySpan<int> keys, float* scores, int ld)
    {
        Masks.Mask? mask = _tokens?.Mask;
        if (mask is null) return;
        Masks.MaskExtent extent = _tokens!.Extent;
        if (keys.IsEmpty) return;
        int first = keys[0], end = keys[^1] + 1;
        for (int r = 0; r < rows; r++)
        {
            float* row = scores + (long)r * ld;
            if (mask.TryRowInterval(extent, batch, head, q0 + r, first, end, out int start, out int stop))
            {
                // Interval-form masks (causal, windows, sinks' intersections): one call per row instead of a virtual
                // Allows per pair, which cost more than the pairs' arithmetic (AnchorAttention's stripes, session 13).
                if (start <= first && stop >= end) continue;
                for (int c = 0; c < keys.Length; c++)
                {
                    if (keys[c] < start || keys[c] >= stop) row[c] = float.NegativeInfinity;
                }
                continue;
            }
            for (int c = 0; c < keys.Length; c++)
            {
                if (!mask.Allows(extent, batch, head, q0 + r, keys[c])) row[c] = float.NegativeInfinity;
            }
        }
    }
}
