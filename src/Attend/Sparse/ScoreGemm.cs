using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using Attend.Cpu;

namespace Attend.Sparse;

/// <summary>
/// Keys packed for <see cref="ScoreGemm"/>: panels of <see cref="Width"/> keys, each panel [D][Width] contiguous,
/// so the product's inner loop reads memory in order. (Multiplying against plainly transposed keys [D, n] strides
/// by n floats per step: at n = 4096 groups that thrashed the TLB and made XAttention's estimate 7× slower.)
/// Or the CPU executor's K panels, [D][64] each (<see cref="Cpu.PackedKv.KeyPanels"/>), read in place: a panel row
/// of <see cref="Stride"/> floats holds <see cref="Stride"/> / <see cref="Width"/> of the product's panels side by side.
/// </summary>
internal sealed unsafe class PackedPanels
{
    /// <summary>
    /// Panels [D][<paramref name="stride"/>] of <paramref name="n"/> keys in memory owned elsewhere (zero past n, and
    /// valid while used); <paramref name="stride"/> is a multiple of <see cref="ScoreGemm.PanelWidth"/>.
    /// </summary>
    public PackedPanels(float* panels, int n, int d, int stride)
    {
        if (stride % ScoreGemm.PanelWidth != 0) throw new ArgumentException($"panel stride {stride} is not a multiple of {ScoreGemm.PanelWidth}", nameof(stride));
        Width = ScoreGemm.PanelWidth;
        Stride = stride;
        N = n;
        D = d;
        Data = [];
        Pointer = panels;
    }

    /// <summary>Packs rows [n, d]; into <paramref name="reuse"/> when it has exactly the size needed (else a new array).</summary>
    public PackedPanels(ReadOnlySpan<float> rows, int n, int d, float[]? reuse = null)
        : this(n, d, reuse)
    {
        int j = PackWhole(rows, 0, n);
        for (; j < n; j++) Scatter(j, rows.Slice(j * d, d));
    }

    /// <summary>Packs the source's rows [n, d] as they are read, eight at a time (no gathered copy of all of them).</summary>
    public PackedPanels(IRowSource rows, int n, int d, float[]? reuse = null)
        : this(n, d, reuse)
    {
        var group = new float[8 * d];
        for (int j = 0; j < n; j += 8)
        {
            int count = Math.Min(8, n - j);
            for (int i = 0; i < count; i++) rows.CopyRow(j + i, group.AsSpan(i * d, d));
            int done = count == 8 ? PackWhole(group, j, 8) : 0;
            for (int i = done; i < count; i++) Scatter(j + i, group.AsSpan(i * d, d));
        }
    }

    private PackedPanels(int n, int d, float[]? reuse)
    {
        Width = ScoreGemm.PanelWidth;
        Stride = Width;
        N = n;
        D = d;
        int panels = (n + Width - 1) / Width;
        long size = (long)panels * d * Width;
        bool reused = reuse is not null && reuse.Length == size;
        Data = reused ? reuse! : new float[size];
        if (reused && n % Width != 0)
        {
            // The last panel's padding keys (every other entry is overwritten below).
            long last = (long)(panels - 1) * d * Width;
            for (int c = 0; c < d; c++) Data.AsSpan((int)(last + ((long)c * Width) + (n % Width)), Width - (n % Width)).Clear();
        }
    }

    /// <summary>
    /// Packs rows [count, D] (<paramref name="rows"/>, row 0 being key <paramref name="first"/>) eight keys at a time
    /// by 8 × 8 tile transposes (<see cref="Transpose.Tile8(float*, long, float*, long)"/>); returns how many rows it packed (0 without AVX or when D
    /// is not a multiple of 8).
    /// </summary>
    private int PackWhole(ReadOnlySpan<float> rows, int first, int count)
    {
        int d = D, i = 0;
        if (!Avx.IsSupported || Width % 8 != 0 || d % 8 != 0 || first % 8 != 0) return 0;
        fixed (float* source = rows, target = Data)
        {
            for (; i + 8 <= count; i += 8)
            {
                int key = first + i;
                float* panel = target + ((long)(key / Width) * d * Width) + (key % Width);
                for (int c = 0; c < d; c += 8) Transpose.Tile8(source + ((long)i * d) + c, d, panel + ((long)c * Width), Width);
            }
        }
        return i;
    }

    /// <summary>One key's row to its place in its panel.</summary>
    private void Scatter(int key, ReadOnlySpan<float> row)
    {
        long p = ((long)(key / Width) * D * Width) + (key % Width);
        for (int c = 0; c < D; c++) Data[p + ((long)c * Width)] = row[c];
    }

