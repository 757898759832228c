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
