using System.Globalization;

namespace Attend.Masks;

internal sealed class FullMask : Mask
{
    public override bool Allows(in MaskExtent extent, int batch, int head, int q, int kv) => true;

    public override BlockClass Classify(in MaskExtent extent, int batch, int head, int q0, int q1, int k0, int k1) => BlockClass.Full;

    public override bool TryRowInterval(in MaskExtent extent, int batch, int head, int q, int k0, int k1, out int start, out int end)
    {
        (start, end) = (k0, k1);
        return true;
    }

    public override string ToCuda(in MaskExtent extent) => "true";

    public override string ToString() => "full";
}

internal sealed class CausalMask : Mask
{
    public override bool Allows(in MaskExtent extent, int batch, int head, int q, int kv) => kv <= q + extent.CausalOffset;

    public override BlockClass Classify(in MaskExtent extent, int batch, int head, int q0, int q1, int k0, int k1)
    {
        long off = extent.CausalOffset;
        if (k0 > q1 - 1 + off) return BlockClass.Empty;     // even the last query sees no key of the block
        if (k1 - 1 <= q0 + off) return BlockClass.Full;     // even the first query sees every key
        return BlockClass.Partial;
    }

    public override (int Start, int End) KeyBounds(in MaskExtent extent, int batch, int head, int q0, int q1) =>
        (0, (int)Math.Clamp(q1 - 1 + extent.CausalOffset + 1, 0, extent.KeyLength));

    public override bool TryRowInterval(in MaskExtent extent, int batch, int head, int q, int k0, int k1, out int start, out int end)
    {
        start = k0;
        end = (int)Math.Clamp(q + extent.CausalOffset + 1, k0, k1);
        return true;
    }

    public override string ToCuda(in MaskExtent extent) => $"((long long)kv <= (long long)q + {extent.CausalOffset}LL)";

    public override string ToString() => "causal";
}

internal sealed class WindowMask : Mask
{
    private readonly int _left, _right;

    public WindowMask(int left, int right)
    {
        if (left < 0) throw new ArgumentOutOfRangeException(nameof(left), left, "window left must be ≥ 0");
        if (right < 0) throw new ArgumentOutOfRangeException(nameof(right), right, "window right must be ≥ 0");
        _left = left;
        _right = right;
    }

    // d = (q + off) − kv must lie in [−right, left].
    public override bool Allows(in MaskExtent extent, int batch, int head, int q, int kv)
    {
        long d = q + extent.CausalOffset - kv;
        return d <= _left && d >= -_right;
    }

    public override BlockClass Classify(in MaskExtent extent, int batch, int head, int q0, int q1, int k0, int k1)
    {
        long off = extent.CausalOffset;
        long dMin = q0 + off - (k1 - 1), dMax = q1 - 1 + off - k0;
        if (dMin > _left || dMax < -_right) return BlockClass.Empty;
        if (dMin >= -_right && dMax <= _left) return BlockClass.Full;
        return BlockClass.Partial;
    }

    public override (int Start, int End) KeyBounds(in MaskExtent extent, int batch, int head, int q0, int q1)
    {
        long off = extent.CausalOffset;
        long start = q0 + off - _left, end = q1 - 1 + off + _right + 1;
        return ((int)Math.Clamp(start, 0, extent.KeyLength), (int)Math.Clamp(end, 0, extent.KeyLength));
    }

    public override bool TryRowInterval(in MaskExtent extent, int batch, int head, int q, int k0, int k1, out int start, out int end)
    {
        long center = q + extent.CausalOffset;
        start = (int)Math.Clamp(center - _left, k0, k1);
        end = (int)Math.Clamp(center + _right + 1, start, k1);
        return true;
    }

    public override string ToCuda(in MaskExtent extent) =>
        $"(((long long)q + {extent.CausalOffset}LL - kv) <= {_left}LL && ((long long)q + {extent.CausalOffset}LL - kv) >= -{_right}LL)";

    public override string ToString() => string.Create(CultureInfo.InvariantCulture, $"window({_left}, {_right})");
}

internal sealed class SinkMask : Mask
{
    private readonly int _tokens;

