using System.Globalization;

namespace Attend.Masks;

/// <summary>
/// 1-D dilated causal window: query i sees keys j = i + off − t·dilation for t in [0, window) (a strided
/// LongNet/Dilated-attention pattern; with dilation 1 it is a causal sliding window of <c>window</c> keys).
/// </summary>
internal sealed class DilatedWindowMask : Mask
{
    private readonly int _window, _dilation;

    public DilatedWindowMask(int window, int dilation)
    {
        if (window < 1) throw new ArgumentOutOfRangeException(nameof(window), window, "window must be ≥ 1");
        if (dilation < 1) throw new ArgumentOutOfRangeException(nameof(dilation), dilation, "dilation must be ≥ 1");
        _window = window;
        _dilation = dilation;
    }

    public override bool Allows(in MaskExtent extent, int batch, int head, int q, int kv)
    {
        long d = q + extent.CausalOffset - kv;
        return d >= 0 && d % _dilation == 0 && d / _dilation < _window;
    }

    /// <summary>Keys p − t·dilation (p = q + offset, t &lt; window) inside [k0, k1): one run, or single keys every dilation.</summary>
    public override int RowRuns(in MaskExtent extent, int batch, int head, int q, int k0, int k1, Span<(int Start, int End)> runs)
    {
        long p = q + extent.CausalOffset, lowest = p - ((long)(_window - 1) * _dilation);
        long lo = Math.Max(k0, lowest), hi = Math.Min(k1 - 1L, p);
        if (lo > hi) return 0;
        if (_dilation == 1)
        {
            runs[0] = ((int)lo, (int)hi + 1);
            return 1;
        }
        long first = lo + ((((p - lo) % _dilation) + _dilation) % _dilation);   // smallest key ≥ lo with key ≡ p (mod dilation)
        int n = 0;
        for (long kv = first; kv <= hi; kv += _dilation)
        {
            if (n == runs.Length) return -1;
            runs[n++] = ((int)kv, (int)kv + 1);
        }
        return n;
    }

    public override BlockClass Classify(in MaskExtent extent, int batch, int head, int q0, int q1, int k0, int k1)
    {
        long off = extent.CausalOffset, span = (long)(_window - 1) * _dilation;
        long dMin = q0 + off - (k1 - 1), dMax = q1 - 1 + off - k0;
        if (dMax < 0 || dMin > span) return BlockClass.Empty;
        if (_dilation == 1 && dMin >= 0 && dMax <= span) return BlockClass.Full;
        if (_dilation > 1 && q1 - q0 == 1 && k1 - k0 == 1) return Allows(extent, batch, head, q0, k0) ? BlockClass.Full : BlockClass.Empty;
        return BlockClass.Partial;
    }

    public override (int Start, int End) KeyBounds(in MaskExtent extent, int batch, int head, int q0, int q1)
    {
        long off = extent.CausalOffset;
        return ((int)Math.Clamp(q0 + off - (long)(_window - 1) * _dilation, 0, extent.KeyLength), (int)Math.Clamp(q1 + off, 0, extent.KeyLength));
    }

    public override string ToCuda(in MaskExtent extent)
    {
        string d = $"((long long)q + {extent.CausalOffset}LL - kv)";
        return $"({d} >= 0 && {d} % {_dilation} == 0 && {d} / {_dilation} < {_window})";
    }

    public override string ToString() => string.Create(CultureInfo.InvariantCulture, $"dilated({_window}, {_dilation})");
}

/// <summary>
/// LongLoRA's shifted sparse attention (S²-Attn, Chen et al. arXiv:2309.12307): tokens attend within groups of
/// <c>groupSize</c>; the second half of the heads uses groups shifted by half a group (positions rolled by −G/2, so
/// the last group wraps around to the first tokens). Needs Sq = Skv; combine with <see cref="Mask.Causal"/> for LMs.
/// </summary>
internal sealed class ShiftedGroupsMask : Mask
{
    private readonly int _group;

    public ShiftedGroupsMask(int groupSize)
    {
        if (groupSize < 2) throw new ArgumentOutOfRangeException(nameof(groupSize), groupSize, "group size must be ≥ 2");
        _group = groupSize;
    }

    private int Shift(in MaskExtent e, int head) => head >= e.Heads / 2 && e.Heads > 1 ? _group / 2 : 0;