    /// <summary>Keys per panel of the product (two vectors).</summary>
    public int Width { get; }

    /// <summary>Floats per panel row in memory: <see cref="Width"/> for panels packed here, 64 for the executor's.</summary>
    public int Stride { get; }

    public int N { get; }
    public int D { get; }

    /// <summary>The panels packed here (empty for panels owned elsewhere).</summary>
    public float[] Data { get; }

    /// <summary>The panels owned elsewhere (null for <see cref="Data"/>).</summary>
    public float* Pointer { get; }
}

/// <summary>
/// The one matrix product the selectors need: estimated scores <c>C[i, j] = A[i]·B[j0 + j]</c> for row-major
/// A [m, d] and keys packed in panels. An outer-product kernel (4 rows × 2 vectors of keys per step, no horizontal
/// reductions) written once over the executor's SIMD widths: estimation is part of a selector's time, so it must
/// run near the FMA peak, not at dot-product speed.
/// </summary>
internal static unsafe class ScoreGemm
{
    /// <summary>Keys per packed panel: two vectors of the widest accelerated width.</summary>
    public static int PanelWidth => Vector512.IsHardwareAccelerated ? 32 : Vector256.IsHardwareAccelerated ? 16 : 2;

    /// <summary>C [m, n] (row stride n) = A [m, d] · keys [j0, j0 + n)ᵀ; <paramref name="j0"/> must be a multiple of the panels' stride.</summary>
    public static void Multiply(ReadOnlySpan<float> a, int m, int d, PackedPanels b, int j0, int n, Span<float> c)
    {
        if (m == 0 || n == 0) return;
        if (d != b.D || j0 % b.Stride != 0 || j0 < 0 || j0 + n > b.N || a.Length < (long)m * d || c.Length < (long)m * n)
        {
            throw new ArgumentException($"ScoreGemm: m={m}, n={n}, d={d}, j0={j0} do not fit keys [{b.N}, {b.D}] in panels of {b.Stride}");
        }
        fixed (float* pa = a, owned = b.Data, pc = c)
        {
            float* panels = b.Pointer != null ? b.Pointer : owned;
            Multiply(pa, m, d, panels + ((long)(j0 / b.Stride) * d * b.Stride), n, pc, n, b.Stride);
        }
    }

    /// <summary>
    /// For each row of <paramref name="rows"/> [assignment.Length, d]: the centroid c (of <paramref name="centroids"/>,
    /// packed) maximising row·c + bias[c] — the assignment step of k-means — first index on ties, 0 for a row whose
    /// scores are all NaN. 64 rows at a time as one product (one dot product per pair ran ≈ 10× slower); scratch holds
    /// at least 64 × centroids floats.
    /// </summary>
    public static void AssignNearest(ReadOnlySpan<float> rows, int d, PackedPanels centroids, ReadOnlySpan<float> bias, Span<int> assignment, float[] scratch)
    {
        const int chunk = 64;
        int n = assignment.Length, k = centroids.N;
        for (int i0 = 0; i0 < n; i0 += chunk)
        {
            int m = Math.Min(chunk, n - i0);
            Multiply(rows.Slice(i0 * d, m * d), m, d, centroids, 0, k, scratch);
            for (int r = 0; r < m; r++)
            {
                int best = 0;
                float bestScore = float.NegativeInfinity;
                for (int c = 0; c < k; c++)
                {
                    float score = scratch[(r * k) + c] + bias[c];
                    if (score > bestScore) (best, bestScore) = (c, score);
                }
                assignment[i0 + r] = best;
            }
        }
    }

    /// <summary>
    /// The raw form: panels of <see cref="PanelWidth"/> columns ([d][width] each; or, with <paramref name="stride"/> a
    /// multiple of the width, [d][stride] panels holding stride / width of them side by side), C with row stride
    /// <paramref name="ldc"/>.
    /// </summary>
    public static void Multiply(float* a, int m, int d, float* panels, int n, float* c, int ldc, int stride = 0)
    {
        if (Vector512.IsHardwareAccelerated) Run<Vector512<float>, V512Ops>(a, m, d, panels, n, c, ldc, stride);
        else if (Vector256.IsHardwareAccelerated) Run<Vector256<float>, V256Ops>(a, m, d, panels, n, c, ldc, stride);
        else Run<float, ScalarOps>(a, m, d, panels, n, c, ldc, stride);
    }

