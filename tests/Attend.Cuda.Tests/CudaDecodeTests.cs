using Attend.Tensors;

namespace Attend.Cuda.Tests;

/// <summary>Split-K GQA decoding on the GPU against the float64 reference (one query token per sequence).</summary>
public sealed class CudaDecodeTests
{
    private static void OnGpuDecode<T>(TensorView<T> q, TensorView<T> k, TensorView<T> v, TensorView<T> o, TensorView<float> lse, AttentionOptions options)
        where T : unmanaged
    {
        int b = q.Dim(0), h = q.Dim(2), d = q.Dim(3);
        var q3 = new TensorView<T>(q.ToArray(), b, h, d);   // [B, 1, H, D] → [B, H, D]
        using DeviceTensor<T> dq = DeviceTensor<T>.FromHost(q3), dk = DeviceTensor<T>.FromHost(k), dv = DeviceTensor<T>.FromHost(v);
        using DeviceTensor<T> dO = DeviceTensor<T>.Allocate(b, h, d);
        using DeviceTensor<float> dl = DeviceTensor<float>.Allocate(b, h);
        CudaDecode.Forward(dq, dk, dv, dO, options.Scale, dl);
        T[] host = dO.ToHost();
        float[] hostLse = dl.ToHost();
        for (int bb = 0; bb < b; bb++)
            for (int hh = 0; hh < h; hh++)
            {
                lse[bb, 0, hh] = hostLse[bb * h + hh];
                for (int c = 0; c < d; c++) o[bb, 0, hh, c] = host[(bb * h + hh) * d + c];
            }
    }

    public static TheoryData<int, int, int, int, int> Shapes() => new()
    {
        { 1, 1, 4, 1, 64 },
        { 2, 97, 8, 2, 128 },
        { 1, 1025, 32, 8, 128 },
        { 1, 5000, 16, 16, 64 },
        { 2, 300, 4, 4, 256 },
        { 1, 77, 16, 1, 80 },
        { 1, 70000, 8, 2, 128 },
    };

    [CudaTheory]
    [MemberData(nameof(Shapes))]
    public void Should_match_the_reference(int b, int skv, int h, int hkv, int d)
    {
        AttentionConformance.Check<BFloat16>(b, 1, skv, h, hkv, d, new AttentionOptions(), "cuda decode", OnGpuDecode);
        AttentionConformance.Check<Half>(b, 1, skv, h, hkv, d, new AttentionOptions { Scale = 0.05f }, "cuda decode f16", OnGpuDecode);
    }

    [CudaFact]
    public void Should_name_bad_input()
    {
        using DeviceTensor<BFloat16> q = DeviceTensor<BFloat16>.Allocate(1, 32, 128), k = DeviceTensor<BFloat16>.Allocate(1, 64, 8, 128), o = DeviceTensor<BFloat16>.Allocate(1, 32, 128);
        using DeviceTensor<BFloat16> k3 = DeviceTensor<BFloat16>.Allocate(1, 64, 3, 128), q17 = DeviceTensor<BFloat16>.Allocate(1, 17, 128), o17 = DeviceTensor<BFloat16>.Allocate(1, 17, 128);
        using DeviceTensor<BFloat16> k1 = DeviceTensor<BFloat16>.Allocate(1, 64, 1, 128);
        Assert.Equal("k", Assert.Throws<ArgumentException>(() => CudaDecode.Forward(q, k3, k3, o)).ParamName);
        Assert.Equal("output", Assert.Throws<ArgumentException>(() => CudaDecode.Forward(q, k, k, q17)).ParamName);
        Assert.Contains("16 rows", Assert.Throws<NotSupportedException>(() => CudaDecode.Forward(q17, k1, k1, o17)).Message);
        using DeviceTensor<float> f = DeviceTensor<float>.Allocate(1, 32, 128), fk = DeviceTensor<float>.Allocate(1, 64, 8, 128);
        Assert.Throws<NotSupportedException>(() => CudaDecode.Forward(f, fk, fk, f));
    }
}