    private int GroupOf(int t, int shift, int length) => (int)(((long)t - shift + length) % length) / _group;

    public override bool Allows(in MaskExtent extent, int batch, int head, int q, int kv)
    {
        int s = Shift(extent, head);
        return GroupOf(q, s, extent.QueryLength) == GroupOf(kv, s, extent.KeyLength);
    }

    /// <summary>The group ids a token range [t0, t1) covers, as up to two id intervals (the roll splits one range).</summary>
    private List<(int Min, int Max)> Groups(int t0, int t1, int shift, int length)
    {
        var result = new List<(int, int)>();
        // Rolled position p = (t − shift) mod L is increasing on [t0, min(t1, shift)) and on [max(t0, shift), t1).
        foreach ((int a, int b) in new[] { (t0, Math.Min(t1, shift)), (Math.Max(t0, shift), t1) })
        {
            if (b > a) result.Add((GroupOf(a, shift, length), GroupOf(b - 1, shift, length)));
        }
        return result;
    }

    public override BlockClass Classify(in MaskExtent extent, int batch, int head, int q0, int q1, int k0, int k1)
    {
        if (extent.QueryLength != extent.KeyLength) throw new ArgumentException($"shifted groups need Sq = Skv; got Sq={extent.QueryLength}, Skv={extent.KeyLength}");
        int s = Shift(extent, head);
        var qg = Groups(q0, q1, s, extent.QueryLength);
        var kg = Groups(k0, k1, s, extent.KeyLength);
        bool overlap = qg.Any(a => kg.Any(b => a.Min <= b.Max && b.Min <= a.Max));
        if (!overlap) return BlockClass.Empty;
        bool single = qg.Count == 1 && kg.Count == 1 && qg[0].Min == qg[0].Max && kg[0].Min == kg[0].Max;
        return single ? BlockClass.Full : BlockClass.Partial;
    }

    public override string ToCuda(in MaskExtent extent)
    {
        // Shift is G/2 for heads >= H/2.
        string shift = extent.Heads > 1 ? $"(h >= {extent.Heads / 2} ? {_group / 2} : 0)" : "0";
        return $"(((q - {shift} + {extent.QueryLength}) % {extent.QueryLength}) / {_group} == ((kv - {shift} + {extent.KeyLength}) % {extent.KeyLength}) / {_group})";
    }

    public override bool DependsOnHead => true;

    public override string ToString() => string.Create(CultureInfo.InvariantCulture, $"shifted_groups({_group})");
}

/// <summary>
/// Block-granular local + strided heads (S2-Attention, arXiv:2407.17678; the DKernel / Phi-3-small block-sparse
/// pattern): with blocks of <c>blockSize</c> tokens, query block qb of head h sees key blocks kb ≤ qb with
/// qb − kb &lt; <c>localBlocks</c> or (kb + h) mod <c>vertStride</c> = 0 — the stride phase differs per head so the heads
/// together cover the whole context. Token-level causal inside the blocks (bottom-right aligned).
/// </summary>
internal sealed class StridedShardsMask : Mask
{
    private readonly int _block, _local, _stride;

    public StridedShardsMask(int blockSize, int localBlocks, int vertStride)
    {
        if (blockSize < 1) throw new ArgumentOutOfRangeException(nameof(blockSize), blockSize, "block size must be ≥ 1");
        if (localBlocks < 1) throw new ArgumentOutOfRangeException(nameof(localBlocks), localBlocks, "local blocks must be ≥ 1");
        if (vertStride < 1) throw new ArgumentOutOfRangeException(nameof(vertStride), vertStride, "vertical stride must be ≥ 1");
        _block = blockSize;
        _local = localBlocks;
        _stride = vertStride;
    }

    private bool BlockAllowed(int head, long qb, long kb) => kb <= qb && (qb - kb < _local || (kb + head) % _stride == 0);

    public override bool Allows(in MaskExtent extent, int batch, int head, int q, int kv)
    {
        long qa = q + extent.CausalOffset;
        return kv <= qa && qa >= 0 && BlockAllowed(head, qa / _block, kv / _block);
    }