    private static void Run<TV, TOps>(float* a, int m, int d, float* panels, int n, float* c, int ldc, int stride)
        where TV : unmanaged where TOps : struct, ISimd<TV>
    {
        int w = TOps.Count, step = 2 * w;
        if (stride == 0) stride = step;
        int nFull = n / step * step, rowGroups = m / 4 * 4;
        // Key panels a chunk at a time, every row group over a chunk before the next: the chunk (512 keys × D floats,
        // 256 KB at D 128) stays in L2 while the rows pass over it. Row groups outermost streamed all n keys from
        // memory once per 4 rows: 64 query rows against 32768 keys ran at ≈ 16 GFLOPS (session 10).
        int chunk = Math.Max(step, 512 / step * step);
        // The executor's panels ([D][64]): its own score tile, which uses each 256-byte panel row whole. Two vectors a
        // step over them (half of every row, the other half on the next step) ran 16 × 32768 × 128 in 2.4 ms against
        // 1.8 ms on panels of two vectors; the tile 1.64–1.69 (one core, session 13).
        int wide = stride == FlashAttentionCpu.BlockKv ? stride : nFull + 1;
        int nWide = nFull / wide * wide;
        for (int j0 = 0; j0 < nWide; j0 += chunk)
        {
            int j1 = Math.Min(nWide, j0 + chunk);
            for (int i = 0; i < rowGroups; i += 4)
                for (int j = j0; j < j1; j += wide)
                    FlashAttentionCpu.ScoreTile<TV, TOps>(a + ((long)i * d), panels + ((long)(j / wide) * d * wide), c + ((long)i * ldc) + j, 4, d, ldc);
        }
        for (int j0 = nWide; j0 < nFull; j0 += chunk)
        {
            int j1 = Math.Min(nFull, j0 + chunk);
            for (int i = 0; i < rowGroups; i += 4) Block<TV, TOps>(a + (long)i * d, d, panels, stride, j0, j1, c + (long)i * ldc, ldc);
        }
        for (int i = 0; i < rowGroups; i++) Tail(a + (long)i * d, d, panels, stride, nFull, n, c + (long)i * ldc);
        for (int i = rowGroups; i < m; i++) Tail(a + (long)i * d, d, panels, stride, 0, n, c + (long)i * ldc);
    }

