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

    /// <summary>
    /// Writes the sorted key tokens the query block gathers beyond <paramref name="visitedBlocks"/> (the ascending
    /// executor key blocks <see cref="KeyBlocks"/> listed for it); returns how many (0: none).
    /// </summary>
    int GatherTokens(int batch, int head, int qStart, ReadOnlySpan<int> visitedBlocks, Span<int> tokens) => 0;

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
    private readonly int _keyLength;

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
        _keyLength = plan.Extent.KeyLength;
    }

    public int BlockQ { get; }

    public int KeyBlocks(int batch, int head, int qStart, int qEnd, Span<int> blocks, Span<BlockKind> kinds)
    {
        int count = 0;
        if (_blocks is not null)
        {
            ReadOnlySpan<int> cols = _blocks.Row(batch, head, qStart / BlockQ, out ReadOnlySpan<Masks.BlockClass> classes);
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
        }
        if (_tokens is null) return count;
        // Executor blocks whose every key is a listed token that every row of the query block may attend run as Full
        // blocks on the packed panels instead of gathered 64 at a time (the same pairs). AnchorAttention at θ 12.5 lists
        // every key of three of the four heads of gpt-bytes-8k's layer 1 as stripes (session 13).
        ReadOnlySpan<int> listed = _tokens.Row(batch, head, qStart / BlockQ);
        (int allowedFrom, int allowedTo) = TokenInterval(batch, head, qStart, qEnd, listed);
        int visited = count;
        for (int i = 0; i < listed.Length;)
        {
            int kb = listed[i] / FlashAttentionCpu.BlockKv, end = i;
            while (end < listed.Length && listed[end] / FlashAttentionCpu.BlockKv == kb) end++;
            if (WholeBlock(kb, end - i, allowedFrom, allowedTo) && blocks[..visited].BinarySearch(kb) < 0)
            {
                blocks[count] = kb;
                kinds[count] = BlockKind.Full;
                count++;
            }
            i = end;
        }
        if (count > visited) SortBlocks(blocks[..count], kinds[..count]);
        return count;
    }

    /// <summary>Keys [from, to) that every row of [qStart, qEnd) may attend under the token mask (empty when a row has no interval form).</summary>
    private (int From, int To) TokenInterval(int batch, int head, int qStart, int qEnd, ReadOnlySpan<int> listed)
    {
        if (listed.IsEmpty) return (0, 0);
        Masks.Mask? mask = _tokens!.Mask;
        int first = listed[0], end = listed[^1] + 1;
        if (mask is null) return (first, end);
        int from = first, to = end;
        for (int q = qStart; q < qEnd; q++)
        {
            if (!mask.TryRowInterval(_tokens.Extent, batch, head, q, first, end, out int start, out int stop) || start >= stop) return (0, 0);
            from = Math.Max(from, start);
            to = Math.Min(to, stop);
        }
        return from < to ? (from, to) : (0, 0);
    }

    /// <summary>Whether <paramref name="listedInBlock"/> tokens of executor block <paramref name="kb"/> are all its keys, all allowed to every row.</summary>
    private bool WholeBlock(int kb, int listedInBlock, int allowedFrom, int allowedTo)
    {
        int k0 = kb * FlashAttentionCpu.BlockKv, k1 = Math.Min(k0 + FlashAttentionCpu.BlockKv, _keyLength);
        return listedInBlock == k1 - k0 && k0 >= allowedFrom && k1 <= allowedTo;
    }

    private static void SortBlocks(Span<int> blocks, Span<BlockKind> kinds)
    {
        // Insertion sort: the block list is ascending but for the few promoted blocks appended at its end.
        for (int i = 1; i < blocks.Length; i++)
        {
            int kb = blocks[i];
            BlockKind kind = kinds[i];
            int j = i - 1;
            for (; j >= 0 && blocks[j] > kb; j--)
            {
                blocks[j + 1] = blocks[j];
                kinds[j + 1] = kinds[j];
            }
            blocks[j + 1] = kb;
            kinds[j + 1] = kind;
        }
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

    public int GatherTokens(int batch, int head, int qStart, ReadOnlySpan<int> visitedBlocks, Span<int> tokens)
    {
        if (_tokens is null) return 0;
        int count = 0;
        foreach (int t in _tokens.Row(batch, head, qStart / BlockQ))
        {
            // Inside a visited block (the plan's, or a whole block of tokens KeyBlocks runs as a block): not gathered.
            if (visitedBlocks.BinarySearch(t / FlashAttentionCpu.BlockKv) >= 0) continue;
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