    public override BlockClass Classify(in MaskExtent extent, int batch, int head, int q0, int q1, int k0, int k1)
    {
        long off = extent.CausalOffset;
        long qa0 = q0 + off, qa1 = q1 - 1 + off;
        if (qa1 < 0) return BlockClass.Empty;
        long qb0 = Math.Max(qa0, 0) / _block, qb1 = qa1 / _block, kb0 = k0 / _block, kb1 = (k1 - 1) / _block;
        if (qb0 == qb1 && kb0 == kb1)
        {
            if (!BlockAllowed(head, qb0, kb0)) return BlockClass.Empty;
            return Causal.Classify(extent, batch, head, q0, q1, k0, k1);
        }
        return base.Classify(extent, batch, head, q0, q1, k0, k1);
    }

    public override (int Start, int End) KeyBounds(in MaskExtent extent, int batch, int head, int q0, int q1) => Causal.KeyBounds(extent, batch, head, q0, q1);

    public override string ToCuda(in MaskExtent extent)
    {
        string qa = $"((long long)q + {extent.CausalOffset}LL)";
        return $"(kv <= {qa} && {qa} >= 0 && ({qa} / {_block} - kv / {_block} < {_local} || (kv / {_block} + h) % {_stride} == 0))";
    }

    public override bool DependsOnHead => true;

    public override string ToString() => string.Create(CultureInfo.InvariantCulture, $"strided_shards({_block}, {_local}, {_stride})");
}

/// <summary>
/// A causal sliding window whose size differs per head (MoA, arXiv:2406.14909): head h sees the last
/// <c>windows[h]</c> keys up to its diagonal.
/// </summary>
internal sealed class PerHeadWindowMask : Mask
{
    private readonly int[] _windows;

    public PerHeadWindowMask(int[] windows)
    {
        ArgumentNullException.ThrowIfNull(windows);
        if (windows.Length == 0 || windows.Any(w => w < 1)) throw new ArgumentException("per-head windows must be ≥ 1, one per head", nameof(windows));
        _windows = (int[])windows.Clone();
    }

    private Mask For(in MaskExtent e, int head)
    {
        if (_windows.Length != e.Heads) throw new ArgumentException($"per-head windows need one entry per head (H={e.Heads}); got {_windows.Length}");
        return Causal & SlidingWindow(_windows[head] - 1);
    }

    public override bool Allows(in MaskExtent extent, int batch, int head, int q, int kv)
    {
        long d = q + extent.CausalOffset - kv;
        return d >= 0 && d < _windows[head];
    }

    public override BlockClass Classify(in MaskExtent extent, int batch, int head, int q0, int q1, int k0, int k1) =>
        For(extent, head).Classify(extent, batch, head, q0, q1, k0, k1);

    public override (int Start, int End) KeyBounds(in MaskExtent extent, int batch, int head, int q0, int q1) =>
        For(extent, head).KeyBounds(extent, batch, head, q0, q1);

    public override string ToCuda(in MaskExtent extent)
    {
        string table = string.Join(", ", _windows);
        return $"([&]{{ const int w[] = {{{table}}}; long long d = (long long)q + {extent.CausalOffset}LL - kv; return d >= 0 && d < w[h]; }}())";
    }

    public override bool DependsOnHead => true;

    public override string ToString() => $"head_windows([{string.Join(",", _windows)}])";
}

/// <summary>
/// Per-head chunk lists (LongHeads, arXiv:2402.10685): keys are split into chunks of <c>chunkSize</c>; head h attends
/// only the chunks listed for it. Combine with <see cref="Mask.Causal"/>.
/// </summary>
internal sealed class HeadChunksMask : Mask
{
    private readonly int _chunk;
    private readonly HashSet<int>[] _chunks;
    private readonly int[][] _sorted;

    public HeadChunksMask(int chunkSize, int[][] chunksPerHead)
    {
        ArgumentNullException.ThrowIfNull(chunksPerHead);
        if (chunkSize < 1) throw new ArgumentOutOfRangeException(nameof(chunkSize), chunkSize, "chunk size must be ≥ 1");
        if (chunksPerHead.Any(c => c is null || c.Any(x => x < 0))) throw new ArgumentException("chunk lists must hold chunk indices ≥ 0", nameof(chunksPerHead));
        _chunk = chunkSize;
        _sorted = chunksPerHead.Select(c => c.Distinct().Order().ToArray()).ToArray();
        _chunks = _sorted.Select(c => c.ToHashSet()).ToArray();
    }