    public SinkMask(int tokens)
    {
        if (tokens < 0) throw new ArgumentOutOfRangeException(nameof(tokens), tokens, "sink/prefix length must be ≥ 0");
        _tokens = tokens;
    }

    public override bool Allows(in MaskExtent extent, int batch, int head, int q, int kv) => kv < _tokens;

    public override BlockClass Classify(in MaskExtent extent, int batch, int head, int q0, int q1, int k0, int k1) =>
        k1 <= _tokens ? BlockClass.Full : k0 >= _tokens ? BlockClass.Empty : BlockClass.Partial;

    public override (int Start, int End) KeyBounds(in MaskExtent extent, int batch, int head, int q0, int q1) => (0, Math.Min(_tokens, extent.KeyLength));

    public override bool TryRowInterval(in MaskExtent extent, int batch, int head, int q, int k0, int k1, out int start, out int end)
    {
        start = k0;
        end = Math.Clamp(_tokens, k0, k1);
        return true;
    }

    public override string ToCuda(in MaskExtent extent) => $"(kv < {_tokens})";

    public override string ToString() => string.Create(CultureInfo.InvariantCulture, $"sink({_tokens})");
}

/// <summary>Block-causal: query q sees every key of its own block of <c>blockSize</c> and of the blocks before it (positions aligned bottom-right).</summary>
internal sealed class BlockCausalMask : Mask
{
    private readonly int _block;

    public BlockCausalMask(int blockSize)
    {
        if (blockSize < 1) throw new ArgumentOutOfRangeException(nameof(blockSize), blockSize, "block size must be ≥ 1");
        _block = blockSize;
    }

    /// <summary>Keys [0, limit) that query <paramref name="q"/> sees.</summary>
    private long Limit(in MaskExtent extent, int q)
    {
        long p = q + extent.CausalOffset;
        return p < 0 ? 0 : Math.Min(extent.KeyLength, ((p / _block) + 1) * _block);
    }

    public override bool Allows(in MaskExtent extent, int batch, int head, int q, int kv) => kv < Limit(extent, q);

    public override BlockClass Classify(in MaskExtent extent, int batch, int head, int q0, int q1, int k0, int k1) =>
        k1 <= Limit(extent, q0) ? BlockClass.Full : k0 >= Limit(extent, q1 - 1) ? BlockClass.Empty : BlockClass.Partial;

    public override (int Start, int End) KeyBounds(in MaskExtent extent, int batch, int head, int q0, int q1) => (0, (int)Limit(extent, q1 - 1));

    public override bool TryRowInterval(in MaskExtent extent, int batch, int head, int q, int k0, int k1, out int start, out int end)
    {
        start = k0;
        end = (int)Math.Clamp(Limit(extent, q), k0, k1);
        return true;
    }

    public override string ToCuda(in MaskExtent extent) => string.Create(CultureInfo.InvariantCulture,
        $"((long long)q + {extent.CausalOffset}LL >= 0 && (long long)kv / {_block} <= ((long long)q + {extent.CausalOffset}LL) / {_block})");

    public override string ToString() => string.Create(CultureInfo.InvariantCulture, $"block_causal({_block})");
}

internal sealed class DocumentMask : Mask
{
    private readonly int[] _queryDocs, _keyDocs;

    public DocumentMask(int[] queryDocs, int[] keyDocs)
    {
        ArgumentNullException.ThrowIfNull(queryDocs);
        ArgumentNullException.ThrowIfNull(keyDocs);
        _queryDocs = (int[])queryDocs.Clone();
        _keyDocs = (int[])keyDocs.Clone();
    }

    private void Check(in MaskExtent extent)
    {
        if (_queryDocs.Length != extent.QueryLength || _keyDocs.Length != extent.KeyLength)
        {
            throw new ArgumentException($"document ids must have one entry per token: Sq={extent.QueryLength}, Skv={extent.KeyLength}; got {_queryDocs.Length} query and {_keyDocs.Length} key ids");
        }
    }

    public override bool Allows(in MaskExtent extent, int batch, int head, int q, int kv) => _queryDocs[q] == _keyDocs[kv];

