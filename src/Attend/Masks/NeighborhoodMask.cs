using System.Globalization;

namespace Attend.Masks;

/// <summary>
/// Neighborhood attention over a 1-D, 2-D or 3-D grid of tokens laid out row-major (NATTEN's semantics; Hassani et
/// al., arXiv:2204.07143, dilated: arXiv:2209.15001). Per axis, a query attends a window of <c>kernel</c> positions
/// of its own dilation group (positions ≡ its own modulo <c>dilation</c>); near a border the window is shifted to
/// stay inside the grid, not truncated, so every query sees exactly kernel^dims keys. A causal axis instead sees the
/// <c>kernel</c> positions of its group ending at the query. With a <c>stride</c> (strided NA, Hassani et al.,
/// arXiv:2504.16922, as NATTEN's Flex backend defines it) the queries of an axis fall into groups of <c>stride</c>
/// consecutive positions (within the dilation group) that share the window of their leader — the centre query of the
/// group (the right one of the two centres for even strides), or for a causal axis its last query — the leader
/// clamped to the axis; a causal window still ends at the query itself. Requires Sq = Skv = the grid's size.
/// </summary>
internal sealed class NeighborhoodMask : Mask
{
    private readonly int[] _grid, _kernel, _dilation, _stride;
    private readonly bool[] _causal;
    private readonly int _tokens;

    public NeighborhoodMask(int[] grid, int[] kernel, int[]? dilation, bool[]? causal, int[]? stride = null)
    {
        ArgumentNullException.ThrowIfNull(grid);
        ArgumentNullException.ThrowIfNull(kernel);
        int dims = grid.Length;
        if (dims is < 1 or > 3) throw new ArgumentException($"neighborhood attention takes a 1-D, 2-D or 3-D grid; got {dims} axes", nameof(grid));
        dilation ??= Enumerable.Repeat(1, dims).ToArray();
        causal ??= new bool[dims];
        stride ??= Enumerable.Repeat(1, dims).ToArray();
        if (kernel.Length != dims || dilation.Length != dims || causal.Length != dims || stride.Length != dims)
        {
            throw new ArgumentException($"kernel, dilation, causal and stride need one entry per grid axis ({dims})", nameof(kernel));
        }
        for (int a = 0; a < dims; a++)
        {
            if (grid[a] < 1) throw new ArgumentException($"grid axis {a} must be ≥ 1; got {grid[a]}", nameof(grid));
            if (kernel[a] < 1 || (!causal[a] && kernel[a] % 2 == 0))
                throw new ArgumentException($"kernel on axis {a} must be ≥ 1 and odd (non-causal); got {kernel[a]}", nameof(kernel));
            if (dilation[a] < 1) throw new ArgumentException($"dilation on axis {a} must be ≥ 1; got {dilation[a]}", nameof(dilation));
            if (stride[a] < 1 || stride[a] > kernel[a]) throw new ArgumentException($"stride on axis {a} must be in 1..kernel ({kernel[a]}); got {stride[a]}", nameof(stride));
            if ((long)kernel[a] * dilation[a] > grid[a])
                throw new ArgumentException($"kernel·dilation on axis {a} ({kernel[a]}·{dilation[a]}) exceeds the axis length {grid[a]}", nameof(kernel));
        }
        _grid = (int[])grid.Clone();
        _kernel = (int[])kernel.Clone();
        _dilation = (int[])dilation.Clone();
        _causal = (bool[])causal.Clone();
        _stride = (int[])stride.Clone();
        _tokens = grid.Aggregate(1, (p, g) => checked(p * g));
    }

    private void Check(in MaskExtent extent)
    {
        if (extent.QueryLength != _tokens || extent.KeyLength != _tokens)
        {
            throw new ArgumentException($"a neighborhood mask over a grid of {_tokens} tokens needs Sq = Skv = {_tokens}; got Sq={extent.QueryLength}, Skv={extent.KeyLength}");
        }
    }

    /// <summary>
    /// First position of the window of <paramref name="index"/> on one axis: within its dilation group, from its stride
    /// group's leader, shifted inside the axis.
    /// </summary>
    internal static int WindowStart(int index, int length, int kernel, int dilation, bool causal, int stride = 1)
    {
        int group = index % dilation, local = index / dilation;
        int groupLength = (length - group + dilation - 1) / dilation;
        int first = local / stride * stride;
        if (causal)
        {
            int lastLeader = Math.Min(first + stride - 1, groupLength - 1);
            return Math.Max(lastLeader - kernel + 1, 0) * dilation + group;
        }
        int leader = Math.Min(first + (stride / 2), groupLength - 1);
        int start = Math.Clamp(leader - kernel / 2, 0, groupLength - kernel);
        return start * dilation + group;
    }