    private void Check(in MaskExtent e)
    {
        if (_chunks.Length != e.Heads) throw new ArgumentException($"chunk lists need one entry per head (H={e.Heads}); got {_chunks.Length}");
    }

    public override bool Allows(in MaskExtent extent, int batch, int head, int q, int kv) => _chunks[head].Contains(kv / _chunk);

    public override BlockClass Classify(in MaskExtent extent, int batch, int head, int q0, int q1, int k0, int k1)
    {
        Check(extent);
        int c0 = k0 / _chunk, c1 = (k1 - 1) / _chunk;
        int hits = 0;
        for (int c = c0; c <= c1; c++) if (_chunks[head].Contains(c)) hits++;
        return hits == 0 ? BlockClass.Empty : hits == c1 - c0 + 1 ? BlockClass.Full : BlockClass.Partial;
    }

    public override void KeyRanges(in MaskExtent extent, int batch, int head, int q0, int q1, List<(int Start, int End)> ranges)
    {
        ArgumentNullException.ThrowIfNull(ranges);
        Check(extent);
        foreach (int c in _sorted[head])
        {
            int s = c * _chunk, e = Math.Min(s + _chunk, extent.KeyLength);
            if (s >= extent.KeyLength) break;
            if (ranges.Count > 0 && ranges[^1].End == s) ranges[^1] = (ranges[^1].Start, e);
            else ranges.Add((s, e));
        }
    }

    public override string ToCuda(in MaskExtent extent)
    {
        Check(extent);
        var cases = _sorted.Select((chunks, h) => $"case {h}: return {(chunks.Length == 0 ? "false" : string.Join(" || ", chunks.Select(c => $"c == {c}")))};");
        return $"([&]() -> bool {{ int c = kv / {_chunk}; switch (h) {{ {string.Join(" ", cases)} default: return false; }} }}())";
    }

    public override bool DependsOnHead => true;

    public override string ToString() => string.Create(CultureInfo.InvariantCulture, $"head_chunks({_chunk})");
}

/// <summary>
/// Global tokens (Longformer/BigBird-style): listed positions as rows (they see every key) and/or as columns
/// (every query sees them). BlockRank's designated rows are <c>Document(segments) | GlobalRows(rows)</c>.
/// </summary>
internal sealed class GlobalTokensMask : Mask
{
    private readonly int[] _positions;
    private readonly HashSet<int> _set;
    private readonly bool _rows, _columns;

    public GlobalTokensMask(int[] positions, bool rows, bool columns)
    {
        ArgumentNullException.ThrowIfNull(positions);
        if (positions.Any(p => p < 0)) throw new ArgumentException("global token positions must be ≥ 0", nameof(positions));
        _positions = positions.Distinct().Order().ToArray();
        _set = [.. _positions];
        _rows = rows;
        _columns = columns;
    }

    public override bool Allows(in MaskExtent extent, int batch, int head, int q, int kv) =>
        (_rows && _set.Contains(q)) || (_columns && _set.Contains(kv));

    /// <summary>A global row is one run; otherwise each global column inside [k0, k1) is a run of one key.</summary>
    public override int RowRuns(in MaskExtent extent, int batch, int head, int q, int k0, int k1, Span<(int Start, int End)> runs)
    {
        if (_rows && _set.Contains(q))
        {
            runs[0] = (k0, k1);
            return 1;
        }
        if (!_columns) return 0;
        int n = 0;
        int i = Array.BinarySearch(_positions, k0);
        for (i = i < 0 ? ~i : i; i < _positions.Length && _positions[i] < k1; i++)
        {
            if (n > 0 && runs[n - 1].End == _positions[i]) runs[n - 1] = (runs[n - 1].Start, _positions[i] + 1);
            else if (n == runs.Length) return -1;
            else runs[n++] = (_positions[i], _positions[i] + 1);
        }
        return n;
    }

    private int CountIn(int start, int end)
    {
        int lo = Array.BinarySearch(_positions, start);
        if (lo < 0) lo = ~lo;
        int hi = Array.BinarySearch(_positions, end);
        if (hi < 0) hi = ~hi;
        return hi - lo;
    }

    public override BlockClass Classify(in MaskExtent extent, int batch, int head, int q0, int q1, int k0, int k1)
    {
        int qHits = _rows ? CountIn(q0, q1) : 0, kHits = _columns ? CountIn(k0, k1) : 0;
        if (qHits == q1 - q0 || kHits == k1 - k0) return BlockClass.Full;
        return qHits == 0 && kHits == 0 ? BlockClass.Empty : BlockClass.Partial;
    }

