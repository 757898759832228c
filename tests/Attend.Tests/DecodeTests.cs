using Attend.Decode;
using Attend.Reference;
using Attend.Tensors;

namespace Attend.Tests;

public sealed class DecodeTests
{
    private static float Round(float x, DType dtype) => dtype switch
    {
        DType.Float16 => (float)(Half)x,
        DType.BFloat16 => (float)(BFloat16)x,
        _ => x,
    };

    [Theory]
    [InlineData(DType.Float32, 1)]
    [InlineData(DType.Float16, 1)]
    [InlineData(DType.BFloat16, 3)]
    [InlineData(DType.Float32, 5)]
    public void Should_match_the_reference_with_split_pages_and_gqa(DType storage, int nq)
    {
        int length = 300, hkv = 2, h = 4, d = 40, dv = 24;
        var cache = new KvCache(layers: 2, hkv, d, dv, storage, pageSize: 64);
        int seq = cache.AddSequence();
        float[] kData = TestData.Normal(length * hkv * d, 1), vData = TestData.Normal(length * hkv * dv, 2);
        // Append in uneven pieces so pages fill across calls.
        int done = 0;
        foreach (int piece in new[] { 1, 70, 129, 100 })
        {
            cache.Append(seq, 1, new TensorView<float>(kData, (long)done * hkv * d, [piece, hkv, d], TensorView<float>.ContiguousStrides([piece, hkv, d])),
                new TensorView<float>(vData, (long)done * hkv * dv, [piece, hkv, dv], TensorView<float>.ContiguousStrides([piece, hkv, dv])));
            done += piece;
        }
        Assert.Equal(length, cache.Length(seq, 1));
        var q = new TensorView<float>(TestData.Normal(nq * h * d, 3), nq, h, d);
        var o = new TensorView<float>(new float[nq * h * dv], nq, h, dv);
        var lse = new TensorView<float>(new float[nq * h], nq, h);
        DecodeAttention.Forward(q, cache, seq, 1, o, lse: lse, tuning: new KernelTuning { Threads = 2 });

        var kRef = new TensorView<float>(kData.Select(x => Round(x, storage)).ToArray(), 1, length, hkv, d);
        var vRef = new TensorView<float>(vData.Select(x => Round(x, storage)).ToArray(), 1, length, hkv, dv);
        var qRef = new TensorView<float>(q.ToArray(), 1, nq, h, d);
        ReferenceResult expected = AttentionReference.Forward(qRef, kRef, vRef, new AttentionOptions { Causal = true });
        for (int t = 0; t < nq; t++)
            for (int hh = 0; hh < h; hh++)
            {
                Assert.True(Math.Abs(lse[t, hh] - expected.LseAt(0, t, hh)) < 1e-4, $"lse t={t} h={hh}");
                for (int c = 0; c < dv; c++) Assert.True(Math.Abs(o[t, hh, c] - expected.At(0, t, hh, c)) < 2e-6, $"t={t} h={hh} c={c}: {o[t, hh, c]} vs {expected.At(0, t, hh, c)}");
            }
    }

    [Fact]
    public void Should_truncate_fork_and_keep_page_summaries()
    {
        var cache = new KvCache(1, 1, 4, storage: DType.Float32, pageSize: 8);
        int seq = cache.AddSequence();
        float[] k = Enumerable.Range(0, 20 * 4).Select(i => (float)(i % 13) - 6).ToArray();
        cache.Append(seq, 0, new TensorView<float>(k, 20, 1, 4), new TensorView<float>(k.ToArray(), 20, 1, 4));
        int fork = cache.Fork(seq);
        cache.Truncate(seq, 10);
        Assert.Equal(10, cache.Length(seq));
        Assert.Equal(20, cache.Length(fork));
        KvCache.Page second = cache.Pages(seq, 0)[1];
        Assert.Equal(2, second.Count);
        for (int c = 0; c < 4; c++)
        {
            float a = k[8 * 4 + c], b = k[9 * 4 + c];
            Assert.Equal(MathF.Min(a, b), second.Min[c]);
            Assert.Equal(MathF.Max(a, b), second.Max[c]);
            Assert.Equal((a + b) / 2, second.Mean[c], 5);
        }
        Assert.Equal(5 * cache.PageBytes, cache.MemoryBytes);
    }