    private bool AxisAllows(int axis, int q, int k)
    {
        int d = _dilation[axis];
        int start = WindowStart(q, _grid[axis], _kernel[axis], d, _causal[axis], _stride[axis]);
        int offset = k - start;
        if (offset < 0 || offset % d != 0) return false;
        int step = offset / d;
        return _causal[axis] ? k <= q : step < _kernel[axis];
    }

    public override bool Allows(in MaskExtent extent, int batch, int head, int q, int kv)
    {
        for (int a = _grid.Length - 1; a >= 0; a--)
        {
            int g = _grid[a];
            if (!AxisAllows(a, q % g, kv % g)) return false;
            q /= g;
            kv /= g;
        }
        return true;
    }

    /// <summary>The allowed coordinates of axis <paramref name="axis"/> for query coordinate <paramref name="c"/>: start, step, count.</summary>
    private (int Start, int Step, int Count) AxisWindow(int axis, int c)
    {
        int d = _dilation[axis];
        int start = WindowStart(c, _grid[axis], _kernel[axis], d, _causal[axis], _stride[axis]);
        int count = _causal[axis] ? (c - start) / d + 1 : _kernel[axis];
        return (start, d, count);
    }

    /// <summary>How many keys in [k0, k1) query <paramref name="q"/> attends: O(kernel of the outer axes), the innermost in O(1).</summary>
    private int CountAllowed(int q, int k0, int k1)
    {
        int dims = _grid.Length;
        Span<int> coord = stackalloc int[3];
        Span<int> stride = stackalloc int[3];
        int st = 1;
        for (int a = dims - 1; a >= 0; a--)
        {
            coord[a] = q % _grid[a];
            q /= _grid[a];
            stride[a] = st;
            st *= _grid[a];
        }
        var last = AxisWindow(dims - 1, coord[dims - 1]);
        int count = 0;
        if (dims == 1) return Progression(last.Start, last.Step, last.Count, k0, k1);
        var w0 = AxisWindow(0, coord[0]);
        for (int i0 = 0; i0 < w0.Count; i0++)
        {
            int base0 = (w0.Start + i0 * w0.Step) * stride[0];
            if (base0 >= k1 || base0 + stride[0] <= k0) continue;
            if (dims == 2)
            {
                count += Progression(base0 + last.Start, last.Step, last.Count, k0, k1);
                continue;
            }
            var w1 = AxisWindow(1, coord[1]);
            for (int i1 = 0; i1 < w1.Count; i1++)
            {
                int base1 = base0 + (w1.Start + i1 * w1.Step) * stride[1];
                count += Progression(base1 + last.Start * stride[2], last.Step * stride[2], last.Count, k0, k1);
            }
        }
        return count;
    }

    /// <summary>Terms of first + j·step (j &lt; n) inside [lo, hi).</summary>
    private static int Progression(int first, int step, int n, int lo, int hi)
    {
        int jMin = first >= lo ? 0 : (lo - first + step - 1) / step;
        int jMax = first > hi - 1 ? -1 : Math.Min(n - 1, (hi - 1 - first) / step);
        return Math.Max(0, jMax - jMin + 1);
    }

    /// <summary>
    /// Per innermost grid row that [k0, k1) touches, at most one run (the innermost window) when the outer axes allow
    /// that row: a partial block is masked with a few fills instead of a call per element. Needs dilation 1 on the
    /// innermost axis (else −1).
    /// </summary>
    public override int RowRuns(in MaskExtent extent, int batch, int head, int q, int k0, int k1, Span<(int Start, int End)> runs)
    {
        int dims = _grid.Length, inner = _grid[dims - 1];
        if (_dilation[dims - 1] != 1) return -1;
        var window = AxisWindow(dims - 1, q % inner);
        int qOuter = q / inner, count = 0;
        for (int row = k0 / inner; row * inner < k1; row++)
        {
            // Outer axes: does the query's window include this key row's outer coordinates?
            bool allowed = true;
            for (int a = dims - 2, qo = qOuter, ko = row; a >= 0 && allowed; a--)
            {
                allowed = AxisAllows(a, qo % _grid[a], ko % _grid[a]);
                qo /= _grid[a];
                ko /= _grid[a];
            }
            if (!allowed) continue;
            int start = Math.Max(k0, (row * inner) + window.Start), end = Math.Min(k1, (row * inner) + window.Start + window.Count);
            if (start >= end) continue;
            if (count == runs.Length) return -1;
            runs[count++] = (start, end);
        }
        return count;
    }