    public override void KeyRanges(in MaskExtent extent, int batch, int head, int q0, int q1, List<(int Start, int End)> ranges)
    {
        ArgumentNullException.ThrowIfNull(ranges);
        if (_rows && CountIn(q0, q1) > 0)
        {
            ranges.Add((0, extent.KeyLength));
            return;
        }
        if (!_columns) return;
        foreach (int p in _positions)
        {
            if (p >= extent.KeyLength) break;
            if (ranges.Count > 0 && ranges[^1].End == p) ranges[^1] = (ranges[^1].Start, p + 1);
            else ranges.Add((p, p + 1));
        }
    }

    public override string ToCuda(in MaskExtent extent)
    {
        // A linear scan of the (short) position list; large lists belong in a TokenSet instead.
        string list = _positions.Length == 0 ? "-1" : string.Join(", ", _positions);
        string hit = "for (int i = 0; i < n; i++) { if (";
        string test = string.Join(" || ", new[] { _rows ? "g[i] == q" : null, _columns ? "g[i] == kv" : null }.Where(x => x is not null));
        return $"([&]() -> bool {{ const int g[] = {{{list}}}; const int n = {_positions.Length}; {hit}{test}) return true; }} return false; }}())";
    }

    public override string ToString() => $"global({(_rows ? "rows" : "")}{(_rows && _columns ? "+" : "")}{(_columns ? "columns" : "")}: {_positions.Length})";
}

/// <summary>Rectangular regions of (query, key) pairs (ART-style region lists): a pair is allowed inside any region.</summary>
internal sealed class RegionsMask : Mask
{
    private readonly (int Q0, int Q1, int K0, int K1)[] _regions;

    public RegionsMask(IEnumerable<(int QueryStart, int QueryEnd, int KeyStart, int KeyEnd)> regions)
    {
        ArgumentNullException.ThrowIfNull(regions);
        _regions = regions.Select(r => (r.QueryStart, r.QueryEnd, r.KeyStart, r.KeyEnd)).ToArray();
        if (_regions.Any(r => r.Q0 < 0 || r.K0 < 0 || r.Q1 < r.Q0 || r.K1 < r.K0)) throw new ArgumentException("regions need 0 ≤ start ≤ end on both axes", nameof(regions));
    }

    public override bool Allows(in MaskExtent extent, int batch, int head, int q, int kv)
    {
        foreach (var r in _regions) if (q >= r.Q0 && q < r.Q1 && kv >= r.K0 && kv < r.K1) return true;
        return false;
    }

    public override BlockClass Classify(in MaskExtent extent, int batch, int head, int q0, int q1, int k0, int k1)
    {
        bool any = false;
        foreach (var r in _regions)
        {
            if (r.Q0 <= q0 && r.Q1 >= q1 && r.K0 <= k0 && r.K1 >= k1) return BlockClass.Full;
            if (r.Q0 < q1 && q0 < r.Q1 && r.K0 < k1 && k0 < r.K1) any = true;
        }
        return any ? BlockClass.Partial : BlockClass.Empty;
    }

    public override void KeyRanges(in MaskExtent extent, int batch, int head, int q0, int q1, List<(int Start, int End)> ranges)
    {
        ArgumentNullException.ThrowIfNull(ranges);
        int keys = extent.KeyLength;
        var hit = _regions.Where(r => r.Q0 < q1 && q0 < r.Q1).Select(r => (Math.Min(r.K0, keys), Math.Min(r.K1, keys))).Where(r => r.Item2 > r.Item1).Order().ToList();
        foreach ((int s, int e) in hit)
        {
            if (ranges.Count > 0 && s <= ranges[^1].End) ranges[^1] = (ranges[^1].Start, Math.Max(ranges[^1].End, e));
            else ranges.Add((s, e));
        }
    }

    public override string ToCuda(in MaskExtent extent) =>
        "(" + (_regions.Length == 0 ? "false" : string.Join(" || ", _regions.Select(r => $"(q >= {r.Q0} && q < {r.Q1} && kv >= {r.K0} && kv < {r.K1})"))) + ")";

    public override string ToString() => $"regions({_regions.Length})";
}