    [Fact]
    public void Should_reject_bad_decode_input_without_partial_appends()
    {
        var cache = new KvCache(1, 2, 8, storage: DType.Float16, pageSize: 4, memoryCapBytes: 2 * (2L * 4 * 16 * 2 + 3 * 2 * 8 * 4));
        int seq = cache.AddSequence();
        var q = new TensorView<float>(new float[2 * 8], 1, 2, 8);
        var o = new TensorView<float>(new float[2 * 8], 1, 2, 8);
        Assert.Throws<InvalidOperationException>(() => DecodeAttention.Forward(q, cache, seq, 0, o));
        Assert.Contains("Hkv=2", Assert.Throws<ArgumentException>(() => cache.Append(seq, 0, new TensorView<float>(new float[24], 1, 3, 8), new TensorView<float>(new float[24], 1, 3, 8))).Message);
        Assert.Contains("D=8", Assert.Throws<ArgumentException>(() => cache.Append(seq, 0, new TensorView<float>(new float[14], 1, 2, 7), new TensorView<float>(new float[16], 1, 2, 8))).Message);
        cache.Append(seq, 0, new TensorView<float>(TestData.Normal(5 * 16, 1), 5, 2, 8), new TensorView<float>(TestData.Normal(5 * 16, 2), 5, 2, 8));
        // Two pages now; four more tokens would need a third page past the cap: nothing may change.
        long before = cache.MemoryBytes;
        Assert.Contains("cap", Assert.Throws<InvalidOperationException>(() =>
            cache.Append(seq, 0, new TensorView<float>(TestData.Normal(4 * 16, 3), 4, 2, 8), new TensorView<float>(TestData.Normal(4 * 16, 4), 4, 2, 8))).Message);
        Assert.Equal(5, cache.Length(seq));
        Assert.Equal(before, cache.MemoryBytes);
        Assert.Throws<ArgumentOutOfRangeException>(() => cache.Truncate(seq, 9));
        Assert.Throws<ArgumentException>(() => DecodeAttention.Forward(new TensorView<float>(new float[24], 1, 3, 8), cache, seq, 0, o));
        Assert.Throws<ArgumentOutOfRangeException>(() => new KvCache(1, 1, 8, pageSize: 0));
    }

    private static (KvCache Cache, int Seq) RandomCache(int length, int hkv, int d, int pageSize, int seed)
    {
        var cache = new KvCache(1, hkv, d, storage: DType.Float32, pageSize: pageSize);
        int seq = cache.AddSequence();
        cache.Append(seq, 0, new TensorView<float>(TestData.Normal(length * hkv * d, seed), length, hkv, d), new TensorView<float>(TestData.Normal(length * hkv * d, seed + 1), length, hkv, d));
        return (cache, seq);
    }

    [Fact]
    public void Should_equal_dense_when_a_policy_budget_covers_the_cache()
    {
        (KvCache cache, int seq) = RandomCache(200, 2, 16, 16, 5);
        var q = new TensorView<float>(TestData.Normal(4 * 16, 9), 1, 4, 16);
        var dense = new TensorView<float>(new float[4 * 16], 1, 4, 16);
        long densePages = DecodeAttention.Forward(q, cache, seq, 0, dense);
        Assert.Equal(2 * 13, densePages);
        foreach (IKvSelectionPolicy policy in new IKvSelectionPolicy[] { new QuestPolicy(10_000), new StreamingPolicy(0, 200) })
        {
            var o = new TensorView<float>(new float[4 * 16], 1, 4, 16);
            Assert.Equal(densePages, DecodeAttention.Forward(q, cache, seq, 0, o, new DecodeOptions { Policy = policy }));
            Assert.Equal(dense.ToArray(), o.ToArray());
        }
    }

    [Fact]
    public void Should_find_a_needle_with_quest_and_keep_sinks_and_recent_pages_with_streaming()
    {
        int length = 1024, d = 32, ps = 32;
        (KvCache cache, int seq) = RandomCache(length, 1, d, ps, 11);
        // A needle: key 300 (page 9) equals 6x the query direction, so it dominates the attention.
        float[] dir = TestData.Normal(d, 12);
        var cache2 = new KvCache(1, 1, d, storage: DType.Float32, pageSize: ps);
        int seq2 = cache2.AddSequence();
        float[] keys = TestData.Normal(length * d, 11);
        for (int c = 0; c < d; c++) keys[300 * d + c] = 6 * dir[c];
        cache2.Append(seq2, 0, new TensorView<float>(keys, length, 1, d), new TensorView<float>(TestData.Normal(length * d, 13), length, 1, d));
        var q = new TensorView<float>(dir.ToArray(), 1, 1, d);
        var quest = new QuestPolicy(4 * ps);
        IReadOnlyList<int> pages = quest.SelectPages(cache2, seq2, 0, 0, dir.Select(x => x / MathF.Sqrt(d)).ToArray(), 1);
        Assert.Contains(300 / ps, pages);
        Assert.Contains(length / ps - 1, pages);
        Assert.Equal(4, pages.Count);
        var dense = new TensorView<float>(new float[d], 1, 1, d);
        var sparse = new TensorView<float>(new float[d], 1, 1, d);
        DecodeAttention.Forward(q, cache2, seq2, 0, dense);
        long read = DecodeAttention.Forward(q, cache2, seq2, 0, sparse, new DecodeOptions { Policy = quest });
        Assert.Equal(4, read);
        double err = Math.Sqrt(dense.ToArray().Zip(sparse.ToArray()).Sum(p => (p.First - p.Second) * (p.First - p.Second)) / dense.ToArray().Sum(x => x * x));
        Assert.True(err < 0.05, $"relative L2 error {err}");
        IReadOnlyList<int> streaming = new StreamingPolicy(40, 100).SelectPages(cache, seq, 0, 0, new float[d], 1);
        Assert.Equal([0, 1, 28, 29, 30, 31], streaming);
        Assert.Throws<ArgumentOutOfRangeException>(() => new QuestPolicy(0));
        Assert.Throws<ArgumentOutOfRangeException>(() => new StreamingPolicy(0, 0));
    }
}
