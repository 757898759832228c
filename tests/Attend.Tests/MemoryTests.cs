using Attend.Reference;
using Attend.Tensors;

namespace Attend.Tests;

/// <summary>Tests that measure process-wide allocations: they run alone, after the parallel ones.</summary>
[CollectionDefinition("Memory", DisableParallelization = true)]
public sealed class MemoryCollection;

[Collection("Memory")]
public sealed class MemoryTests
{
    [Fact]
    public void Should_run_65536_tokens_without_quadratic_memory()
    {
        // 65536² floats would be 16 GiB; the executor needs O(S·D).
        int s = 65536, d = 16;
        TensorView<float> q = TestData.Random<float>(1, 1, s, 1, d), k = TestData.Random<float>(2, 1, s, 1, d), v = TestData.Random<float>(3, 1, s, 1, d);
        var o = new TensorView<float>(new float[s * d], 1, s, 1, d);
        long before = GC.GetTotalAllocatedBytes(precise: true);
        Attention.Forward(q, k, v, o, new AttentionOptions { Causal = true });
        long allocated = GC.GetTotalAllocatedBytes(precise: true) - before;
        // The only sizeable allocation is the packed K and V panels (O(S·D): a pinned array kept for the next call).
        long packed = 2L * s * d * sizeof(float);
        Assert.True(allocated < packed + (1 << 20), $"managed allocations {allocated} bytes; packed K and V take {packed}");
        // Spot-check rows against the reference on a prefix (causal rows only see their prefix).
        int n = 300;
        var qs = new TensorView<float>(q.ToArray()[..(n * d)], 1, n, 1, d);
        var ks = new TensorView<float>(k.ToArray()[..(n * d)], 1, n, 1, d);
        var vs = new TensorView<float>(v.ToArray()[..(n * d)], 1, n, 1, d);
        ReferenceResult r = AttentionReference.Forward(qs, ks, vs, new AttentionOptions { Causal = true });
        for (int i = 0; i < n; i++)
            for (int c = 0; c < d; c++)
                Assert.True(Math.Abs(r.At(0, i, 0, c) - o[0, i, 0, c]) < 1e-5, $"row {i} col {c}");
    }
}