    public override BlockClass Classify(in MaskExtent extent, int batch, int head, int q0, int q1, int k0, int k1)
    {
        Check(extent);
        int cols = k1 - k0;
        bool anyEmpty = false, anyFull = false;
        for (int q = q0; q < q1; q++)
        {
            int c = CountAllowed(q, k0, k1);
            if (c != 0 && c != cols) return BlockClass.Partial;
            if (c == 0) anyEmpty = true;
            else anyFull = true;
            if (anyEmpty && anyFull) return BlockClass.Partial;
        }
        return anyFull ? BlockClass.Full : BlockClass.Empty;
    }

    public override void KeyRanges(in MaskExtent extent, int batch, int head, int q0, int q1, List<(int Start, int End)> ranges)
    {
        ArgumentNullException.ThrowIfNull(ranges);
        Check(extent);
        // Union over the block's outer coordinates of their allowed outer coordinates, one key slab per coordinate.
        int outer = _grid[0], inner = _tokens / outer;
        int first = q0 / inner, last = (q1 - 1) / inner;
        var rows = new SortedSet<int>();
        for (int y = first; y <= last; y++)
        {
            var w = AxisWindow(0, y);
            for (int i = 0; i < w.Count; i++) rows.Add(w.Start + i * w.Step);
        }
        foreach (int y in rows)
        {
            int s = y * inner, e = s + inner;
            if (ranges.Count > 0 && ranges[^1].End == s) ranges[^1] = (ranges[^1].Start, e);
            else ranges.Add((s, e));
        }
    }

    public override (int Start, int End) KeyBounds(in MaskExtent extent, int batch, int head, int q0, int q1)
    {
        var ranges = new List<(int Start, int End)>();
        KeyRanges(extent, batch, head, q0, q1, ranges);
        return ranges.Count == 0 ? (0, 0) : (ranges[0].Start, ranges[^1].End);
    }

    public override string ToCuda(in MaskExtent extent)
    {
        // One block per axis, innermost first (row-major), each returning false when the key leaves the window.
        var sb = new System.Text.StringBuilder("([&]() -> bool { int qq = q, kk = kv; ");
        for (int a = _grid.Length - 1; a >= 0; a--)
        {
            int g = _grid[a], k = _kernel[a], d = _dilation[a], st = _stride[a];
            sb.Append(CultureInfo.InvariantCulture, $"{{ int qc = qq % {g}, kc = kk % {g}; qq /= {g}; kk /= {g}; int grp = qc % {d}, loc = qc / {d}; ");
            sb.Append(CultureInfo.InvariantCulture, $"int glen = ({g} - grp + {d - 1}) / {d}; int first = loc / {st} * {st}; ");
            if (_causal[a])
            {
                sb.Append(CultureInfo.InvariantCulture, $"int lead = first + {st - 1}; lead = lead < glen - 1 ? lead : glen - 1; ");
                sb.Append(CultureInfo.InvariantCulture, $"int s = lead - {k - 1}; s = (s < 0 ? 0 : s) * {d} + grp; int off = kc - s; if (off < 0 || off % {d} != 0 || kc > qc) return false; }} ");
            }
            else
            {
                sb.Append(CultureInfo.InvariantCulture, $"int lead = first + {st / 2}; lead = lead < glen - 1 ? lead : glen - 1; ");
                sb.Append(CultureInfo.InvariantCulture, $"int hi = glen - {k}; int s = lead - {k / 2}; s = s < 0 ? 0 : (s > hi ? hi : s); s = s * {d} + grp; ");
                sb.Append(CultureInfo.InvariantCulture, $"int off = kc - s; if (off < 0 || off % {d} != 0 || off / {d} >= {k}) return false; }} ");
            }
        }
        return sb.Append("return true; }())").ToString();
    }

    public override string ToString() => string.Create(CultureInfo.InvariantCulture,
        $"neighborhood(grid=[{string.Join(",", _grid)}], kernel=[{string.Join(",", _kernel)}], dilation=[{string.Join(",", _dilation)}], causal=[{string.Join(",", _causal)}], stride=[{string.Join(",", _stride)}])");
}
