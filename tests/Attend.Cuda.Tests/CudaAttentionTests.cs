using Attend.Tensors;

namespace Attend.Cuda.Tests;

/// <summary>The backend-agnostic dense suite on the GPU, against the float64 reference on the CPU.</summary>
public sealed class CudaAttentionTests
{
    public static TheoryData<int, int, int, int, int, int, bool> Shapes() => AttentionConformance.Shapes();

    internal static void OnGpu<T>(TensorView<T> q, TensorView<T> k, TensorView<T> v, TensorView<T> o, TensorView<float> lse, AttentionOptions options)
        where T : unmanaged => OnGpu(q, k, v, o, lse, options, null);

    /// <summary>As the runner above; with <paramref name="plan"/>, through the device-plan overload.</summary>
    internal static void OnGpu<T>(TensorView<T> q, TensorView<T> k, TensorView<T> v, TensorView<T> o, TensorView<float> lse, AttentionOptions options, DeviceBlockPlan? plan)
        where T : unmanaged
    {
        using DeviceTensor<T> dq = DeviceTensor<T>.FromHost(q), dk = DeviceTensor<T>.FromHost(k), dv = DeviceTensor<T>.FromHost(v);
        using DeviceTensor<T> dO = DeviceTensor<T>.Allocate(o.Shape.ToArray());
        using DeviceTensor<float> dl = DeviceTensor<float>.Allocate(lse.Shape.ToArray());
        if (plan is null) Attention.Forward(dq, dk, dv, dO, options, dl);
        else CudaAttention.Forward(dq, dk, dv, dO, plan, options, dl);
        T[] host = dO.ToHost();
        float[] hostLse = dl.ToHost();
        int i = 0;
        for (int b = 0; b < o.Dim(0); b++)
            for (int s = 0; s < o.Dim(1); s++)
                for (int h = 0; h < o.Dim(2); h++)
                {
                    lse[b, s, h] = hostLse[(b * o.Dim(1) + s) * o.Dim(2) + h];
                    for (int d = 0; d < o.Dim(3); d++) o[b, s, h, d] = host[i++];
                }
    }

    [CudaTheory]
    [MemberData(nameof(Shapes))]
    public void Should_match_reference_in_bf16(int b, int sq, int skv, int h, int hkv, int d, bool causal) =>
        AttentionConformance.Check<BFloat16>(b, sq, skv, h, hkv, d, new AttentionOptions { Causal = causal }, "cuda", OnGpu);

    [CudaTheory]
    [MemberData(nameof(Shapes))]
    public void Should_match_reference_in_f16(int b, int sq, int skv, int h, int hkv, int d, bool causal) =>
        AttentionConformance.Check<Half>(b, sq, skv, h, hkv, d, new AttentionOptions { Causal = causal }, "cuda", OnGpu);

    [CudaTheory]
    [MemberData(nameof(Shapes))]
    public void Should_match_reference_in_f32_through_bf16(int b, int sq, int skv, int h, int hkv, int d, bool causal) =>
        AttentionConformance.Check<float>(b, sq, skv, h, hkv, d, new AttentionOptions { Causal = causal }, "cuda", OnGpu, DType.BFloat16);

    /// <summary>
    /// Each kernel path on the H100 — mma.sync only (0), wgmma for Q·Kᵀ (1), wgmma for both products (2, the default) —
    /// on awkward shapes of the two head dims that have wgmma variants, with causal, GQA, Sq ≠ Skv and softcap.
    /// </summary>
    [CudaTheory]
    [InlineData(0)]
    [InlineData(1)]
    [InlineData(2)]
    public void Should_match_reference_on_every_wgmma_level(int level)
    {
        FlashConfig.ForcedWgmmaLevel.Value = level;
        try
        {
            foreach ((int sq, int skv, int h, int hkv, int d, bool causal) in new[] { (1, 1, 1, 1, 64, false), (97, 257, 4, 2, 64, true), (257, 97, 2, 1, 128, false), (130, 130, 4, 4, 128, true), (1025, 1025, 2, 1, 80, true) })
            {
                AttentionConformance.Check<BFloat16>(1, sq, skv, h, hkv, d, new AttentionOptions { Causal = causal }, $"cuda wgmma={level}", OnGpu);
                AttentionConformance.Check<Half>(1, sq, skv, h, hkv, d, new AttentionOptions { Causal = causal, Softcap = 3f }, $"cuda wgmma={level}", OnGpu);
            }
        }
        finally
        {
            FlashConfig.ForcedWgmmaLevel.Value = null;
        }
    }

    [CudaTheory]
    [InlineData(false)]
    [InlineData(true)]
    public void Should_match_reference_with_softcap_and_scale(bool causal) =>
        AttentionConformance.Check<BFloat16>(2, 97, 130, 4, 2, 64, new AttentionOptions { Causal = causal, Softcap = 2.5f, Scale = 0.3f }, "cuda", OnGpu);