    public override BlockClass Classify(in MaskExtent extent, int batch, int head, int q0, int q1, int k0, int k1)
    {
        Check(extent);
        // Packed documents are usually sorted runs: one id on both sides means Full, disjoint id ranges Empty.
        (int qMin, int qMax) = MinMax(_queryDocs, q0, q1);
        (int kMin, int kMax) = MinMax(_keyDocs, k0, k1);
        if (qMin == qMax && kMin == kMax) return qMin == kMin ? BlockClass.Full : BlockClass.Empty;
        if (qMax < kMin || kMax < qMin) return BlockClass.Empty;
        return base.Classify(extent, batch, head, q0, q1, k0, k1);
    }

    private static (int, int) MinMax(int[] ids, int start, int end)
    {
        int min = int.MaxValue, max = int.MinValue;
        for (int i = start; i < end; i++)
        {
            min = Math.Min(min, ids[i]);
            max = Math.Max(max, ids[i]);
        }
        return (min, max);
    }

    /// <summary>
    /// The ids as constants: each side's ids become runs of equal ids (packed documents are a few runs), and a
    /// balanced tree of comparisons against the run ends maps a position to its id in O(log runs) steps. Expression
    /// size is O(runs): fine for packed batches of up to thousands of documents.
    /// </summary>
    public override string ToCuda(in MaskExtent extent)
    {
        Check(extent);
        return $"({RunLookup(_queryDocs, "q")} == {RunLookup(_keyDocs, "kv")})";
    }

    private static string RunLookup(int[] ids, string variable)
    {
        var ends = new List<int>();
        var values = new List<int>();
        for (int i = 0; i < ids.Length; i++)
        {
            if (i + 1 == ids.Length || ids[i + 1] != ids[i])
            {
                ends.Add(i + 1);
                values.Add(ids[i]);
            }
        }
        string Tree(int lo, int hi) => lo == hi
            ? values[lo].ToString(System.Globalization.CultureInfo.InvariantCulture)
            : $"({variable} < {ends[(lo + hi) / 2].ToString(System.Globalization.CultureInfo.InvariantCulture)} ? {Tree(lo, (lo + hi) / 2)} : {Tree(((lo + hi) / 2) + 1, hi)})";
        return Tree(0, values.Count - 1);
    }

    public override string ToString() => "document";
}

internal sealed class PredicateMask(MaskPredicate predicate, bool dependsOnBatch, bool dependsOnHead) : Mask
{
    public override bool Allows(in MaskExtent extent, int batch, int head, int q, int kv) => predicate(batch, head, q, kv);

    public override string ToCuda(in MaskExtent extent) => throw new NotSupportedException("a predicate mask is a .NET delegate: it runs on the CPU only");

    public override bool DependsOnBatch => dependsOnBatch;

    public override bool DependsOnHead => dependsOnHead;

    public override string ToString() => "predicate";
}

internal sealed class AndMask(Mask left, Mask right) : Mask
{
    public override int RowRuns(in MaskExtent extent, int batch, int head, int q, int k0, int k1, Span<(int Start, int End)> runs)
    {
        Span<(int, int)> a = stackalloc (int, int)[runs.Length], b = stackalloc (int, int)[runs.Length];
        int na = left.RowRuns(extent, batch, head, q, k0, k1, a);
        if (na <= 0) return na;
        int nb = right.RowRuns(extent, batch, head, q, k0, k1, b);
        if (nb < 0) return -1;
        return RunLists.Intersect(a[..na], b[..nb], runs);
    }

    public override bool Allows(in MaskExtent extent, int batch, int head, int q, int kv) =>
        left.Allows(extent, batch, head, q, kv) && right.Allows(extent, batch, head, q, kv);

    public override BlockClass Classify(in MaskExtent extent, int batch, int head, int q0, int q1, int k0, int k1)
    {
        BlockClass a = left.Classify(extent, batch, head, q0, q1, k0, k1);
        if (a == BlockClass.Empty) return BlockClass.Empty;
        BlockClass b = right.Classify(extent, batch, head, q0, q1, k0, k1);
        if (b == BlockClass.Empty) return BlockClass.Empty;
        return a == BlockClass.Full && b == BlockClass.Full ? BlockClass.Full : BlockClass.Partial;
    }

