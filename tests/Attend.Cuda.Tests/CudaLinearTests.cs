using Attend.Linear;
using Attend.Tensors;

namespace Attend.Cuda.Tests;

/// <summary>Linear attention on the GPU against the float64 quadratic form (LinearReference), as the CPU kernel is.</summary>
public sealed class CudaLinearTests
{
    private static double MaxRelativeError(float[] actual, double[] expected)
    {
        double scale = Math.Max(1e-3, expected.Max(Math.Abs)), max = 0;
        for (int i = 0; i < actual.Length; i++) max = Math.Max(max, Math.Abs(actual[i] - expected[i]));
        return max / scale;
    }

    [CudaTheory]
    [InlineData(1, 97, 2, 1, 40, 24)]
    [InlineData(2, 130, 4, 2, 64, 64)]
    [InlineData(1, 257, 2, 2, 128, 80)]
    [InlineData(1, 1, 1, 1, 16, 8)]
    [InlineData(1, 1025, 4, 2, 80, 128)]          // 33 chunks: the state scan across many chunks, a partial last one
    public void Should_match_the_quadratic_form_for_every_map(int b, int s, int h, int hkv, int d, int dv)
    {
        TensorView<float> q = TestData.Random<float>(1, b, s, h, d, 0.5f), k = TestData.Random<float>(2, b, s, hkv, d, 0.5f);
        TensorView<float> v = TestData.Random<float>(3, b, s, hkv, dv);
        using DeviceTensor<float> dq = DeviceTensor<float>.FromHost(q), dk = DeviceTensor<float>.FromHost(k), dvv = DeviceTensor<float>.FromHost(v);
        using DeviceTensor<float> o = DeviceTensor<float>.Allocate(b, s, h, dv);
        foreach (FeatureMap map in new[] { FeatureMap.EluPlusOne, FeatureMap.Relu, FeatureMap.Identity })
            foreach (bool causal in new[] { false, true })
            {
                var options = new LinearOptions { FeatureMap = map, Causal = causal, Normalize = map != FeatureMap.Identity };
                if (causal) options = options with { Decay = [.. Enumerable.Range(0, h).Select(i => i % 2 == 0 ? 1f : 0.9f)] };
                CudaLinear.Forward(dq, dk, dvv, o, options);
                double err = MaxRelativeError(o.ToHost(), LinearReference.Forward(q, k, v, options));
                Assert.True(err < 2e-5, $"{map} causal={causal}: relative error {err:E2}");
            }
    }

    [CudaFact]
    public void Should_name_what_the_gpu_does_not_run()
    {
        using DeviceTensor<float> x = DeviceTensor<float>.Allocate(1, 16, 2, 8), o = DeviceTensor<float>.Allocate(1, 16, 2, 8);
        Assert.Throws<NotSupportedException>(() => CudaLinear.Forward(x, x, x, o, new LinearOptions { FeatureMap = FeatureMap.Taylor }));
        Assert.Throws<NotSupportedException>(() => CudaLinear.Forward(x, x, x, o, new LinearOptions { FeatureMap = FeatureMap.Relu, ValueConv = new DepthwiseConv(new float[24], 3) }));
        using DeviceTensor<float> wrong = DeviceTensor<float>.Allocate(1, 16, 2, 7);
        Assert.ThrowsAny<ArgumentException>(() => CudaLinear.Forward(x, x, x, wrong));
        Assert.Contains("(0, 1]", Assert.Throws<ArgumentException>(() => CudaLinear.Forward(x, x, x, o, new LinearOptions { Causal = true, Decay = [float.NaN, 1f] })).Message);
    }
}
