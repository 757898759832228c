using Attend.Masks;
using Attend.Reference;
using Attend.Sparse;
using Attend.Tensors;

namespace Attend.Tests;

public sealed class RowTopKSelectorTests
{
    [Fact]
    public void Should_pick_the_k_largest_like_a_sort()
    {
        var rng = new Random(3);
        foreach (int n in new[] { 1, 2, 7, 64, 65, 200 })
            foreach (int k in new[] { 1, 3, 64 })
            {
                // Many ties: values from a small set.
                float[] scores = Enumerable.Range(0, n).Select(_ => (float)rng.Next(0, 9)).ToArray();
                int[] top = RowTopKSelector.TopIndices(scores, k, new int[n]);
                Assert.Equal(Math.Min(k, n), top.Length);
                Assert.Equal(top.Order(), top);
                float[] expected = [.. scores.OrderDescending().Take(k)];
                Assert.Equal(expected.Order(), top.Select(i => scores[i]).Order());
            }
    }

    [Theory]
    [InlineData(97, 97, 2, 1, 40, true)]
    [InlineData(130, 257, 4, 2, 64, true)]
    [InlineData(65, 65, 2, 2, 80, false)]
    public void Should_keep_each_querys_top_keys_and_attend_to_exactly_them(int sq, int skv, int h, int hkv, int d, bool causal)
    {
        TensorView<float> q = TestData.Random<float>(1, 1, sq, h, d), k = TestData.Random<float>(2, 1, skv, hkv, d), v = TestData.Random<float>(3, 1, skv, hkv, d);
        var selector = new RowTopKSelector { TopK = 16 };
        SparsityPlan plan = selector.Plan(q, k, causal);
        Assert.Null(plan.Blocks);
        long offset = skv - sq;
        for (int hh = 0; hh < h; hh++)
            for (int i = 0; i < sq; i++)
            {
                int[] row = [.. Enumerable.Range(0, skv).Where(j => plan.Allows(0, hh, i, j))];
                int visible = causal ? (int)Math.Min(skv, i + offset + 1) : skv;
                double[] scores = Enumerable.Range(0, visible).Select(j => Enumerable.Range(0, d).Sum(c => (double)q[0, i, hh, c] * k[0, j, hh / (h / hkv), c])).ToArray();
                Assert.Equal(Math.Min(16, visible), row.Length);
                double kth = scores.OrderDescending().ElementAt(Math.Min(16, visible) - 1);
                foreach (int j in row)
                {
                    Assert.True(j < visible, $"row {i} keeps future key {j}");
                    Assert.True(scores[j] >= kth - 1e-4, $"row {i}: key {j} scores {scores[j]} below the 16th best {kth}");
                }
            }
        // The executor runs exactly the plan: against the float64 reference of the same plan.
        var o = new TensorView<float>(new float[sq * h * d], 1, sq, h, d);
        Attention.Forward(q, k, v, o, new AttentionOptions { Plan = plan });
        ReferenceResult expected = AttentionReference.Forward(q, k, v, new AttentionOptions { Plan = plan });
        Assert.True(TestData.MaxError(o, expected) < 2e-5, $"max error {TestData.MaxError(o, expected)}");
    }

    [Fact]
    public void Should_equal_dense_when_k_covers_every_key_and_estimate_through_a_projection()
    {
        int s = 97, h = 2, d = 64;
        TensorView<float> q = TestData.Random<float>(4, 1, s, h, d), k = TestData.Random<float>(5, 1, s, h, d), v = TestData.Random<float>(6, 1, s, h, d);
        var o = new TensorView<float>(new float[s * h * d], 1, s, h, d);
        Attention.Forward(q, k, v, o, new AttentionOptions { Plan = new RowTopKSelector { TopK = s }.Plan(q, k, causal: true) });
        Assert.True(TestData.MaxError(o, AttentionReference.Forward(q, k, v, new AttentionOptions { Causal = true })) < 2e-6);
        // A 16-dimensional estimate still keeps most of each row's true top 16.
        SparsityPlan exact = new RowTopKSelector { TopK = 16 }.Plan(q, k, causal: false);
        SparsityPlan projected = new RowTopKSelector { TopK = 16, EstimateDims = 16, Seed = 1 }.Plan(q, k, causal: false);
        double overlap = 0;
        for (int hh = 0; hh < h; hh++)
            for (int i = 0; i < s; i++)
            {
                int hh2 = hh, i2 = i;
                int[] a = [.. Enumerable.Range(0, s).Where(j => exact.Allows(0, hh2, i2, j))], b = [.. Enumerable.Range(0, s).Where(j => projected.Allows(0, hh2, i2, j))];
                overlap += a.Intersect(b).Count() / 16.0 / (s * h);
            }
        Assert.True(overlap > 0.3, $"overlap {overlap:F3}");
        Assert.Throws<ArgumentOutOfRangeException>(() => new RowTopKSelector { TopK = 0 });
        Assert.Throws<ArgumentOutOfRangeException>(() => new RowTopKSelector { EstimateDims = -1 });
        Assert.IsType<RowTopKSelector>(Selectors.ParseAny("topk:k=32,dims=8"));
        Assert.Throws<ArgumentException>(() => Selectors.ParseAny("topk:kk=3"));
    }
}
