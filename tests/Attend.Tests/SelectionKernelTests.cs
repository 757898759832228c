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
}