    public override (int Start, int End) KeyBounds(in MaskExtent extent, int batch, int head, int q0, int q1)
    {
        (int a0, int a1) = left.KeyBounds(extent, batch, head, q0, q1);
        (int b0, int b1) = right.KeyBounds(extent, batch, head, q0, q1);
        int s = Math.Max(a0, b0), e = Math.Min(a1, b1);
        return e > s ? (s, e) : (0, 0);
    }

    public override void KeyRanges(in MaskExtent extent, int batch, int head, int q0, int q1, List<(int Start, int End)> ranges)
    {
        ArgumentNullException.ThrowIfNull(ranges);
        var a = new List<(int, int)>();
        var b = new List<(int, int)>();
        left.KeyRanges(extent, batch, head, q0, q1, a);
        right.KeyRanges(extent, batch, head, q0, q1, b);
        int i = 0, j = 0;
        while (i < a.Count && j < b.Count)
        {
            int s = Math.Max(a[i].Item1, b[j].Item1), e = Math.Min(a[i].Item2, b[j].Item2);
            if (e > s) ranges.Add((s, e));
            if (a[i].Item2 < b[j].Item2) i++;
            else j++;
        }
    }

    public override bool TryRowInterval(in MaskExtent extent, int batch, int head, int q, int k0, int k1, out int start, out int end)
    {
        start = end = 0;
        if (!left.TryRowInterval(extent, batch, head, q, k0, k1, out int a0, out int a1)
            || !right.TryRowInterval(extent, batch, head, q, k0, k1, out int b0, out int b1)) return false;
        start = Math.Max(a0, b0);
        end = Math.Max(start, Math.Min(a1, b1));
        return true;
    }

    public override string ToCuda(in MaskExtent extent) => $"({left.ToCuda(extent)} && {right.ToCuda(extent)})";

    public override bool DependsOnBatch => left.DependsOnBatch || right.DependsOnBatch;

    public override bool DependsOnHead => left.DependsOnHead || right.DependsOnHead;

    public override string ToString() => $"({left} & {right})";
}

internal sealed class OrMask(Mask left, Mask right) : Mask
{
    public override int RowRuns(in MaskExtent extent, int batch, int head, int q, int k0, int k1, Span<(int Start, int End)> runs)
    {
        Span<(int, int)> a = stackalloc (int, int)[runs.Length], b = stackalloc (int, int)[runs.Length];
        int na = left.RowRuns(extent, batch, head, q, k0, k1, a);
        if (na < 0) return -1;
        int nb = right.RowRuns(extent, batch, head, q, k0, k1, b);
        if (nb < 0) return -1;
        return RunLists.Union(a[..na], b[..nb], runs);
    }

    public override bool Allows(in MaskExtent extent, int batch, int head, int q, int kv) =>
        left.Allows(extent, batch, head, q, kv) || right.Allows(extent, batch, head, q, kv);

    public override BlockClass Classify(in MaskExtent extent, int batch, int head, int q0, int q1, int k0, int k1)
    {
        BlockClass a = left.Classify(extent, batch, head, q0, q1, k0, k1);
        if (a == BlockClass.Full) return BlockClass.Full;
        BlockClass b = right.Classify(extent, batch, head, q0, q1, k0, k1);
        if (b == BlockClass.Full) return BlockClass.Full;
        return a == BlockClass.Empty && b == BlockClass.Empty ? BlockClass.Empty : BlockClass.Partial;
    }

    public override (int Start, int End) KeyBounds(in MaskExtent extent, int batch, int head, int q0, int q1)
    {
        (int a0, int a1) = left.KeyBounds(extent, batch, head, q0, q1);
        (int b0, int b1) = right.KeyBounds(extent, batch, head, q0, q1);
        if (a1 <= a0) return (b0, b1);
        if (b1 <= b0) return (a0, a1);
        return (Math.Min(a0, b0), Math.Max(a1, b1));
    }

