using Attend.Reference;
using Attend.Tensors;

namespace Attend.Tests;

public sealed class AttentionMergeTests
{
    [Fact]
    public void Should_merge_split_keys_into_the_whole_result()
    {
        // Attention over keys [0, 100) and [100, 250) merged by LSE equals attention over all 250 keys.
        int sq = 37, h = 3, d = 40;
        TensorView<float> q = TestData.Random<float>(1, 1, sq, h, d);
        float[] kAll = TestData.Normal(250 * h * d, 2), vAll = TestData.Normal(250 * h * d, 3);
        var k = new TensorView<float>(kAll, 1, 250, h, d);
        var v = new TensorView<float>(vAll, 1, 250, h, d);
        var parts = new List<TensorView<float>>();
        var lses = new List<TensorView<float>>();
        foreach ((int start, int length) in new[] { (0, 100), (100, 150) })
        {
            var ks = new TensorView<float>(kAll, (long)start * h * d, [1, length, h, d], TensorView<float>.ContiguousStrides([1, length, h, d]));
            var vs = new TensorView<float>(vAll, (long)start * h * d, [1, length, h, d], TensorView<float>.ContiguousStrides([1, length, h, d]));
            var o = new TensorView<float>(new float[sq * h * d], 1, sq, h, d);
            var l = new TensorView<float>(new float[sq * h], 1, sq, h);
            Attention.Forward(q, ks, vs, o, lse: l);
            parts.Add(o);
            lses.Add(l);
        }
        var merged = new TensorView<float>(new float[sq * h * d], 1, sq, h, d);
        var mergedLse = new TensorView<float>(new float[sq * h], 1, sq, h);
        AttentionMerge.Merge(parts, lses, merged, mergedLse);
        ReferenceResult expected = AttentionReference.Forward(q, k, v);
        Assert.True(TestData.MaxError(merged, expected) < 2e-6);
        Assert.True(TestData.MaxLseError(mergedLse, expected) < 2e-5);
    }

    [Fact]
    public void Should_ignore_empty_parts_and_zero_fully_empty_rows()
    {
        var o1 = new TensorView<float>([1f, 2f], 1, 1, 1, 2);
        var o2 = new TensorView<float>([9f, 9f], 1, 1, 1, 2);
        var l1 = new TensorView<float>([0.5f], 1, 1, 1);
        var l2 = new TensorView<float>([float.NegativeInfinity], 1, 1, 1);
        var o = new TensorView<float>(new float[2], 1, 1, 1, 2);
        var l = new TensorView<float>(new float[1], 1, 1, 1);
        AttentionMerge.Merge([o1, o2], [l1, l2], o, l);
        Assert.Equal([1f, 2f], o.ToArray());
        Assert.Equal(0.5f, l[0, 0, 0], 6);
        AttentionMerge.Merge([o2], [l2], o, l);
        Assert.Equal([0f, 0f], o.ToArray());
        Assert.True(float.IsNegativeInfinity(l[0, 0, 0]));
    }

    [Fact]
    public void Should_reject_mismatched_parts()
    {
        var o1 = new TensorView<float>(new float[4], 1, 2, 1, 2);
        var o2 = new TensorView<float>(new float[2], 1, 1, 1, 2);
        var l1 = new TensorView<float>(new float[2], 1, 2, 1);
        Assert.Throws<ArgumentException>(() => AttentionMerge.Merge([o1, o2], [l1, l1], o1));
        Assert.Throws<ArgumentException>(() => AttentionMerge.Merge([o1], [l1, l1], o1));
    }
}
