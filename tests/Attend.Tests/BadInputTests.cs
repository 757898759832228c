using Attend.Tensors;

namespace Attend.Tests;

public sealed class BadInputTests
{
    private static TensorView<float> T(int b, int s, int h, int d) => TestData.Random<float>(s * 31 + d, b, s, h, d);

    private static ArgumentException Fails(TensorView<float> q, TensorView<float> k, TensorView<float> v, TensorView<float> o,
        AttentionOptions? options = null, TensorView<float> lse = default, KernelTuning? tuning = null) =>
        Assert.ThrowsAny<ArgumentException>(() => Attention.Forward(q, k, v, o, options, lse, tuning));

    [Fact]
    public void Should_name_mismatched_key_shape()
    {
        var e = Fails(T(2, 16, 8, 32), T(2, 16, 6, 32), T(2, 16, 6, 32), T(2, 16, 8, 32));
        Assert.Equal("k", e.ParamName);
        Assert.Contains("multiple of the key/value heads Hkv=6", e.Message);
        e = Fails(T(2, 16, 8, 32), T(2, 16, 8, 16), T(2, 16, 8, 32), T(2, 16, 8, 32));
        Assert.Contains("k must have shape [B=2, Skv≥1, Hkv≥1, D=32]; got [2, 16, 8, 16]", e.Message);
    }

    [Fact]
    public void Should_name_mismatched_value_and_output_shapes()
    {
        Assert.Equal("v", Fails(T(1, 16, 4, 32), T(1, 16, 4, 32), T(1, 15, 4, 32), T(1, 16, 4, 32)).ParamName);
        var e = Fails(T(1, 16, 4, 32), T(1, 16, 4, 32), T(1, 16, 4, 32), T(1, 16, 4, 31));
        Assert.Equal("output", e.ParamName);
        Assert.Contains("[B=1, Sq=16, H=4, Dv=32]; got [1, 16, 4, 31]", e.Message);
        var lse = new TensorView<float>(new float[16 * 4], 1, 4, 16);
        Assert.Equal("lse", Fails(T(1, 16, 4, 32), T(1, 16, 4, 32), T(1, 16, 4, 32), T(1, 16, 4, 32), lse: lse).ParamName);
    }

    [Fact]
    public void Should_reject_zero_sizes_and_wrong_ranks()
    {
        Assert.Equal("q", Fails(T(1, 0, 4, 32), T(1, 16, 4, 32), T(1, 16, 4, 32), T(1, 0, 4, 32)).ParamName);
        Assert.Equal("k", Fails(T(1, 4, 4, 32), T(1, 0, 4, 32), T(1, 0, 4, 32), T(1, 4, 4, 32)).ParamName);
        var rank3 = new TensorView<float>(new float[64], 4, 4, 4);
        Assert.Contains("rank 3", Fails(rank3, T(1, 4, 4, 4), T(1, 4, 4, 4), T(1, 4, 4, 4)).Message);
        Assert.Contains("got none", Fails(default, T(1, 4, 4, 4), T(1, 4, 4, 4), T(1, 4, 4, 4)).Message);
    }

    [Theory]
    [InlineData(-1f)]
    [InlineData(float.NaN)]
    [InlineData(float.PositiveInfinity)]
    public void Should_reject_bad_scale_and_softcap(float x)
    {
        Assert.Contains("Scale", Fails(T(1, 4, 2, 8), T(1, 4, 2, 8), T(1, 4, 2, 8), T(1, 4, 2, 8), new AttentionOptions { Scale = x }).Message);
        Assert.Contains("Softcap", Fails(T(1, 4, 2, 8), T(1, 4, 2, 8), T(1, 4, 2, 8), T(1, 4, 2, 8), new AttentionOptions { Softcap = x }).Message);
    }

    [Fact]
    public void Should_reject_bad_alibi_bias_and_tuning()
    {
        TensorView<float> x = T(1, 4, 2, 8);
        Assert.Contains("AlibiSlopes", Fails(x, x, x, T(1, 4, 2, 8), new AttentionOptions { AlibiSlopes = [1f, 2f, 3f] }).Message);
        var bias = new TensorView<float>(new float[16], 1, 1, 4, 4);
        Assert.Contains("Bias must have shape [B=1, H=2, Sq=4, Skv=4]", Fails(x, x, x, T(1, 4, 2, 8), new AttentionOptions { Bias = bias }).Message);
        Assert.Contains("BlockQ", Fails(x, x, x, T(1, 4, 2, 8), tuning: new KernelTuning { BlockQ = 6 }).Message);
        Assert.Contains("Threads", Fails(x, x, x, T(1, 4, 2, 8), tuning: new KernelTuning { Threads = -1 }).Message);
    }

    [Fact]
    public void Should_reject_an_output_aliasing_an_input()
    {
        float[] buffer = TestData.Normal(2 * 64 * 2 * 16, 3);
        var q = new TensorView<float>(buffer, 0, [1, 64, 2, 16], TensorView<float>.ContiguousStrides([1, 64, 2, 16]));
        var o = new TensorView<float>(buffer, 64 * 2 * 16 - 1, [1, 64, 2, 16], TensorView<float>.ContiguousStrides([1, 64, 2, 16]));
        var e = Fails(q, T(1, 64, 2, 16), T(1, 64, 2, 16), o);
        Assert.Equal("output", e.ParamName);
        // Disjoint halves of one buffer are fine.
        var o2 = new TensorView<float>(buffer, 64 * 2 * 16, [1, 64, 2, 16], TensorView<float>.ContiguousStrides([1, 64, 2, 16]));
        Attention.Forward(q, T(1, 64, 2, 16), T(1, 64, 2, 16), o2);
    }

    [Fact]
    public void Should_reject_views_outside_their_array_and_negative_strides()
    {
        Assert.Throws<ArgumentException>(() => new TensorView<float>(new float[10], 0, [1, 2, 3, 4], [24, 12, 4, 1]));
        Assert.Throws<ArgumentException>(() => new TensorView<float>(new float[100], 0, [1, 2, 3, 4], [24, -12, 4, 1]));
        Assert.Throws<ArgumentException>(() => new TensorView<float>(new float[100], 0, [2, 3], [1]));
    }

    [Fact]
    public void Should_reject_element_types_attention_does_not_run()
    {
        var d = new TensorView<double>(new double[16], 1, 2, 2, 4);
        Assert.Throws<ArgumentException>(() => Attention.Forward(d, d, d, new TensorView<double>(new double[16], 1, 2, 2, 4)));
    }
}