    /// <summary>Rows a[0..4) against key panels [j0, j1) (whole panels): C[r, j] for those keys.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Block<TV, TOps>(float* a, int d, float* panels, int stride, int j0, int j1, float* c, int ldc)
        where TV : unmanaged where TOps : ISimd<TV>
    {
        int w = TOps.Count, step = 2 * w;
        {
            float* a0 = a, a1 = a0 + d, a2 = a1 + d, a3 = a2 + d;
            for (int j = j0; j < j1; j += step)
            {
                TV c00 = TOps.Zero, c01 = TOps.Zero, c10 = TOps.Zero, c11 = TOps.Zero;
                TV c20 = TOps.Zero, c21 = TOps.Zero, c30 = TOps.Zero, c31 = TOps.Zero;
                float* b = panels + ((long)(j / stride) * d * stride) + (j % stride);
                for (int k = 0; k < d; k++, b += stride)
                {
                    TV b0 = TOps.Load(b), b1 = TOps.Load(b + w);
                    TV x = TOps.Broadcast(a0[k]);
                    c00 = TOps.Fma(x, b0, c00); c01 = TOps.Fma(x, b1, c01);
                    x = TOps.Broadcast(a1[k]);
                    c10 = TOps.Fma(x, b0, c10); c11 = TOps.Fma(x, b1, c11);
                    x = TOps.Broadcast(a2[k]);
                    c20 = TOps.Fma(x, b0, c20); c21 = TOps.Fma(x, b1, c21);
                    x = TOps.Broadcast(a3[k]);
                    c30 = TOps.Fma(x, b0, c30); c31 = TOps.Fma(x, b1, c31);
                }
                float* o = c + j;
                TOps.Store(o, c00); TOps.Store(o + w, c01); o += ldc;
                TOps.Store(o, c10); TOps.Store(o + w, c11); o += ldc;
                TOps.Store(o, c20); TOps.Store(o + w, c21); o += ldc;
                TOps.Store(o, c30); TOps.Store(o + w, c31);
            }
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Tail(float* row, int d, float* panels, int stride, int from, int n, float* c)
    {
        for (int j = from; j < n; j++)
        {
            float* b = panels + ((long)(j / stride) * d * stride) + (j % stride);
            float s = 0;
            for (int k = 0; k < d; k++) s = MathF.FusedMultiplyAdd(row[k], b[(long)k * stride], s);
            c[j] = s;
        }
    }
}

/// <summary>
/// C [m, n] += A [m, kk] · B [kk, n], all row-major with leading dimensions: the small dense products of chunked
/// linear attention. The same outer-product kernel as <see cref="ScoreGemm"/> (4 rows × 2 vectors of C in registers,
/// B rows streamed), with B read in place at its row stride instead of packed panels. Replaced an i-k-j
/// loop of span Axpy calls that ran at ≈ 6 GFLOPS per core (call overhead per 64-float row; docs/perf/linear.md).
/// </summary>
internal static unsafe class SmallGemm
{
    public static void MultiplyAdd(float* a, int lda, float* b, int ldb, float* c, int ldc, int m, int kk, int n)
    {
        if (m == 0 || n == 0 || kk == 0) return;
        if (Vector512.IsHardwareAccelerated) Run<Vector512<float>, V512Ops>(a, lda, b, ldb, c, ldc, m, kk, n);
        else if (Vector256.IsHardwareAccelerated) Run<Vector256<float>, V256Ops>(a, lda, b, ldb, c, ldc, m, kk, n);
        else Run<float, ScalarOps>(a, lda, b, ldb, c, ldc, m, kk, n);
    }

    private static void Run<TV, TOps>(float* a, int lda, float* b, int ldb, float* c, int ldc, int m, int kk, int n)
        where TV : unmanaged where TOps : ISimd<TV>
    {
        int w = TOps.Count, step = 2 * w;
        int nFull = n / step * step;
        int i = 0;
        for (; i + 4 <= m; i += 4)
        {
            float* a0 = a + (long)i * lda, a1 = a0 + lda, a2 = a1 + lda, a3 = a2 + lda;
            for (int j = 0; j < nFull; j += step)
            {
                float* o = c + (long)i * ldc + j;
                TV c00 = TOps.Load(o), c01 = TOps.Load(o + w);
                TV c10 = TOps.Load(o + ldc), c11 = TOps.Load(o + ldc + w);
                TV c20 = TOps.Load(o + (2 * ldc)), c21 = TOps.Load(o + (2 * ldc) + w);
                TV c30 = TOps.Load(o + (3 * ldc)), c31 = TOps.Load(o + (3 * ldc) + w);
                float* bk = b + j;
                for (int k = 0; k < kk; k++, bk += ldb)
                {
                    TV b0 = TOps.Load(bk), b1 = TOps.Load(bk + w);
                    TV x = TOps.Broadcast(a0[k]);
                    c00 = TOps.Fma(x, b0, c00); c01 = TOps.Fma(x, b1, c01);
                    x = TOps.Broadcast(a1[k]);
                    c10 = TOps.Fma(x, b0, c10); c11 = TOps.Fma(x, b1, c11);
                    x = TOps.Broadcast(a2[k]);
                    c20 = TOps.Fma(x, b0, c20); c21 = TOps.Fma(x, b1, c21);
                    x = TOps.Broadcast(a3[k]);
                    c30 = TOps.Fma(x, b0, c30); c31 = TOps.Fma(x, b1, c31);
                }
                TOps.Store(o, c00); TOps.Store(o + w, c01); o += ldc;
                TOps.Store(o, c10); TOps.Store(o + w, c11); o += ldc;
                TOps.Store(o, c20); TOps.Store(o + w, c21); o += ldc;
                TOps.Store(o, c30); TOps.Store(o + w, c31);
            }
            if (nFull < n) for (int r = 0; r < 4; r++) RowTail(a + (long)(i + r) * lda, b, ldb, c + (long)(i + r) * ldc, kk, nFull, n);
        }
        for (; i < m; i++) RowTail(a + (long)i * lda, b, ldb, c + (long)i * ldc, kk, 0, n);
    }

    /// <summary>Columns [from, n) of one row: i-k-j with vectors of Vector&lt;float&gt; width.</summary>
    private static void RowTail(float* row, float* b, int ldb, float* c, int kk, int from, int n)
    {
        for (int k = 0; k < kk; k++)
        {
            float x = row[k];
            float* bk = b + (long)k * ldb;
            int j = from;
            var vx = new System.Numerics.Vector<float>(x);
            for (; j + System.Numerics.Vector<float>.Count <= n; j += System.Numerics.Vector<float>.Count)
            {
                var cv = System.Runtime.CompilerServices.Unsafe.ReadUnaligned<System.Numerics.Vector<float>>(c + j);
                var bv = System.Runtime.CompilerServices.Unsafe.ReadUnaligned<System.Numerics.Vector<float>>(bk + j);
                System.Runtime.CompilerServices.Unsafe.WriteUnaligned(c + j, cv + (vx * bv));
            }
            for (; j < n; j++) c[j] = MathF.FusedMultiplyAdd(x, bk[j], c[j]);
        }
    }
}
