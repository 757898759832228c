using Attend.Sparse;
using Attend.Tensors;

namespace Attend.Models;

/// <summary>
/// y [M, N] = x [M, K] · Wᵀ for a weight W [N, K] kept in its stored dtype (f32, f16, bf16). Prefill: W is
/// converted 64 rows at a time into f32 panels (the selectors' outer-product kernel, ScoreGemm) and each panel meets
/// every row of x, so the conversion is amortized over M; panels run in parallel. Small M (decoding): a dot product
/// per output with the weight row converted on the fly.
/// </summary>
internal static unsafe class MatMul
{
    private const int GroupRows = 64;

    public static void Multiply(float[] x, int m, int k, Tensor w, float[] y, int threads)
    {
        switch (w.DType)
        {
            case DType.Float16: Multiply(x, m, k, w.Array<Half>(), w.Shape[0], y, threads); break;
            case DType.BFloat16: Multiply(x, m, k, w.Array<BFloat16>(), w.Shape[0], y, threads); break;
            case DType.Float32: Multiply(x, m, k, w.Array<float>(), w.Shape[0], y, threads); break;
            default: throw new NotSupportedException($"weights of dtype {DTypes.Name(w.DType)} are not supported");
        }
    }

    public static void Multiply<TW>(float[] x, int m, int k, TW[] w, int n, float[] y, int threads) where TW : unmanaged
    {
        if (x.Length < (long)m * k || w.Length != (long)n * k || y.Length < (long)m * n)
        {
            throw new ArgumentException($"MatMul: x [{m}, {k}], W [{n}, {k}], y [{m}, {n}] do not fit buffers of {x.Length}, {w.Length}, {y.Length}");
        }
        var options = new ParallelOptions { MaxDegreeOfParallelism = threads > 0 ? threads : Environment.ProcessorCount };
        if (m < 16)
        {
            Parallel.For(0, (n + GroupRows - 1) / GroupRows, options, () => new float[k], (g, _, row) =>
            {
                for (int j = g * GroupRows; j < Math.Min(n, (g + 1) * GroupRows); j++)
                {
                    ElementConvert.ToSingle<TW>(w.AsSpan(j * k, k), row);
                    for (int i = 0; i < m; i++) y[(i * n) + j] = Linear.Vectors.Dot(x.AsSpan(i * k, k), row);
                }
                return row;
            }, _ => { });
            return;
        }
        int width = ScoreGemm.PanelWidth;
        Parallel.For(0, (n + GroupRows - 1) / GroupRows, options, () => (new float[k], new float[GroupRows * k]), (g, _, buffers) =>
        {
            (float[] row, float[] panels) = buffers;
            int j0 = g * GroupRows, rows = Math.Min(GroupRows, n - j0);
            // Pack rows j0.. into panels [panel][k][width] (zero past the last row).
            Array.Clear(panels);
            for (int r = 0; r < rows; r++)
            {
                ElementConvert.ToSingle<TW>(w.AsSpan((j0 + r) * k, k), row);
                int panel = r / width, lane = r % width;
                int baseIndex = panel * k * width + lane;
                for (int c = 0; c < k; c++) panels[baseIndex + (c * width)] = row[c];
            }
            fixed (float* px = x, pp = panels, py = y)
            {
                // Tiles of 256 rows keep x's rows in cache while the panel (64 × K floats) stays in L2.
                for (int i0 = 0; i0 < m; i0 += 256)
                {
                    int mm = Math.Min(256, m - i0);
                    ScoreGemm.Multiply(px + ((long)i0 * k), mm, k, pp, rows, py + ((long)i0 * n) + j0, n);
                }
            }
            return buffers;
        }, _ => { });
    }
}
