using Attend.Sparse;

namespace Attend.Tests;

/// <summary>The selectors' shared helpers: a cumulative-mass budget that sorts only what it can take, reused key panels.</summary>
public class SelectionKernelTests
{
    [Fact]
    public void Cover_mass_takes_what_sorting_everything_takes()
    {
        var rng = new Random(5);
        foreach (int n in new[] { 100, 4096, 5000, 70000 })
            foreach (int shape in new[] { 0, 1, 2, 3 })
            {
                // Uniform, heavy-tailed (softmax of wide logits), with exact zeros, and with repeated values.
                float[] x = new float[n];
                for (int i = 0; i < n; i++)
                {
                    double u = rng.NextDouble();
                    x[i] = shape switch
                    {
                        0 => (float)u,
                        1 => (float)Math.Exp(12 * u),
                        2 => u < 0.7 ? 0f : (float)u,
                        _ => (float)Math.Round(u * 8) / 8,
                    };
                }
                foreach (double fraction in new[] { 0.0, 0.3, 0.9, 0.95, 0.999, 1.0 })
                    foreach ((int min, int max) in new[] { (1, int.MaxValue), (50, int.MaxValue), (1, 20) })
                    {
                        int[] fast = SelectionMath.CoverMass(x, fraction, min, max);
                        int[] sorted = SortedCover(x, fraction, min, max);
                        Assert.Equal(sorted.Length, fast.Length);
                        // Same values in the same order (equal values may come in another order).
                        Assert.Equal(sorted.Select(i => x[i]), fast.Select(i => x[i]));
                        Assert.Equal(fast.Length, fast.Distinct().Count());
                    }
            }
    }

    private static int[] SortedCover(float[] x, double fraction, int min, int max)
    {
        int[] order = [.. Enumerable.Range(0, x.Length).OrderByDescending(i => x[i])];
        if (fraction >= 1) return order[..Math.Min(order.Length, max)];
        double total = x.Sum(v => (double)v), target = fraction * total, sum = 0;
        int taken = 0;
        while (taken < order.Length && (taken < min || sum < target) && taken < max) sum += x[order[taken++]];
        return order[..taken];
    }

    [Fact]
    public void Panels_packed_into_a_reused_buffer_equal_fresh_ones()
    {
        int n = 45, d = 12;   // not a multiple of the panel width: the last panel has padding keys
        float[] buffer = new PackedPanels(TestData.Normal(n * d, 1), n, d).Data;
        float[] second = TestData.Normal(n * d, 2);
        Array.Fill(buffer, 7f);                                        // stale contents, padding included
        var reused = new PackedPanels(second, n, d, buffer);
        Assert.Same(buffer, reused.Data);
        Assert.Equal(new PackedPanels(second, n, d).Data, reused.Data);
    }

    [Fact]
    public void Packed_panels_hold_every_key_at_its_place()
    {
        // Head dims a multiple of 8 take the 8 × 8 transposes for whole panels; the others and the last partial panel
        // the element-wise path.
        foreach (int d in new[] { 7, 40, 64, 80, 128, 256 })
            foreach (int n in new[] { 1, 7, 97, 257, 1025 })
            {
                float[] keys = TestData.Normal(n * d, n + d);
                var packed = new PackedPanels(keys, n, d);
                Assert.Equal(packed.Data, new PackedPanels(new ArrayRows(keys, d), n, d).Data);   // packed as read from a source
                int w = packed.Width;
                for (int j = 0; j < n; j++)
                    for (int c = 0; c < d; c++)
                        Assert.Equal(keys[(j * d) + c], packed.Data[((long)(j / w) * d * w) + ((long)c * w) + (j % w)]);
                for (int j = n; j < (n + w - 1) / w * w; j++)
                    for (int c = 0; c < d; c++)
                        Assert.Equal(0f, packed.Data[((long)(j / w) * d * w) + ((long)c * w) + (j % w)]);
            }
    }

