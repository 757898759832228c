using System.Globalization;

namespace Attend.Masks;

/// <summary>
/// Neighborhood attention over a 1-D, 2-D or 3-D grid of tokens laid out row-major (NATTEN's semantics; Hassani et
/// al., arXiv:2204.07143, dilated: arXiv:2209.15001). Per axis, a query attends a window of <c>kernel</c> positions
/// of its own dilation group (positions ≡ its own modulo <c>dilation</c>); near a border the window is shifted to
/// stay inside the grid, not truncated, so every query sees exactly kernel^dims keys. A causal axis instead sees the
/// <c>kernel</c> positions of its group ending at the query. Requires Sq = Skv = the grid's size.
/// </summary>
internal sealed class NeighborhoodMask : Mask
{
    private readonly int[] _grid, _kernel, _dilation;
    private readonly bool[] _causal;
    private readonly int _tokens;

    public NeighborhoodMask(int[] grid, int[] kernel, int[]? dilation, bool[]? causal)
    {
        ArgumentNullException.ThrowIfNull(grid);
        ArgumentNullException.ThrowIfNull(kernel);
        int dims = grid.Length;
        if (dims is < 1 or > 3) throw new ArgumentException($"neighborhood attention takes a 1-D, 2-D or 3-D grid; got {dims} axes", nameof(grid));
        dilation ??= Enumerable.Repeat(1, dims).ToArray();
        causal ??= new bool[dims];
        if (kernel.Length != dims || dilation.Length != dims || causal.Length != dims)
        {
            throw new ArgumentException($"kernel, dilation and causal need one entry per grid axis ({dims})", nameof(kernel));
        }
        for (int a = 0; a < dims; a++)
        {
            if (grid[a] < 1) throw new ArgumentException($"grid axis {a} must be ≥ 1; got {grid[a]}", nameof(grid));
            if (kernel[a] < 1 || (!causal[a] && kernel[a] % 2 == 0))
                throw new ArgumentException($"kernel on axis {a} must be ≥ 1 and odd (non-causal); got {kernel[a]}", nameof(kernel));
            if (dilation[a] < 1) throw new ArgumentException($"dilation on axis {a} must be ≥ 1; got {dilation[a]}", nameof(dilation));
            if ((long)kernel[a] * dilation[a] > grid[a])
                throw new ArgumentException($"kernel·dilation on axis {a} ({kernel[a]}·{dilation[a]}) exceeds the axis length {grid[a]}", nameof(kernel));
        }
        _grid = (int[])grid.Clone();
        _kernel = (int[])kernel.Clone();
        _dilation = (int[])dilation.Clone();
        _causal = (bool[])causal.Clone();
        _tokens = grid.Aggregate(1, (p, g) => checked(p * g));
    }

    private void Check(in MaskExtent extent)
    {
        if (extent.QueryLength != _tokens || extent.KeyLength != _tokens)
        {
            throw new ArgumentException($"a neighborhood mask over a grid of {_tokens} tokens needs Sq = Skv = {_tokens}; got Sq={extent.QueryLength}, Skv={extent.KeyLength}");
        }
    }

    /// <summary>First position of the window of <paramref name="index"/> on one axis (within its dilation group, shifted inside).</summary>
    internal static int WindowStart(int index, int length, int kernel, int dilation, bool causal)
    {
        int group = index % dilation, local = index / dilation;
        if (causal) return Math.Max(local - kernel + 1, 0) * dilation + group;
        int groupLength = (length - group + dilation - 1) / dilation;
        int start = Math.Clamp(local - kernel / 2, 0, groupLength - kernel);
        return start * dilation + group;
    }

    private bool AxisAllows(int axis, int q, int k)
    {
        int d = _dilation[axis];
        int start = WindowStart(q, _grid[axis], _kernel[axis], d, _causal[axis]);
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

    public override BlockClass Classify(in MaskExtent extent, int batch, int head, int q0, int q1, int k0, int k1)
    {
        Check(extent);
        return base.Classify(extent, batch, head, q0, q1, k0, k1);
    }

    public override (int Start, int End) KeyBounds(in MaskExtent extent, int batch, int head, int q0, int q1)
    {
        // The outermost axis bounds the flattened key range: the union of the windows of the outer coordinates the
        // query block spans (dilation groups make the starts non-monotonic, so take min and max over them).
        int outer = _grid[0], inner = _tokens / outer;
        int first = q0 / inner, last = (q1 - 1) / inner;
        int d = _dilation[0];
        int start = int.MaxValue, end = 0;
        for (int y = first; y <= Math.Min(last, first + 2 * d); y++)
        {
            int s = WindowStart(y, outer, _kernel[0], d, _causal[0]);
            start = Math.Min(start, s);
        }
        for (int y = Math.Max(first, last - 2 * d); y <= last; y++)
        {
            int s = WindowStart(y, outer, _kernel[0], d, _causal[0]);
            end = Math.Max(end, _causal[0] ? y + 1 : s + (_kernel[0] - 1) * d + 1);
        }
        return (start * inner, Math.Min(end, outer) * inner);
    }

    public override string ToCuda(in MaskExtent extent) =>
        throw new NotSupportedException("neighborhood masks are not generated for CUDA yet");

    public override string ToString() => string.Create(CultureInfo.InvariantCulture,
        $"neighborhood(grid=[{string.Join(",", _grid)}], kernel=[{string.Join(",", _kernel)}], dilation=[{string.Join(",", _dilation)}], causal=[{string.Join(",", _causal)}])");
}