    public override void KeyRanges(in MaskExtent extent, int batch, int head, int q0, int q1, List<(int Start, int End)> ranges)
    {
        ArgumentNullException.ThrowIfNull(ranges);
        var all = new List<(int Start, int End)>();
        left.KeyRanges(extent, batch, head, q0, q1, all);
        right.KeyRanges(extent, batch, head, q0, q1, all);
        all.Sort();
        foreach ((int s, int e) in all)
        {
            if (ranges.Count > 0 && s <= ranges[^1].End) ranges[^1] = (ranges[^1].Start, Math.Max(ranges[^1].End, e));
            else ranges.Add((s, e));
        }
    }

    public override bool TryRowInterval(in MaskExtent extent, int batch, int head, int q, int k0, int k1, out int start, out int end)
    {
        start = end = 0;
        if (!left.TryRowInterval(extent, batch, head, q, k0, k1, out int a0, out int a1)
            || !right.TryRowInterval(extent, batch, head, q, k0, k1, out int b0, out int b1)) return false;
        if (a1 <= a0) (start, end) = (b0, b1);
        else if (b1 <= b0) (start, end) = (a0, a1);
        else if (a0 <= b1 && b0 <= a1) (start, end) = (Math.Min(a0, b0), Math.Max(a1, b1));
        else return false;     // two separate intervals
        return true;
    }

    public override string ToCuda(in MaskExtent extent) => $"({left.ToCuda(extent)} || {right.ToCuda(extent)})";

    public override bool DependsOnBatch => left.DependsOnBatch || right.DependsOnBatch;

    public override bool DependsOnHead => left.DependsOnHead || right.DependsOnHead;

    public override string ToString() => $"({left} | {right})";
}

internal sealed class NotMask(Mask inner) : Mask
{
    public override bool Allows(in MaskExtent extent, int batch, int head, int q, int kv) => !inner.Allows(extent, batch, head, q, kv);

    public override BlockClass Classify(in MaskExtent extent, int batch, int head, int q0, int q1, int k0, int k1) =>
        inner.Classify(extent, batch, head, q0, q1, k0, k1) switch
        {
            BlockClass.Full => BlockClass.Empty,
            BlockClass.Empty => BlockClass.Full,
            _ => BlockClass.Partial,
        };

    public override string ToCuda(in MaskExtent extent) => $"(!{inner.ToCuda(extent)})";

    public override bool DependsOnBatch => inner.DependsOnBatch;

    public override bool DependsOnHead => inner.DependsOnHead;

    public override string ToString() => $"!{inner}";
}

/// <summary>Set operations on ascending disjoint runs [Start, End) (the row form of masks).</summary>
internal static class RunLists
{
    /// <summary>Runs in both lists; −1 if they do not fit <paramref name="output"/>.</summary>
    public static int Intersect(ReadOnlySpan<(int Start, int End)> a, ReadOnlySpan<(int Start, int End)> b, Span<(int Start, int End)> output)
    {
        int i = 0, j = 0, n = 0;
        while (i < a.Length && j < b.Length)
        {
            int start = Math.Max(a[i].Start, b[j].Start), end = Math.Min(a[i].End, b[j].End);
            if (start < end)
            {
                if (n == output.Length) return -1;
                output[n++] = (start, end);
            }
            if (a[i].End < b[j].End) i++;
            else j++;
        }
        return n;
    }

    /// <summary>Runs in either list, merged where they touch; −1 if they do not fit <paramref name="output"/>.</summary>
    public static int Union(ReadOnlySpan<(int Start, int End)> a, ReadOnlySpan<(int Start, int End)> b, Span<(int Start, int End)> output)
    {
        int i = 0, j = 0, n = 0;
        while (i < a.Length || j < b.Length)
        {
            (int start, int end) = j >= b.Length || (i < a.Length && a[i].Start <= b[j].Start) ? a[i++] : b[j++];
            if (n > 0 && start <= output[n - 1].End)
            {
                output[n - 1] = (output[n - 1].Start, Math.Max(output[n - 1].End, end));
                continue;
            }
            if (n == output.Length) return -1;
            output[n++] = (start, end);
        }
        return n;
    }
}