    /// <summary>
    /// The score product reads the executor's K panels ([D][64], <see cref="Attend.Cpu.PackedKv"/>) in place and gets
    /// exactly the scores it gets from its own panels: every key, every offset the selectors use, padding never read.
    /// </summary>
    [Fact]
    public void Scores_from_the_executors_key_panels_equal_scores_from_packed_panels()
    {
        foreach (int d in new[] { 7, 40, 64, 80, 128, 256 })
            foreach (int n in new[] { 1, 7, 97, 257, 1025 })
            {
                const int kvHeads = 2, m = 6;
                float[] kv = TestData.Normal(n * kvHeads * d, n + d);
                var k = new Attend.Tensors.TensorView<float>(kv, 1, n, kvHeads, d);
                var shape = new AttentionShape(1, n, n, kvHeads, kvHeads, d, d);
                using var executor = Attend.Cpu.PackedKv.Pack(k, k, shape, threads: 2);
                float[] a = TestData.Normal(m * d, 3 * n);
                for (int hk = 0; hk < kvHeads; hk++)
                {
                    float[] rows = new float[n * d];
                    for (int j = 0; j < n; j++)
                        for (int c = 0; c < d; c++) rows[(j * d) + c] = kv[(((j * kvHeads) + hk) * d) + c];
                    var own = new PackedPanels(rows, n, d);
                    PackedPanels shared = executor.KeyPanels(0, hk);
                    foreach (int j0 in new[] { 0, 64, 128 }.Where(j => j < n))
                    {
                        int count = n - j0;
                        float[] expected = new float[m * count], actual = new float[m * count];
                        ScoreGemm.Multiply(a, m, d, own, j0, count, expected);
                        ScoreGemm.Multiply(a, m, d, shared, j0, count, actual);
                        Assert.Equal(expected, actual);
                    }
                }
                if (n > 32)
                {
                    // An offset inside an executor panel (a multiple of the product's width, not of the panels' 64): refused.
                    Assert.Throws<ArgumentException>(() => ScoreGemm.Multiply(a, m, d, executor.KeyPanels(0, 0), 32, n - 32, new float[m * n]));
                }
            }
    }

    /// <summary>SALE's vector quantization gives the scalar loop's integers and scale: ties to even, clamping, non-finite rows.</summary>
    [Fact]
    public void Sale_quantization_vectors_equal_the_scalar_loop()
    {
        var rng = new Random(3);
        foreach (int d in new[] { 16, 40, 64, 80, 128, 130, 256 })
            foreach (int levels in new[] { 7, 127 })
                for (int trial = 0; trial < 20; trial++)
                {
                    float[] x = TestData.Normal(d, (d * 100) + trial);
                    if (trial % 4 == 1)
                    {
                        // Exact halves after scaling: max |x| = levels, so x / scale = x.
                        for (int c = 0; c < d; c++) x[c] = (float)(Math.Floor(rng.NextDouble() * 2 * levels) - levels + 0.5);
                        x[0] = levels;
                    }
                    if (trial == 2) x[rng.Next(d)] = float.NaN;
                    if (trial == 3) x[rng.Next(d)] = float.PositiveInfinity;
                    if (trial == 6) Array.Clear(x);
                    sbyte[] vector = new sbyte[d + 4], scalar = new sbyte[d + 4];
                    float vectorScale = SaleSelector.Quantize(x, vector, levels), scalarScale = SaleSelector.Quantize(x, scalar, levels, vectors: false);
                    Assert.Equal(scalarScale, vectorScale);
                    Assert.Equal(scalar, vector);
                }
    }

    [Fact]
    public void Nearest_centroids_match_float64_argmax()
    {
        foreach ((int n, int k, int d) in new[] { (1, 1, 8), (97, 7, 40), (300, 70, 64) })
        {
            float[] rows = TestData.Normal(n * d, n), centroids = TestData.Normal(k * d, k);
            float[] bias = TestData.Normal(k, d);
            var assignment = new int[n];
            ScoreGemm.AssignNearest(rows, d, new PackedPanels(centroids, k, d), bias, assignment, new float[64 * k]);
            for (int i = 0; i < n; i++)
            {
                double[] exact = [.. Enumerable.Range(0, k).Select(c => Enumerable.Range(0, d).Sum(t => (double)rows[i * d + t] * centroids[c * d + t]) + bias[c])];
                // The chosen centroid is the float64 best, or within float32 rounding of it.
                Assert.True(exact[assignment[i]] >= exact.Max() - 1e-4, $"row {i}: {exact[assignment[i]]} vs {exact.Max()}");
            }
        }
        var nan = new float[8];
        nan[3] = float.NaN;
        var one = new int[1];
        ScoreGemm.AssignNearest(nan, 8, new PackedPanels(TestData.Normal(16, 1), 2, 8), new float[2], one, new float[128]);
        Assert.Equal(0, one[0]);                                       // a NaN row keeps centroid 0
    }
}