    [CudaFact]
    public void Should_give_zero_output_and_minus_infinity_lse_for_fully_masked_rows()
    {
        TensorView<BFloat16> q = TestData.Random<BFloat16>(1, 1, 20, 2, 64), k = TestData.Random<BFloat16>(2, 1, 5, 2, 64), v = TestData.Random<BFloat16>(3, 1, 5, 2, 64);
        var o = new TensorView<BFloat16>(new BFloat16[20 * 2 * 64], 1, 20, 2, 64);
        var lse = new TensorView<float>(new float[40], 1, 20, 2);
        OnGpu(q, k, v, o, lse, new AttentionOptions { Causal = true });
        for (int i = 0; i < 15; i++)
        {
            Assert.True(float.IsNegativeInfinity(lse[0, i, 1]));
            Assert.Equal(0f, (float)o[0, i, 1, 5]);
        }
    }

    [CudaFact]
    public void Should_accept_permuted_strides()
    {
        // A [B, H, S, D] buffer given as a heads-last view: the kernel reads it directly (strides fit).
        int b = 1, s = 70, h = 3, d = 64;
        TensorView<BFloat16> q = TestData.Random<BFloat16>(5, b, s, h, d), k = TestData.Random<BFloat16>(6, b, s, h, d), v = TestData.Random<BFloat16>(7, b, s, h, d);
        using DeviceTensor<BFloat16> dq = DeviceTensor<BFloat16>.FromHost(q.Permute(0, 2, 1, 3));
        using DeviceTensor<BFloat16> dk = DeviceTensor<BFloat16>.FromHost(k), dv = DeviceTensor<BFloat16>.FromHost(v);
        using DeviceTensor<BFloat16> dO = DeviceTensor<BFloat16>.Allocate(b, s, h, d);
        using DeviceTensor<BFloat16> heads = dq.Permute(0, 2, 1, 3);
        Attention.Forward(heads, dk, dv, dO, new AttentionOptions { Causal = true });
        var expected = new TensorView<BFloat16>(new BFloat16[b * s * h * d], b, s, h, d);
        Attention.Forward(q, k, v, expected, new AttentionOptions { Causal = true });
        BFloat16[] got = dO.ToHost();
        BFloat16[] want = expected.ToArray();
        for (int i = 0; i < got.Length; i++) Assert.True(Math.Abs((float)got[i] - (float)want[i]) < 0.02f, $"element {i}: {got[i]} vs {want[i]}");
    }

    [CudaFact]
    public void Should_name_unsupported_options_and_shapes()
    {
        using DeviceTensor<BFloat16> x = DeviceTensor<BFloat16>.Allocate(1, 8, 2, 64), o = DeviceTensor<BFloat16>.Allocate(1, 8, 2, 64);
        Assert.Throws<NotSupportedException>(() => Attention.Forward(x, x, x, o, new AttentionOptions { AlibiSlopes = [1f, 1f] }));
        using DeviceTensor<BFloat16> big = DeviceTensor<BFloat16>.Allocate(1, 8, 2, 320), bigO = DeviceTensor<BFloat16>.Allocate(1, 8, 2, 320);
        Assert.Throws<NotSupportedException>(() => Attention.Forward(big, big, big, bigO));
        using DeviceTensor<BFloat16> wrong = DeviceTensor<BFloat16>.Allocate(1, 8, 3, 64);
        Assert.Equal("k", Assert.ThrowsAny<ArgumentException>(() => Attention.Forward(x, wrong, x, o)).ParamName);
        Assert.Equal("output", Assert.ThrowsAny<ArgumentException>(() => Attention.Forward(x, x, x, x)).ParamName);
    }

    [CudaFact]
    public void Should_not_leak_device_memory_over_many_calls_with_failures()
    {
        CudaDevice device = CudaBackend.Device;
        TensorView<BFloat16> q = TestData.Random<BFloat16>(1, 1, 64, 2, 64);
        using DeviceTensor<BFloat16> dq = DeviceTensor<BFloat16>.FromHost(q), dO = DeviceTensor<BFloat16>.Allocate(1, 64, 2, 64);
        using DeviceTensor<float> f = DeviceTensor<float>.FromHost(TestData.Random<float>(2, 1, 64, 2, 64));
        using DeviceTensor<float> fo = DeviceTensor<float>.Allocate(1, 64, 2, 64);
        using DeviceTensor<BFloat16> wrong = DeviceTensor<BFloat16>.Allocate(1, 64, 3, 64);
        device.Synchronize();
        long liveBefore = DeviceMemory.LiveBuffers;
        (long freeBefore, _) = device.MemoryInfo();
        for (int i = 0; i < 10_000; i++)
        {
            switch (i % 4)
            {
                case 0: Attention.Forward(dq, dq, dq, dO, new AttentionOptions { Causal = true }); break;
                case 1: Attention.Forward(f, f, f, fo); break;               // temporaries for conversion
                case 2: Assert.ThrowsAny<ArgumentException>(() => Attention.Forward(dq, wrong, dq, dO)); break;
                default: Assert.Throws<NotSupportedException>(() => Attention.Forward(dq, dq, dq, dO, new AttentionOptions { Predicate = (_, _, _, _) => true })); break;
            }
        }
        device.Synchronize();
        (long freeAfter, _) = device.MemoryInfo();
        Assert.Equal(liveBefore, DeviceMemory.LiveBuffers);
        Assert.True(freeBefore - freeAfter < 8 << 20, $"free device memory fell by {(freeBefore - freeAfter) >> 20} MiB");
    }
}
