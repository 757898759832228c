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
    [InlineData(DType.Float32, 1, 40, 24)]
    [InlineData(DType.Float16, 1, 40, 24)]
    [InlineData(DType.BFloat16, 3, 40, 24)]
    [InlineData(DType.Float32, 5, 40, 24)]
    // Head dims that are multiples of 16 take the wide (AVX-512) page kernels where the machine has them; 48 values
    // end on the 16-column tail; 2 query tokens × group 3 = 6 rows end on a partial block of 4 rows.
    [InlineData(DType.Float32, 1, 64, 48, 6)]
    [InlineData(DType.Float16, 1, 128, 128, 4)]
    [InlineData(DType.Float16, 2, 80, 48, 6)]
    [InlineData(DType.BFloat16, 3, 256, 64, 8)]
    [InlineData(DType.Float16, 1, 16, 16, 2)]
    // The same dims pinned to the 256-bit scratch path.
    [InlineData(DType.Float16, 1, 128, 128, 4, KernelPath.Vector256)]
    [InlineData(DType.BFloat16, 2, 80, 48, 6, KernelPath.Vector256)]
    public void Should_match_the_reference_with_split_pages_and_gqa(DType storage, int nq, int d, int dv, int h = 4, KernelPath path = KernelPath.Auto)
    {
        int length = 300, hkv = 2;
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
        DecodeAttention.Forward(q, cache, seq, 1, o, lse: lse, tuning: new KernelTuning { Threads = 2, Path = path });

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

    [Theory]
    [InlineData(DType.Float16, KernelPath.Auto)]
    [InlineData(DType.Float16, KernelPath.Vector256)]
    [InlineData(DType.BFloat16, KernelPath.Auto)]
    [InlineData(DType.Float32, KernelPath.Auto)]
    public void Should_keep_a_nan_key_or_infinite_value_to_the_rows_that_read_it(DType storage, KernelPath path)
    {
        // Kv head 1 holds a NaN key (token 100) and kv head 0 an infinite value (token 150), both in pages the whole
        // group reads; the f16 pages holding them are widened exactly, and the finite heads beside them stay correct.
        int length = 300, hkv = 3, h = 6, d = 64;
        var cache = new KvCache(1, hkv, d, d, storage, pageSize: 64);
        int seq = cache.AddSequence();
        float[] k = TestData.Normal(length * hkv * d, 41), v = TestData.Normal(length * hkv * d, 42);
        k[(100 * hkv + 1) * d + 5] = float.NaN;
        v[(150 * hkv + 0) * d + 7] = float.PositiveInfinity;
        cache.Append(seq, 0, new TensorView<float>(k, length, hkv, d), new TensorView<float>(v, length, hkv, d));
        var q = new TensorView<float>(TestData.Normal(h * d, 43), 1, h, d);
        var o = new TensorView<float>(new float[h * d], 1, h, d);
        var tuning = new KernelTuning { Path = path };
        DecodeAttention.Forward(q, cache, seq, 0, o, tuning: tuning);
        var kRef = new TensorView<float>(k.Select(x => Round(x, storage)).ToArray(), 1, length, hkv, d);
        var vRef = new TensorView<float>(v.Select(x => Round(x, storage)).ToArray(), 1, length, hkv, d);
        ReferenceResult expected = AttentionReference.Forward(new TensorView<float>(q.ToArray(), 1, 1, h, d), kRef, vRef, new AttentionOptions { Causal = true });
        for (int hh = 0; hh < h; hh++)
            for (int c = 0; c < d; c++)
            {
                if (hh / 2 == 1) Assert.True(float.IsNaN(o[0, hh, c]), $"head {hh} reads the NaN key");
                else if (hh / 2 == 0 && c == 7) Assert.False(float.IsFinite(o[0, hh, c]), $"head {hh} channel 7 reads the infinite value");
                else Assert.True(Math.Abs(o[0, hh, c] - expected.At(0, 0, hh, c)) < 2e-6, $"h={hh} c={c}: {o[0, hh, c]} vs {expected.At(0, 0, hh, c)}");
            }
        // A policy that skips both pages (sinks + recent) gives finite rows everywhere.
        DecodeAttention.Forward(q, cache, seq, 0, o, new DecodeOptions { Policy = new StreamingPolicy(64, 44) }, tuning: tuning);
        Assert.All(o.ToArray(), x => Assert.True(float.IsFinite(x)));
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
            Assert.Equal(MathF.Min(a, b), second.MinOf(0)[c]);
            Assert.Equal(MathF.Max(a, b), second.MaxOf(0)[c]);
            Assert.Equal((a + b) / 2, second.MeanOf(0)[c], 5);
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
        foreach (IKvSelectionPolicy policy in new IKvSelectionPolicy[] { new QuestPolicy(10_000), new StreamingPolicy(0, 200), new LandmarkPolicy(10_000),
            new HeavyHitterPolicy(10_000, 16), new RecycledPolicy(3, 10_000), new TokenSelectPolicy(10_000), new RetrievalPolicy(10_000, 10_000), new RetentionPolicy(10_000, 1), new OraclePagePolicy(10_000), new MomentPolicy(10_000) })
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

    /// <summary>A cache whose key <paramref name="needle"/> points along the returned query direction (6× its norm).</summary>
    private static (KvCache Cache, int Seq, float[] Direction) NeedleCache(int length, int d, int ps, int needle)
    {
        float[] dir = TestData.Normal(d, 12);
        var cache = new KvCache(1, 1, d, storage: DType.Float32, pageSize: ps);
        int seq = cache.AddSequence();
        float[] keys = TestData.Normal(length * d, 11);
        for (int c = 0; c < d; c++) keys[needle * d + c] = 6 * dir[c];
        cache.Append(seq, 0, new TensorView<float>(keys, length, 1, d), new TensorView<float>(TestData.Normal(length * d, 13), length, 1, d));
        return (cache, seq, dir);
    }

    [Fact]
    public void Should_report_page_masses_that_sum_to_one_and_match_the_softmax()
    {
        (KvCache cache, int seq) = RandomCache(300, 2, 16, 32, 21);
        var q = new TensorView<float>(TestData.Normal(2 * 4 * 16, 22), 2, 4, 16);          // 2 query tokens, groups of 2
        var recorder = new MassRecorder();
        var o = new TensorView<float>(new float[2 * 4 * 16], 2, 4, 16);
        DecodeAttention.Forward(q, cache, seq, 0, o, new DecodeOptions { Policy = recorder }, tuning: new KernelTuning { Threads = 2 });
        Assert.Equal(2, recorder.Seen.Count);
        foreach ((int hk, IReadOnlyList<int> pages, float[] mass) in recorder.Seen)
        {
            Assert.Equal(10, pages.Count);
            Assert.Equal(1.0, mass.Sum(), 4);
            // Against the float64 softmax of the same step: mean over the group's 4 rows (2 tokens × 2 heads) of each page's share.
            var expected = new double[10];
            for (int t = 0; t < 2; t++)
                for (int g = 0; g < 2; g++)
                {
                    int h = hk * 2 + g, visible = 300 - 2 + t + 1;
                    double[] scores = Enumerable.Range(0, visible).Select(j =>
                    {
                        var key = new float[16];
                        cache.Pages(seq, 0)[j / 32].ReadKey(hk, j % 32, key);
                        return Enumerable.Range(0, 16).Sum(c => (double)q[t, h, c] * key[c]) / 4.0;
                    }).ToArray();
                    double max = scores.Max(), total = scores.Sum(x => Math.Exp(x - max));
                    for (int j = 0; j < visible; j++) expected[j / 32] += Math.Exp(scores[j] - max) / total / 4;
                }
            for (int i = 0; i < 10; i++) Assert.True(Math.Abs(mass[i] - expected[i]) < 1e-4, $"kv head {hk} page {i}: {mass[i]} vs {expected[i]}");
        }
    }

    private sealed class MassRecorder : IKvSelectionPolicy, IAttentionFeedback
    {
        public readonly List<(int KvHead, IReadOnlyList<int> Pages, float[] Mass)> Seen = [];

        public IReadOnlyList<int> SelectPages(KvCache cache, int sequence, int layer, int kvHead, ReadOnlySpan<float> queries, int rows) =>
            DensePolicy.Instance.SelectPages(cache, sequence, layer, kvHead, queries, rows);

        public void Observe(KvCache cache, int sequence, int layer, int kvHead, IReadOnlyList<int> pages, ReadOnlySpan<float> mass) =>
            Seen.Add((kvHead, pages, mass.ToArray()));
    }

    [Fact]
    public void Should_retrieve_the_needle_page_by_its_mean_key()
    {
        (KvCache cache, int seq, float[] dir) = NeedleCache(1024, 32, 32, 300);
        IReadOnlyList<int> pages = new LandmarkPolicy(4 * 32).SelectPages(cache, seq, 0, 0, dir, 1);
        Assert.Contains(300 / 32, pages);
        Assert.Contains(1024 / 32 - 1, pages);
        Assert.Equal(4, pages.Count);
        Assert.Throws<ArgumentOutOfRangeException>(() => new LandmarkPolicy(0));
    }

    [Fact]
    public void Should_keep_heavy_hitters_and_the_recent_window_and_never_return_evicted_pages()
    {
        // 1024 tokens, pages of 32: the needle's page (9) takes most of the mass on the first step and stays heavy.
        (KvCache cache, int seq, float[] dir) = NeedleCache(1024, 32, 32, 300);
        var h2o = new HeavyHitterPolicy(heavyTokens: 64, recentTokens: 64);
        var q = new TensorView<float>(dir.ToArray(), 1, 1, 32);
        var o = new TensorView<float>(new float[32], 1, 1, 32);
        var reads = new List<IReadOnlyList<int>>();
        var options = new DecodeOptions { Policy = h2o, OnPagesSelected = (_, p) => reads.Add(p) };
        DecodeAttention.Forward(q, cache, seq, 0, o, options);
        // Step 1: no page judged yet → every page is read once (as H2O's prefill scores the prompt).
        Assert.Equal(32, reads[0].Count);
        for (int step = 0; step < 40; step++)
        {
            cache.Append(seq, 0, new TensorView<float>(TestData.Normal(32, 100 + step), 1, 1, 32), new TensorView<float>(TestData.Normal(32, 200 + step), 1, 1, 32));
            DecodeAttention.Forward(q, cache, seq, 0, o, options);
        }
        var evicted = new HashSet<int>();
        for (int i = 1; i < reads.Count; i++)
        {
            Assert.DoesNotContain(reads[i], evicted.Contains);
            Assert.True(reads[i].Count <= 4, $"step {i}: {reads[i].Count} pages");
            Assert.Contains(300 / 32, reads[i]);                                              // the heavy hitter stays
            foreach (int p in reads[i - 1].Where(p => !reads[i].Contains(p))) evicted.Add(p);
        }
        Assert.NotEmpty(evicted);
        Assert.Throws<ArgumentOutOfRangeException>(() => new HeavyHitterPolicy(-1, 64));
        Assert.Throws<ArgumentOutOfRangeException>(() => new HeavyHitterPolicy(64, 0));
    }

    [Theory]
    [InlineData(1, 40)]
    [InlineData(4, 128)]
    [InlineData(6, 24)]
    [InlineData(9, 7)]
    public void Should_bound_every_row_as_the_float64_sum_of_channel_maxima(int rows, int d)
    {
        // Quest's bound Σ_c max(q_c·min_c, q_c·max_c), 4 rows per pass with a partial last block and a scalar tail.
        float[] q = TestData.Normal(rows * d, 51), lo = TestData.Normal(d, 52), hi = [.. lo.Select((x, i) => x + MathF.Abs(TestData.Normal(d, 53)[i]))];
        var bounds = new float[rows];
        QuestPolicy.UpperBounds(q, rows, lo, hi, bounds);
        for (int r = 0; r < rows; r++)
        {
            double expected = 0, magnitude = 0;
            for (int c = 0; c < d; c++)
            {
                double term = Math.Max((double)q[r * d + c] * lo[c], (double)q[r * d + c] * hi[c]);
                expected += term;
                magnitude += Math.Abs(term);
            }
            // A float sum of d terms: within d rounding steps of the float64 sum (×2, plus 1e-6).
            Assert.True(Math.Abs(bounds[r] - expected) < (2 * d * 6e-8 * magnitude) + 1e-6, $"row {r}: {bounds[r]} vs {expected}");
        }
    }

    [Fact]
    public void Should_prune_the_least_important_kv_head_for_good_after_the_warm_up()
    {
        // SpAtten cascade head pruning: kv head 1's values are 100× smaller, so its outputs are; with half the heads
        // pruned after 3 steps it reads nothing from then on (output 0) while head 0 decodes exactly as plain H2O.
        int length = 300, hkv = 2, h = 4, d = 16;
        var cache = new KvCache(1, hkv, d, storage: DType.Float32, pageSize: 32);
        int seq = cache.AddSequence();
        float[] k = TestData.Normal((length + 6) * hkv * d, 81), v = TestData.Normal((length + 6) * hkv * d, 82);
        for (int t = 0; t < length + 6; t++)
            for (int c = 0; c < d; c++) v[((t * hkv) + 1) * d + c] *= 0.01f;
        cache.Append(seq, 0, new TensorView<float>(k[..(length * hkv * d)], length, hkv, d), new TensorView<float>(v[..(length * hkv * d)], length, hkv, d));
        int fork = cache.Fork(seq);
        var pruning = new HeavyHitterPolicy(64, 64, prunedHeadFraction: 0.5, headWarmupSteps: 3);
        var plain = new HeavyHitterPolicy(64, 64);
        var read = new Dictionary<int, int>();
        for (int step = 0; step < 6; step++)
        {
            int t = length + step;
            foreach (int s2 in new[] { seq, fork })
                cache.Append(s2, 0, new TensorView<float>(k.AsSpan(t * hkv * d, hkv * d).ToArray(), 1, hkv, d), new TensorView<float>(v.AsSpan(t * hkv * d, hkv * d).ToArray(), 1, hkv, d));
            var q = new TensorView<float>(TestData.Normal(h * d, 90 + step), 1, h, d);
            var a = new TensorView<float>(new float[h * d], 1, h, d);
            var b = new TensorView<float>(new float[h * d], 1, h, d);
            read.Clear();
            bool pruned = step >= 3;                                 // decided after the third step's outputs
            Assert.Equal(pruned, pruning.IsPruned(cache, seq, 0, 1));
            DecodeAttention.Forward(q, cache, seq, 0, a, new DecodeOptions { Policy = pruning, OnPagesSelected = (hk, p) => read[hk] = p.Count });
            DecodeAttention.Forward(q, cache, fork, 0, b, new DecodeOptions { Policy = plain });
            Assert.False(pruning.IsPruned(cache, seq, 0, 0));
            Assert.True(read[0] > 0);
            Assert.Equal(pruned, read[1] == 0);
            for (int c = 0; c < 2 * d; c++) Assert.Equal(b.ToArray()[c], a.ToArray()[c]);                 // head 0's group
            for (int c = 2 * d; c < 4 * d; c++)
                if (pruned) Assert.Equal(0f, a.ToArray()[c]);
                else Assert.Equal(b.ToArray()[c], a.ToArray()[c]);
        }
        Assert.Contains("kv head", Assert.Throws<ArgumentOutOfRangeException>(() => pruning.IsPruned(cache, seq, 0, 2)).Message);
        Assert.Throws<ArgumentOutOfRangeException>(() => pruning.IsPruned(cache, 7, 0, 0));
        Assert.Throws<ArgumentOutOfRangeException>(() => pruning.ObserveOutput(cache, seq, 0, -1, 1f));
        Assert.Throws<ArgumentNullException>(() => pruning.IsPruned(null!, seq, 0, 0));
        Assert.Throws<ArgumentOutOfRangeException>(() => new HeavyHitterPolicy(64, 64, 1.0));
        Assert.Throws<ArgumentOutOfRangeException>(() => new HeavyHitterPolicy(64, 64, -0.1));
        Assert.Throws<ArgumentOutOfRangeException>(() => new HeavyHitterPolicy(64, 64, 0.5, 0));
    }

    [Fact]
    public void Should_read_everything_every_period_and_recycle_the_heaviest_pages_in_between()
    {
        (KvCache cache, int seq, float[] dir) = NeedleCache(1024, 32, 32, 300);
        var recycled = new RecycledPolicy(period: 4, tokenBudget: 64);
        var q = new TensorView<float>(dir.ToArray(), 1, 1, 32);
        var o = new TensorView<float>(new float[32], 1, 1, 32);
        var reads = new List<IReadOnlyList<int>>();
        var options = new DecodeOptions { Policy = recycled, OnPagesSelected = (_, p) => reads.Add(p) };
        for (int step = 0; step < 9; step++)
        {
            if (step > 0) cache.Append(seq, 0, new TensorView<float>(TestData.Normal(32 * 16, 300 + step), 16, 1, 32), new TensorView<float>(TestData.Normal(32 * 16, 400 + step), 16, 1, 32));
            DecodeAttention.Forward(q, cache, seq, 0, o, options);
        }
        for (int step = 0; step < 9; step++)
        {
            int pages = (1024 + (16 * step) + 31) / 32;
            if (step % 4 == 0) Assert.Equal(pages, reads[step].Count);                         // full steps
            else
            {
                Assert.Contains(300 / 32, reads[step]);                                        // the needle's page is recycled
                int fullPages = (1024 + (16 * (step / 4 * 4)) + 31) / 32;
                // The pages written since the full step (its last page, grown, and the new ones) are always read.
                for (int p = fullPages - 1; p < pages; p++) Assert.Contains(p, reads[step]);
                Assert.True(reads[step].Count <= 2 + (pages - fullPages + 1));
            }
        }
        Assert.Throws<ArgumentOutOfRangeException>(() => new RecycledPolicy(0, 64));
        Assert.Throws<ArgumentOutOfRangeException>(() => new RecycledPolicy(2, 0));
    }

    /// <summary>The oracle reads whole pages: the needle's page (most true mass) and the last one, nothing else.</summary>
    [Fact]
    public void Should_read_the_pages_of_most_true_mass_as_the_oracle()
    {
        int length = 1024, d = 32, ps = 32;
        (KvCache cache, int seq, float[] dir) = NeedleCache(length, d, ps, 300);
        IReadOnlyList<int> tokens = new OraclePagePolicy(2 * ps).SelectTokens(cache, seq, 0, 0, dir.Select(x => x / MathF.Sqrt(d)).ToArray(), 1);
        Assert.Equal([.. Enumerable.Range(288, ps), .. Enumerable.Range(length - ps, ps)], tokens);
        Assert.Throws<ArgumentOutOfRangeException>(() => new OraclePagePolicy(0));
    }

    [Fact]
    public void Should_select_tokens_by_soft_votes_and_reuse_the_selection_while_queries_stay_similar()
    {
        // Two needles on different pages and the newest token: a budget of 3 tokens reads exactly those, gathered.
        int length = 1024, d = 32, ps = 32;
        (KvCache cache, int seq, float[] dir) = NeedleCache(length, d, ps, 300);
        var extra = new float[d];
        for (int c = 0; c < d; c++) extra[c] = 6 * dir[c];
        var dense = new TensorView<float>(new float[d], 1, 1, d);
        var o = new TensorView<float>(new float[d], 1, 1, d);
        var q = new TensorView<float>(dir.ToArray(), 1, 1, d);
        var policy = new TokenSelectPolicy(tokenBudget: 3, reuseThreshold: 0.95f);
        IReadOnlyList<int> tokens = policy.SelectTokens(cache, seq, 0, 0, dir.Select(x => x / MathF.Sqrt(d)).ToArray(), 1);
        Assert.Contains(300, tokens);
        Assert.Contains(length - 1, tokens);
        Assert.Equal(3, tokens.Count);
        Assert.Equal(1, policy.Scorings);
        // The decode step over the gathered tokens equals the float64 softmax over exactly those keys.
        var pagesSeen = new List<IReadOnlyList<int>>();
        long read = DecodeAttention.Forward(q, cache, seq, 0, o, new DecodeOptions { Policy = policy, OnPagesSelected = (_, p) => pagesSeen.Add(p) });
        Assert.Equal(1, policy.Scorings);                            // same query: the cached selection
        Assert.Equal(tokens.Select(t => t / ps).Distinct().Count(), read);
        double[] scores = tokens.Select(t =>
        {
            var key = new float[d];
            cache.Pages(seq, 0)[t / ps].ReadKey(0, t % ps, key);
            return key.Zip(dir).Sum(p => (double)p.First * p.Second) / Math.Sqrt(d);
        }).ToArray();
        double max = scores.Max(), total = scores.Sum(x => Math.Exp(x - max));
        for (int c = 0; c < d; c++)
        {
            double expected = 0;
            for (int i = 0; i < tokens.Count; i++)
            {
                var value = new float[d];
                cache.Pages(seq, 0)[tokens[i] / ps].ReadValue(0, tokens[i] % ps, value);
                expected += Math.Exp(scores[i] - max) / total * value[c];
            }
            Assert.True(Math.Abs(o[0, 0, c] - expected) < 1e-5, $"c={c}: {o[0, 0, c]} vs {expected}");
        }
        // A dissimilar query scores again.
        float[] other = TestData.Normal(d, 77);
        policy.SelectTokens(cache, seq, 0, 0, other, 1);
        Assert.Equal(2, policy.Scorings);
        Assert.Throws<ArgumentOutOfRangeException>(() => new TokenSelectPolicy(0));
        Assert.Throws<ArgumentOutOfRangeException>(() => new TokenSelectPolicy(8, float.NaN));
    }

    [Fact]
    public void Should_mask_gathered_tokens_causally_for_several_query_tokens()
    {
        // Two query tokens: the first must not see the newest key even when a token policy selects it.
        (KvCache cache, int seq) = RandomCache(200, 1, 16, 32, 31);
        var q = new TensorView<float>(TestData.Normal(2 * 2 * 16, 32), 2, 2, 16);
        var dense = new TensorView<float>(new float[2 * 2 * 16], 2, 2, 16);
        var o = new TensorView<float>(new float[2 * 2 * 16], 2, 2, 16);
        DecodeAttention.Forward(q, cache, seq, 0, dense);
        DecodeAttention.Forward(q, cache, seq, 0, o, new DecodeOptions { Policy = new TokenSelectPolicy(10_000) });
        Assert.Equal(dense.ToArray(), o.ToArray());
        var all = new AllTokens();
        DecodeAttention.Forward(q, cache, seq, 0, o, new DecodeOptions { Policy = all });
        float[] a = dense.ToArray(), b = o.ToArray();
        for (int i = 0; i < a.Length; i++) Assert.True(Math.Abs(a[i] - b[i]) < 1e-5, $"{i}: {b[i]} vs {a[i]}");
    }

    [Fact]
    public void Should_reject_a_token_policy_that_selects_nothing_or_outside_the_cache()
    {
        (KvCache cache, int seq) = RandomCache(100, 1, 16, 32, 51);
        var q = new TensorView<float>(TestData.Normal(16, 52), 1, 1, 16);
        var o = new TensorView<float>(new float[16], 1, 1, 16);
        Assert.Contains("outside 0..99", Assert.Throws<InvalidOperationException>(() => DecodeAttention.Forward(q, cache, seq, 0, o, new DecodeOptions { Policy = new FixedTokens([3, 100]) })).Message);
        Assert.Throws<InvalidOperationException>(() => DecodeAttention.Forward(q, cache, seq, 0, o, new DecodeOptions { Policy = new FixedTokens([]) }));
    }

    [Theory]
    [InlineData(DType.Float16, KernelPath.Auto, false)]
    [InlineData(DType.Float16, KernelPath.Auto, true)]
    [InlineData(DType.BFloat16, KernelPath.Auto, false)]
    [InlineData(DType.Float32, KernelPath.Auto, false)]
    [InlineData(DType.Float16, KernelPath.Vector256, false)]
    public void Should_read_gathered_tokens_in_every_storage_dtype_as_the_reference_of_those_keys(DType storage, KernelPath path, bool nanElsewhere)
    {
        // Scattered tokens (a page and a half of them, some pages read for one token) gathered from an f16/bf16/f32
        // cache; with nanElsewhere a page holds a NaN key in a slot that is not selected (its page is widened exactly).
        int length = 700, hkv = 2, h = 4, d = 64, ps = 64;
        var cache = new KvCache(1, hkv, d, d, storage, pageSize: ps);
        int seq = cache.AddSequence();
        float[] k = TestData.Normal(length * hkv * d, 61), v = TestData.Normal(length * hkv * d, 62);
        int[] tokens = [.. Enumerable.Range(0, length).Where(t => t % 7 == 3 || t > 650)];
        if (nanElsewhere) k[(4 * hkv + 1) * d + 9] = float.NaN;      // token 4 is not selected
        cache.Append(seq, 0, new TensorView<float>(k, length, hkv, d), new TensorView<float>(v, length, hkv, d));
        var q = new TensorView<float>(TestData.Normal(h * d, 63), 1, h, d);
        var o = new TensorView<float>(new float[h * d], 1, h, d);
        DecodeAttention.Forward(q, cache, seq, 0, o, new DecodeOptions { Policy = new FixedTokens(tokens) }, tuning: new KernelTuning { Path = path });
        var kRef = new TensorView<float>(tokens.SelectMany(t => k.AsSpan(t * hkv * d, hkv * d).ToArray()).Select(x => Round(x, storage)).ToArray(), 1, tokens.Length, hkv, d);
        var vRef = new TensorView<float>(tokens.SelectMany(t => v.AsSpan(t * hkv * d, hkv * d).ToArray()).Select(x => Round(x, storage)).ToArray(), 1, tokens.Length, hkv, d);
        ReferenceResult expected = AttentionReference.Forward(new TensorView<float>(q.ToArray(), 1, 1, h, d), kRef, vRef, new AttentionOptions());
        for (int hh = 0; hh < h; hh++)
            for (int c = 0; c < d; c++)
                Assert.True(Math.Abs(o[0, hh, c] - expected.At(0, 0, hh, c)) < 2e-6, $"h={hh} c={c}: {o[0, hh, c]} vs {expected.At(0, 0, hh, c)}");
    }

    private sealed class FixedTokens(int[] tokens) : ITokenSelectionPolicy
    {
        public IReadOnlyList<int> SelectTokens(KvCache cache, int sequence, int layer, int kvHead, ReadOnlySpan<float> queries, int rows) => tokens;

        public IReadOnlyList<int> SelectPages(KvCache cache, int sequence, int layer, int kvHead, ReadOnlySpan<float> queries, int rows) => [0];
    }

    /// <summary>Every token, in a shuffled page order (gathering must not depend on page order or contiguity).</summary>
    private sealed class AllTokens : ITokenSelectionPolicy
    {
        public IReadOnlyList<int> SelectTokens(KvCache cache, int sequence, int layer, int kvHead, ReadOnlySpan<float> queries, int rows) =>
            [.. Enumerable.Range(0, cache.Length(sequence, layer)).OrderBy(t => (t * 7919) % 211)];

        public IReadOnlyList<int> SelectPages(KvCache cache, int sequence, int layer, int kvHead, ReadOnlySpan<float> queries, int rows) =>
            DensePolicy.Instance.SelectPages(cache, sequence, layer, kvHead, queries, rows);
    }

    [Fact]
    public void Should_retrieve_the_needle_through_the_inverted_file_scanning_part_of_the_cache()
    {
        int length = 2048, d = 32, ps = 32;
        (KvCache cache, int seq, float[] dir) = NeedleCache(length, d, ps, 1234);
        var policy = new RetrievalPolicy(tokenBudget: 16, scanTokens: 256, tokensPerCluster: 32, sinkTokens: 2);
        IReadOnlyList<int> tokens = policy.SelectTokens(cache, seq, 0, 0, dir, 1);
        Assert.Contains(1234, tokens);
        Assert.Contains(0, tokens);
        Assert.Contains(1, tokens);
        Assert.True(tokens.Count <= 18, $"{tokens.Count} tokens");
        Assert.True(policy.ScannedFraction < 0.25, $"scanned {policy.ScannedFraction:F3} of the cache");
        // Tokens appended after the index was built are always read.
        cache.Append(seq, 0, new TensorView<float>(TestData.Normal(3 * d, 5), 3, 1, d), new TensorView<float>(TestData.Normal(3 * d, 6), 3, 1, d));
        tokens = policy.SelectTokens(cache, seq, 0, 0, dir, 1);
        Assert.Contains(length, tokens);
        Assert.Contains(length + 2, tokens);
        Assert.Contains(1234, tokens);
        var o = new TensorView<float>(new float[d], 1, 1, d);
        var dense = new TensorView<float>(new float[d], 1, 1, d);
        var q = new TensorView<float>(dir.ToArray(), 1, 1, d);
        DecodeAttention.Forward(q, cache, seq, 0, dense);
        DecodeAttention.Forward(q, cache, seq, 0, o, new DecodeOptions { Policy = policy });
        double err = Math.Sqrt(dense.ToArray().Zip(o.ToArray()).Sum(p => (p.First - p.Second) * (p.First - p.Second)) / dense.ToArray().Sum(x => x * x));
        Assert.True(err < 0.05, $"relative L2 error {err}");
        Assert.Throws<ArgumentOutOfRangeException>(() => new RetrievalPolicy(0, 10));
        Assert.Throws<ArgumentOutOfRangeException>(() => new RetrievalPolicy(10, 5));
        Assert.Throws<ArgumentOutOfRangeException>(() => new RetrievalPolicy(10, 20, 0));
    }

    [Fact]
    public void Should_offload_pages_beyond_the_resident_budget_and_decode_exactly_as_in_memory()
    {
        int length = 2000, hkv = 2, d = 16, ps = 32;
        string file = Path.Combine(Path.GetTempPath(), $"attend-offload-{Guid.NewGuid():N}.bin");
        float[] keys = TestData.Normal(length * hkv * d, 41), values = TestData.Normal(length * hkv * d, 42);
        var memory = new KvCache(1, hkv, d, storage: DType.Float16, pageSize: ps);
        int seqM = memory.AddSequence();
        memory.Append(seqM, 0, new TensorView<float>(keys, length, hkv, d), new TensorView<float>(values, length, hkv, d));
        long pageBytes = memory.MemoryBytes / ((length + ps - 1) / ps);
        var tiered = new KvCache(1, hkv, d, storage: DType.Float16, pageSize: ps, offload: new KvOffload(file, ResidentBytes: 10 * pageBytes, CachedPages: 4));
        int seqT = tiered.AddSequence();
        for (int t0 = 0; t0 < length; t0 += 300)
        {
            int n = Math.Min(300, length - t0);
            tiered.Append(seqT, 0, new TensorView<float>(keys[(t0 * hkv * d)..((t0 + n) * hkv * d)], n, hkv, d), new TensorView<float>(values[(t0 * hkv * d)..((t0 + n) * hkv * d)], n, hkv, d));
        }
        Assert.True(tiered.ResidentBytes <= 10 * pageBytes, $"resident {tiered.ResidentBytes} > budget {10 * pageBytes}");
        Assert.True(tiered.OffloadStats.Offloaded >= 50);
        Assert.Equal(memory.MemoryBytes, tiered.MemoryBytes);
        var q = new TensorView<float>(TestData.Normal(4 * d, 43), 1, 4, d);
        var a = new TensorView<float>(new float[4 * d], 1, 4, d);
        var b = new TensorView<float>(new float[4 * d], 1, 4, d);
        foreach (IKvSelectionPolicy? policy in new IKvSelectionPolicy?[] { null, new QuestPolicy(8 * ps), new TokenSelectPolicy(100) })
        {
            DecodeAttention.Forward(q, memory, seqM, 0, a, new DecodeOptions { Policy = policy });
            DecodeAttention.Forward(q, tiered, seqT, 0, b, new DecodeOptions { Policy = policy });
            Assert.Equal(a.ToArray(), b.ToArray());
        }
        Assert.True(tiered.OffloadStats.Loads > 0);
        // Truncating into an offloaded page brings it back; appending after that is kept.
        tiered.Truncate(seqT, 100);
        memory.Truncate(seqM, 100);
        tiered.Append(seqT, 0, new TensorView<float>(keys[..(5 * hkv * d)], 5, hkv, d), new TensorView<float>(values[..(5 * hkv * d)], 5, hkv, d));
        memory.Append(seqM, 0, new TensorView<float>(keys[..(5 * hkv * d)], 5, hkv, d), new TensorView<float>(values[..(5 * hkv * d)], 5, hkv, d));
        DecodeAttention.Forward(q, memory, seqM, 0, a);
        DecodeAttention.Forward(q, tiered, seqT, 0, b);
        Assert.Equal(a.ToArray(), b.ToArray());
        Assert.Throws<ArgumentOutOfRangeException>(() => new KvCache(1, hkv, d, pageSize: ps, offload: new KvOffload(file + "2", ResidentBytes: 10)));
        Assert.Throws<ArgumentOutOfRangeException>(() => new KvCache(1, hkv, d, pageSize: ps, offload: new KvOffload(file + "3", ResidentBytes: 100 * pageBytes, CachedPages: 0)));
        Assert.ThrowsAny<ArgumentException>(() => new KvCache(1, hkv, d, pageSize: ps, offload: new KvOffload("", ResidentBytes: 100 * pageBytes)));
    }

    private static (KvCache Memory, KvCache Tiered, int Length, long PageBytes) OffloadPair(int length, int hkv, int d, int ps, int residentPages, int cachedPages, int ioThreads, DType storage = DType.Float16)
    {
        string file = Path.Combine(Path.GetTempPath(), $"attend-offload-{Guid.NewGuid():N}.bin");
        float[] keys = TestData.Normal(length * hkv * d, 51), values = TestData.Normal(length * hkv * d, 52);
        var memory = new KvCache(1, hkv, d, storage: storage, pageSize: ps);
        memory.Append(memory.AddSequence(), 0, new TensorView<float>(keys, length, hkv, d), new TensorView<float>(values, length, hkv, d));
        long pageBytes = memory.MemoryBytes / ((length + ps - 1) / ps);
        var tiered = new KvCache(1, hkv, d, storage: storage, pageSize: ps,
            offload: new KvOffload(file, ResidentBytes: residentPages * pageBytes, CachedPages: cachedPages, IoThreads: ioThreads));
        tiered.Append(tiered.AddSequence(), 0, new TensorView<float>(keys, length, hkv, d), new TensorView<float>(values, length, hkv, d));
        return (memory, tiered, length, pageBytes);
    }

    [Fact]
    public void Should_decode_exactly_as_in_memory_while_prefetch_threads_load_and_evict_pages()
    {
        // A drifting query changes Quest's pages every step; the tier's cache (6 pages) is far smaller than a step's
        // reads, so the prefetch threads, the step's own loads and evictions run into each other all the time.
        int hkv = 2, d = 24, heads = 4;
        (KvCache memory, KvCache tiered, _, _) = OffloadPair(1500, hkv, d, ps: 16, residentPages: 8, cachedPages: 6, ioThreads: 3);
        Assert.True(tiered.OffloadStats.Offloaded > 80);
        float[] query = TestData.Normal(heads * d, 53), noise = TestData.Normal(40 * heads * d, 54);
        var a = new TensorView<float>(new float[heads * d], 1, heads, d);
        var b = new TensorView<float>(new float[heads * d], 1, heads, d);
        foreach (IKvSelectionPolicy? policy in new IKvSelectionPolicy?[] { new QuestPolicy(20 * 16), new LandmarkPolicy(10 * 16, recentTokens: 32, perQueryHead: true), null })
            for (int step = 0; step < 20; step++)
            {
                for (int i = 0; i < query.Length; i++) query[i] = (0.95f * query[i]) + (0.3f * noise[(step * query.Length) + i]);
                var q = new TensorView<float>(query, 1, heads, d);
                DecodeAttention.Forward(q, memory, 0, 0, a, new DecodeOptions { Policy = policy });
                DecodeAttention.Forward(q, tiered, 0, 0, b, new DecodeOptions { Policy = policy, PrefetchShare = 0.5 });
                Assert.Equal(a.ToArray(), b.ToArray());
            }
        OffloadCounters c = tiered.OffloadStats;
        Assert.True(c.Loads > 0 && c.Prefetched <= c.Loads, $"loads {c.Loads}, prefetched {c.Prefetched}");
    }

    [Fact]
    public void Should_load_prefetched_pages_in_the_background_so_the_step_finds_them_cached()
    {
        (KvCache memory, KvCache tiered, int length, _) = OffloadPair(640, hkv: 1, d: 16, ps: 16, residentPages: 4, cachedPages: 64, ioThreads: 2);
        int pages = length / 16;
        Assert.True(tiered.OffloadStats.Offloaded >= 30);
        tiered.Prefetch(0, 0, Enumerable.Range(0, pages));
        var wait = System.Diagnostics.Stopwatch.StartNew();
        while (tiered.OffloadStats.Prefetched < tiered.OffloadStats.Offloaded && wait.Elapsed < TimeSpan.FromSeconds(30)) Thread.Sleep(5);
        OffloadCounters before = tiered.OffloadStats;
        Assert.Equal(before.Offloaded, before.Prefetched);             // every offloaded page, by the background threads
        Assert.Equal(before.Loads, before.Prefetched);
        var q = new TensorView<float>(TestData.Normal(2 * 16, 55), 1, 2, 16);
        var a = new TensorView<float>(new float[2 * 16], 1, 2, 16);
        var b = new TensorView<float>(new float[2 * 16], 1, 2, 16);
        DecodeAttention.Forward(q, memory, 0, 0, a);
        DecodeAttention.Forward(q, tiered, 0, 0, b, new DecodeOptions { Prefetch = false });
        Assert.Equal(a.ToArray(), b.ToArray());
        Assert.Equal(before.Loads, tiered.OffloadStats.Loads);            // nothing read again
        // Prefetching what is in memory or cached does nothing; bad indices are named.
        tiered.Prefetch(0, 0, Enumerable.Range(0, pages));
        Assert.Equal(before.Loads, tiered.OffloadStats.Loads);
        Assert.Contains("0..39", Assert.Throws<ArgumentOutOfRangeException>(() => tiered.Prefetch(0, 0, [3, 40])).Message);
        Assert.Throws<ArgumentOutOfRangeException>(() => tiered.Prefetch(0, 0, [-1]));
        Assert.Throws<ArgumentOutOfRangeException>(() => tiered.Prefetch(1, 0, [0]));
        Assert.Throws<ArgumentNullException>(() => tiered.Prefetch(0, 0, null!));
        memory.Prefetch(0, 0, [0, 1]);                                 // no file tier: nothing to do
        Assert.Equal(default, memory.OffloadStats);
        Assert.ThrowsAny<ArgumentException>(() => DecodeAttention.Forward(q, tiered, 0, 0, b, new DecodeOptions { PrefetchShare = -1 }));
        Assert.Throws<ArgumentOutOfRangeException>(() => new KvCache(1, 1, 16, pageSize: 16, offload: new KvOffload(Path.GetTempFileName(), ResidentBytes: 1 << 20, IoThreads: -1)));
        // No prefetch threads: the step loads its own pages, and decodes the same.
        (KvCache _, KvCache serial, _, _) = OffloadPair(640, hkv: 1, d: 16, ps: 16, residentPages: 4, cachedPages: 64, ioThreads: 0);
        serial.Prefetch(0, 0, Enumerable.Range(0, pages));
        DecodeAttention.Forward(q, serial, 0, 0, b);
        Assert.Equal(a.ToArray(), b.ToArray());
        Assert.Equal(0, serial.OffloadStats.Prefetched);
    }

    private sealed class WrongNextPolicy : IPrefetchingPolicy
    {
        public IReadOnlyList<int> SelectPages(KvCache cache, int sequence, int layer, int kvHead, ReadOnlySpan<float> queries, int rows) => [0];

        public IReadOnlyList<int> SelectPages(KvCache cache, int sequence, int layer, int kvHead, ReadOnlySpan<float> queries, int rows, double nextShare, List<int>? likelyNext)
        {
            likelyNext?.Add(1_000_000);
            return [0];
        }
    }

    [Fact]
    public void Should_name_a_policy_whose_next_pages_are_out_of_range()
    {
        (_, KvCache tiered, _, _) = OffloadPair(640, hkv: 1, d: 16, ps: 16, residentPages: 4, cachedPages: 8, ioThreads: 1);
        var q = new TensorView<float>(TestData.Normal(16, 57), 1, 1, 16);
        var o = new TensorView<float>(new float[16], 1, 1, 16);
        Assert.Contains("next page", Assert.Throws<InvalidOperationException>(() => DecodeAttention.Forward(q, tiered, 0, 0, o, new DecodeOptions { Policy = new WrongNextPolicy() })).Message);
        DecodeAttention.Forward(q, tiered, 0, 0, o, new DecodeOptions { Policy = new WrongNextPolicy(), Prefetch = false });   // not asked: not checked
    }

    [Fact]
    public void Should_name_as_next_best_the_pages_a_larger_budget_would_add()
    {
        // Quest's next-best pages are exactly what a budget larger by their number adds (max over the group, and each
        // query head's own turns); the selection itself does not change when they are asked for.
        (KvCache cache, _, _, _) = OffloadPair(2000, hkv: 2, d: 16, ps: 16, residentPages: 1000, cachedPages: 1, ioThreads: 0);
        float[] q = TestData.Normal(4 * 16, 56);
        foreach (bool perHead in new[] { false, true })
        {
            var policy = new QuestPolicy(12 * 16, recentTokens: 32, perQueryHead: perHead);
            var larger = new QuestPolicy(15 * 16, recentTokens: 32, perQueryHead: perHead);
            for (int hk = 0; hk < 2; hk++)
            {
                var next = new List<int>();
                IReadOnlyList<int> chosen = policy.SelectPages(cache, 0, 0, hk, q.AsSpan(hk * 32, 32), 2, 0.3, next);
                Assert.Equal(policy.SelectPages(cache, 0, 0, hk, q.AsSpan(hk * 32, 32), 2), chosen);
                Assert.Equal(3, next.Count);                             // ⌈0.3 × 10 pages chosen by score⌉ (2 forced)
                Assert.Empty(next.Intersect(chosen));
                Assert.Equal(larger.SelectPages(cache, 0, 0, hk, q.AsSpan(hk * 32, 32), 2), chosen.Concat(next).Order());
            }
        }
        Assert.Throws<ArgumentOutOfRangeException>(() => new QuestPolicy(64).SelectPages(cache, 0, 0, 0, q.AsSpan(0, 32), 2, -0.5, []));
    }

    [Fact]
    public void Should_not_serve_an_old_cached_copy_of_a_page_truncated_rewritten_and_offloaded_again()
    {
        int hkv = 1, d = 8, ps = 4;
        string file = Path.Combine(Path.GetTempPath(), $"attend-offload-{Guid.NewGuid():N}.bin");
        var memory = new KvCache(1, hkv, d, storage: DType.Float32, pageSize: ps);
        long pageBytes = ps * hkv * d * 2 * 4 + 3 * hkv * d * 4;
        var tiered = new KvCache(1, hkv, d, storage: DType.Float32, pageSize: ps, offload: new KvOffload(file, ResidentBytes: 2 * pageBytes, CachedPages: 16, IoThreads: 0));
        var q = new TensorView<float>(TestData.Normal(d, 61), 1, 1, d);
        var a = new TensorView<float>(new float[d], 1, 1, d);
        var b = new TensorView<float>(new float[d], 1, 1, d);
        void Both(Action<KvCache> act)
        {
            act(memory);
            act(tiered);
        }
        Both(c => c.Append(c.AddSequence(), 0, new TensorView<float>(TestData.Normal(40 * d, 62), 40, hkv, d), new TensorView<float>(TestData.Normal(40 * d, 63), 40, hkv, d)));
        DecodeAttention.Forward(q, tiered, 0, 0, b);                    // every offloaded page now sits in the page cache
        Both(c => c.Truncate(0, 6));                                    // page 1 comes back into memory ...
        Both(c => c.Append(0, 0, new TensorView<float>(TestData.Normal(40 * d, 64), 40, hkv, d), new TensorView<float>(TestData.Normal(40 * d, 65), 40, hkv, d)));
        Assert.True(tiered.OffloadStats.Offloaded > 10);                // ... is rewritten and goes to the file again
        DecodeAttention.Forward(q, memory, 0, 0, a);
        DecodeAttention.Forward(q, tiered, 0, 0, b);
        Assert.Equal(a.ToArray(), b.ToArray());
    }

    [Fact]
    public void Should_name_a_corrupt_offload_file()
    {
        int hkv = 1, d = 16, ps = 32;
        string file = Path.Combine(Path.GetTempPath(), $"attend-offload-{Guid.NewGuid():N}.bin");
        var probe = new KvCache(1, hkv, d, storage: DType.Float32, pageSize: ps);
        int sp = probe.AddSequence();
        probe.Append(sp, 0, new TensorView<float>(new float[ps * d], ps, hkv, d), new TensorView<float>(new float[ps * d], ps, hkv, d));
        long pageBytes = probe.MemoryBytes;
        var cache = new KvCache(1, hkv, d, storage: DType.Float32, pageSize: ps, offload: new KvOffload(file, ResidentBytes: 2 * pageBytes, CachedPages: 1));
        int seq = cache.AddSequence();
        cache.Append(seq, 0, new TensorView<float>(TestData.Normal(400 * d, 1), 400, hkv, d), new TensorView<float>(TestData.Normal(400 * d, 2), 400, hkv, d));
        Assert.True(cache.OffloadStats.Offloaded > 0);
        // Flip bytes of the first offloaded page behind the cache's back.
        using (var stream = new FileStream(file, FileMode.Open, FileAccess.Write, FileShare.ReadWrite | FileShare.Delete))
        {
            stream.Position = 100;
            stream.Write([1, 2, 3, 4, 5, 6, 7, 8]);
        }
        var q = new TensorView<float>(TestData.Normal(d, 3), 1, 1, d);
        var o = new TensorView<float>(new float[d], 1, 1, d);
        Assert.Contains("checksum", Assert.Throws<InvalidDataException>(() => DecodeAttention.Forward(q, cache, seq, 0, o)).Message);
    }

    [Fact]
    public void Should_retain_the_tokens_attention_points_at_across_chunks()
    {
        // The needle (token 300) wins the first judgement and is kept through later chunks; other old tokens go.
        int length = 1024, d = 32, ps = 32;
        (KvCache cache, int seq, float[] dir) = NeedleCache(length, d, ps, 300);
        var policy = new RetentionPolicy(retainTokens: 8, chunkTokens: 64);
        IReadOnlyList<int> first = policy.SelectTokens(cache, seq, 0, 0, dir, 1);
        Assert.Contains(300, first);
        Assert.InRange(first.Count, 8, 9);                             // 8 retained (+ the newest token unless retained)
        for (int step = 0; step < 100; step++)
        {
            cache.Append(seq, 0, new TensorView<float>(TestData.Normal(d, 500 + step), 1, 1, d), new TensorView<float>(TestData.Normal(d, 600 + step), 1, 1, d));
            IReadOnlyList<int> read = policy.SelectTokens(cache, seq, 0, 0, dir, 1);
            Assert.Contains(300, read);
            Assert.Contains(length + step, read);                     // the newest token
            Assert.True(read.Count <= 8 + 64 + 1, $"step {step}: {read.Count} tokens");
        }
        Assert.Throws<ArgumentOutOfRangeException>(() => new RetentionPolicy(0, 8));
        Assert.Throws<ArgumentOutOfRangeException>(() => new RetentionPolicy(8, 0));
    }
}
