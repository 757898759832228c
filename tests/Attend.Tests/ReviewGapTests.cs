using Attend.Decode;
using Attend.Masks;
using Attend.Sparse;
using Attend.Tensors;

namespace Attend.Tests;

/// <summary>Bad input of the newer public entry points, and the estimate kernel against float64.</summary>
public sealed class ReviewGapTests
{
    [Fact]
    public void Metrics_and_small_entry_points_reject_bad_input()
    {
        TensorView<float> a = TestData.Random<float>(1, 1, 8, 2, 4), b = TestData.Random<float>(2, 1, 8, 3, 4);
        Assert.Equal("actual", Assert.Throws<ArgumentException>(() => Metrics.RelativeL2(a, b)).ParamName);
        Assert.Throws<ArgumentOutOfRangeException>(() => Metrics.Cosine(a, a, head: 2));
        var lse = new TensorView<float>(new float[16], 1, 8, 2);
        var lse3 = new TensorView<float>(new float[24], 1, 8, 3);
        Assert.Throws<ArgumentException>(() => Metrics.AttentionRecall(lse, lse3));
        Assert.Throws<ArgumentOutOfRangeException>(() => Metrics.TopKeyMassShare(a, a, head: 5));
        Assert.Throws<ArgumentOutOfRangeException>(() => Mask.BlockCausal(0));
        Assert.Throws<ArgumentOutOfRangeException>(() => new QuestPolicy(64, recentTokens: -1));
        Assert.Throws<ArgumentOutOfRangeException>(() => a.Slice(1, 5, 4));
        Assert.Throws<ArgumentOutOfRangeException>(() => a.Slice(4, 0, 1));
        Assert.Throws<ArgumentException>(() => CalibratedHeads.FromJson("null"));
        Assert.Throws<ArgumentOutOfRangeException>(() => SparseCalibration.Calibrate(a, a, a, -1));
    }

    [Fact]
    public void The_estimate_kernel_matches_float64_on_awkward_sizes()
    {
        foreach ((int m, int n, int d) in new[] { (1, 1, 1), (7, 33, 40), (97, 130, 64), (4, 64, 7), (70, 1100, 24) })   // the last: several 512-key chunks, a tail, 2 rows past the groups of 4
        {
            float[] x = TestData.Normal(m * d, m + n), y = TestData.Normal(n * d, d);
            var c = new float[m * n];
            ScoreGemm.Multiply(x, m, d, new PackedPanels(y, n, d), 0, n, c);
            double naive = 0, error = 0;
            for (int i = 0; i < m; i++)
                for (int j = 0; j < n; j++)
                {
                    double exact = 0;
                    float single = 0;
                    for (int t = 0; t < d; t++)
                    {
                        exact += (double)x[i * d + t] * y[j * d + t];
                        single += x[i * d + t] * y[j * d + t];
                    }
                    naive = Math.Max(naive, Math.Abs(single - exact));
                    error = Math.Max(error, Math.Abs(c[i * n + j] - exact));
                }
            Assert.True(error <= 2 * naive + 1e-6, $"m={m} n={n} d={d}: error {error:E2} > 2×naive {naive:E2} + 1e-6");
        }
    }
}
