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

    /// <summary>The paged cache (pages stored in shuffled pool order) against the float64 reference: partial last pages, GQA, D 64–256.</summary>
    [CudaTheory]
    [InlineData(1, 4, 1, 64)]
    [InlineData(63, 8, 2, 128)]
    [InlineData(64, 8, 2, 128)]
    [InlineData(65, 4, 4, 64)]
    [InlineData(1025, 32, 8, 128)]
    [InlineData(5000, 16, 16, 64)]
    [InlineData(300, 4, 4, 256)]
    [InlineData(77, 16, 1, 80)]
    public void Should_match_the_reference_from_a_paged_cache(int skv, int h, int hkv, int d)
    {
        AttentionConformance.Check<BFloat16>(1, 1, skv, h, hkv, d, new AttentionOptions(), "cuda paged decode", OnGpuPaged);
        AttentionConformance.Check<Half>(1, 1, skv, h, hkv, d, new AttentionOptions { Scale = 0.05f }, "cuda paged decode f16", OnGpuPaged);
    }

    private static void OnGpuPaged<T>(TensorView<T> q, TensorView<T> k, TensorView<T> v, TensorView<T> o, TensorView<float> lse, AttentionOptions options)
        where T : unmanaged
    {
        int h = q.Dim(2), d = q.Dim(3), pages = (k.Dim(1) + 63) / 64;
        int[] order = [.. Enumerable.Range(0, pages).OrderBy(i => (i * 7919) % 104729)];
        using DevicePagedCache<T> cache = DevicePagedCache<T>.FromHost(k, v, order);
        using DeviceTensor<T> dq = DeviceTensor<T>.FromHost(new TensorView<T>(q.ToArray(), 1, h, d)), dO = DeviceTensor<T>.Allocate(1, h, d);
        using DeviceTensor<float> dl = DeviceTensor<float>.Allocate(1, h);
        CudaPagedDecode.Forward(dq, cache, dO, scale: options.Scale, lse: dl);
        T[] host = dO.ToHost();
        float[] hostLse = dl.ToHost();
        for (int hh = 0; hh < h; hh++)
        {
            lse[0, 0, hh] = hostLse[hh];
            for (int c = 0; c < d; c++) o[0, 0, hh, c] = host[(hh * d) + c];
        }
    }

    /// <summary>
    /// Quest on the device reads, per kv head, the pages of largest bound Σ max(q·min, q·max) (the largest over the
    /// group's query heads) within the budget and the last page: its output equals float64 attention over exactly
    /// those pages (computed here from the same rule), and a budget covering the cache equals dense decoding.
    /// </summary>
    [CudaFact]
    public void Should_read_the_pages_quest_bounds_choose()
    {
        const int s = 2000, h = 8, hkv = 2, d = 128, budget = 512;
        TensorView<BFloat16> q4 = TestData.Random<BFloat16>(11, 1, 1, h, d), k = TestData.Random<BFloat16>(12, 1, s, hkv, d), v = TestData.Random<BFloat16>(13, 1, s, hkv, d);
        var q = new TensorView<BFloat16>(q4.ToArray(), 1, h, d);
        int pages = (s + 63) / 64, keep = budget / 64;
        using DevicePagedCache<BFloat16> cache = DevicePagedCache<BFloat16>.FromHost(k, v, [.. Enumerable.Range(0, pages).Reverse()]);
        using DeviceTensor<BFloat16> dq = DeviceTensor<BFloat16>.FromHost(q), dO = DeviceTensor<BFloat16>.Allocate(1, h, d), dense = DeviceTensor<BFloat16>.Allocate(1, h, d);
        CudaPagedDecode.Forward(dq, cache, dO, questTokenBudget: budget);
        BFloat16[] got = dO.ToHost();
        double worst = WorstOverChosenPages(q, k, v, got, keep, QuestTerm(k));
        Assert.True(worst < 1e-2, $"Quest on the GPU differs from attention over the pages its bound chooses by {worst:E3}");
        CudaPagedDecode.Forward(dq, cache, dO, questTokenBudget: pages * 64);   // every page (a budget of s tokens keeps ⌊s / 64⌋ pages, as on the CPU)
        CudaPagedDecode.Forward(dq, cache, dense);
        Assert.Equal(dense.ToHost(), dO.ToHost());
    }

    /// <summary>
    /// Landmark on the device reads, per kv head, the pages whose mean key scores highest (the largest q·mean over the
    /// group) within the budget, and the last page: its output equals float64 attention over exactly those pages
    /// (chosen here from float64 means), in a cache grown by appends (the means of appended pages are kept too); a
    /// budget covering the cache equals dense decoding.
    /// </summary>
    [CudaFact]
    public void Should_read_the_pages_landmark_means_choose()
    {
        const int s = 2000, h = 8, hkv = 2, d = 128, budget = 512;
        TensorView<BFloat16> q4 = TestData.Random<BFloat16>(51, 1, 1, h, d), k = TestData.Random<BFloat16>(52, 1, s, hkv, d), v = TestData.Random<BFloat16>(53, 1, s, hkv, d);
        var q = new TensorView<BFloat16>(q4.ToArray(), 1, h, d);
        int pages = (s + 63) / 64, keep = budget / 64;
        using DevicePagedCache<BFloat16> cache = DevicePagedCache<BFloat16>.FromHost(k.Slice(1, 0, 1500), v.Slice(1, 0, 1500), capacityTokens: s);
        cache.Append(k.Slice(1, 1500, s - 1500), v.Slice(1, 1500, s - 1500));
        using DeviceTensor<BFloat16> dq = DeviceTensor<BFloat16>.FromHost(q), dO = DeviceTensor<BFloat16>.Allocate(1, h, d), dense = DeviceTensor<BFloat16>.Allocate(1, h, d);
        CudaPagedDecode.ForwardLandmark(dq, cache, dO, budget);
        BFloat16[] got = dO.ToHost();
        // Landmark's score of a page for query element x: x times the page's mean key in channel c.
        double worst = WorstOverChosenPages(q, k, v, got, keep, (x, g, pg, c) =>
        {
            double mean = 0;
            for (int j = pg * 64; j < (pg + 1) * 64; j++) mean += (float)k[0, j, g, c];
            return x * mean / 64;
        });
        Assert.True(worst < 1e-2, $"Landmark on the GPU differs from attention over the pages its means choose by {worst:E3}");
        CudaPagedDecode.ForwardLandmark(dq, cache, dO, pages * 64);
        CudaPagedDecode.Forward(dq, cache, dense);
        Assert.Equal(dense.ToHost(), dO.ToHost());
        Assert.Throws<ArgumentOutOfRangeException>(() => CudaPagedDecode.ForwardLandmark(dq, cache, dO, 0));
    }

    /// <summary>
    /// Decoding over host-listed pages (one list per kv head, or one for all; StreamingLLM's sink and recent pages) equals
    /// float64 attention over exactly those pages' keys; every page listed equals dense decoding; bad lists are named.
    /// </summary>
    [CudaFact]
    public void Should_read_exactly_the_listed_pages()
    {
        const int s = 2000, h = 8, hkv = 2, d = 128;
        TensorView<BFloat16> q4 = TestData.Random<BFloat16>(41, 1, 1, h, d), k = TestData.Random<BFloat16>(42, 1, s, hkv, d), v = TestData.Random<BFloat16>(43, 1, s, hkv, d);
        var q = new TensorView<BFloat16>(q4.ToArray(), 1, h, d);
        int pages = (s + 63) / 64, group = h / hkv;
        using DevicePagedCache<BFloat16> cache = DevicePagedCache<BFloat16>.FromHost(k, v, [.. Enumerable.Range(0, pages).OrderBy(i => (i * 7919) % 104729)]);
        using DeviceTensor<BFloat16> dq = DeviceTensor<BFloat16>.FromHost(q), dO = DeviceTensor<BFloat16>.Allocate(1, h, d), dense = DeviceTensor<BFloat16>.Allocate(1, h, d);
        IReadOnlyList<int> streaming = cache.SinkAndRecentPages(64, 300);
        Assert.Equal([0, 26, 27, 28, 29, 30, 31], streaming);
        IReadOnlyList<int>[] lists = [[0, 3, 5, 31], streaming];
        CudaPagedDecode.Forward(dq, cache, dO, lists);
        BFloat16[] got = dO.ToHost();
        double worst = Enumerable.Range(0, hkv).Max(g => WorstOverPages(q, k, v, got, g, group, lists[g]));
        Assert.True(worst < 1e-2, $"decoding the listed pages differs from attention over them by {worst:E3}");
        // One list for every kv head = the same list given per head.
        CudaPagedDecode.Forward(dq, cache, dO, [streaming]);
        CudaPagedDecode.Forward(dq, cache, dense, [streaming, streaming]);
        Assert.Equal(dense.ToHost(), dO.ToHost());
        CudaPagedDecode.Forward(dq, cache, dO, [[.. Enumerable.Range(0, pages)]]);
        CudaPagedDecode.Forward(dq, cache, dense);
        Assert.Equal(dense.ToHost(), dO.ToHost());
        foreach (IReadOnlyList<int>[] bad in new IReadOnlyList<int>[][] { [[3, 1]], [[1, 1]], [[pages]], [[-1]], [[]], [[0], [1], [2]] })
        {
            Assert.Equal("pages", Assert.Throws<ArgumentException>(() => CudaPagedDecode.Forward(dq, cache, dO, bad)).ParamName);
        }
        Assert.Throws<ArgumentException>(() => cache.SinkAndRecentPages(0, 0));
        Assert.Throws<ArgumentOutOfRangeException>(() => cache.SinkAndRecentPages(-1, 64));
        Assert.Throws<ArgumentOutOfRangeException>(() => cache.SinkAndRecentPages(64, -1));
        using (DeviceBuffer<int> small = DeviceBuffer<int>.Allocate(4))
        {
            Assert.Throws<ArgumentOutOfRangeException>(() => small.CopyFrom([1, 2, 3], 2));
            Assert.Throws<ArgumentOutOfRangeException>(() => small.CopyFrom([1], -1));
        }
    }

    /// <summary>
    /// A cache grown by appends (pieces of 1, 7, 63, 64, 97 … tokens, into the last page and fresh pool pages) decodes
    /// exactly as one built from the same tokens at once — dense and Quest, bf16 and f16, after every append — so the
    /// pages, the table and the Quest summaries of the touched pages are what a full build gives.
    /// </summary>
    [CudaFact]
    public void Should_decode_an_appended_cache_as_one_built_at_once()
    {
        AppendAndCompare<BFloat16>();
        AppendAndCompare<Half>();
    }

    private static void AppendAndCompare<T>() where T : unmanaged
    {
        const int s = 1200, h = 8, hkv = 2, d = 128;
        TensorView<T> q4 = TestData.Random<T>(21, 1, 1, h, d), k = TestData.Random<T>(22, 1, s, hkv, d), v = TestData.Random<T>(23, 1, s, hkv, d);
        using DevicePagedCache<T> grown = DevicePagedCache<T>.FromHost(k.Slice(1, 0, 100), v.Slice(1, 0, 100), capacityTokens: s);
        using DeviceTensor<T> dq = DeviceTensor<T>.FromHost(new TensorView<T>(q4.ToArray(), 1, h, d));
        using DeviceTensor<T> a = DeviceTensor<T>.Allocate(1, h, d), b = DeviceTensor<T>.Allocate(1, h, d);
        int length = 100;
        foreach (int n in new[] { 1, 7, 63, 64, 97, 1, 300, 128, 439 })
        {
            grown.Append(k.Slice(1, length, n), v.Slice(1, length, n));
            length += n;
            Assert.Equal(length, grown.Length());
            Assert.Equal((length + 63) / 64, grown.Pages());
            using DevicePagedCache<T> whole = DevicePagedCache<T>.FromHost(k.Slice(1, 0, length), v.Slice(1, 0, length));
            foreach (int? budget in new int?[] { null, 256 })
            {
                CudaPagedDecode.Forward(dq, grown, a, questTokenBudget: budget);
                CudaPagedDecode.Forward(dq, whole, b, questTokenBudget: budget);
                Assert.True(a.ToHost().SequenceEqual(b.ToHost()), $"{typeof(T).Name}: after appending to {length} tokens (Quest budget {budget?.ToString() ?? "none"}) the grown cache decodes differently");
            }
        }
        Assert.Equal(s, length);
    }

    /// <summary>Appends past the capacity, with the wrong heads or dim, or to a decode of an empty cache are refused, and a refused append changes nothing.</summary>
    [CudaFact]
    public void Should_refuse_bad_appends_and_keep_the_cache_unchanged()
    {
        TensorView<BFloat16> k = TestData.Random<BFloat16>(31, 1, 130, 2, 64), v = TestData.Random<BFloat16>(32, 1, 130, 2, 64);
        using DevicePagedCache<BFloat16> cache = DevicePagedCache<BFloat16>.Create(2, 64, 128);
        using DeviceTensor<BFloat16> q = DeviceTensor<BFloat16>.FromHost(new TensorView<BFloat16>(TestData.Random<BFloat16>(33, 1, 1, 4, 64).ToArray(), 1, 4, 64));
        using DeviceTensor<BFloat16> o = DeviceTensor<BFloat16>.Allocate(1, 4, 64), before = DeviceTensor<BFloat16>.Allocate(1, 4, 64);
        Assert.Contains("empty", Assert.Throws<InvalidOperationException>(() => CudaPagedDecode.Forward(q, cache, o)).Message);
        cache.Append(k.Slice(1, 0, 100), v.Slice(1, 0, 100));
        CudaPagedDecode.Forward(q, cache, before);
        Assert.Contains("capacity of 128 tokens", Assert.Throws<InvalidOperationException>(() => cache.Append(k.Slice(1, 100, 30), v.Slice(1, 100, 30))).Message);
        Assert.Contains("k must be [1, n, 2, 64]", Assert.Throws<ArgumentException>(() => cache.Append(TestData.Random<BFloat16>(1, 1, 4, 3, 64), TestData.Random<BFloat16>(1, 1, 4, 3, 64))).Message);
        Assert.Contains("k must be [1, n, 2, 64]", Assert.Throws<ArgumentException>(() => cache.Append(TestData.Random<BFloat16>(1, 1, 4, 2, 32), TestData.Random<BFloat16>(1, 1, 4, 2, 32))).Message);
        Assert.Equal("v", Assert.Throws<ArgumentException>(() => cache.Append(k.Slice(1, 100, 4), v.Slice(1, 100, 5))).ParamName);
        Assert.Equal(100, cache.Length());
        CudaPagedDecode.Forward(q, cache, o);
        Assert.Equal(before.ToHost(), o.ToHost());
        cache.Append(k.Slice(1, 100, 28), v.Slice(1, 100, 28));   // exactly to the capacity
        Assert.Equal(128, cache.Length());
        Assert.Throws<ArgumentOutOfRangeException>(() => DevicePagedCache<BFloat16>.Create(2, 64, 0));
        Assert.Throws<NotSupportedException>(() => DevicePagedCache<BFloat16>.Create(2, 60, 64));
    }

    /// <summary>Quest's bound of a (full) page for query element x: max(x·min, x·max) of the page's keys in channel c.</summary>
    private static Func<double, int, int, int, double> QuestTerm(TensorView<BFloat16> k) => (x, g, pg, c) =>
    {
        double lo = double.PositiveInfinity, hi = double.NegativeInfinity;
        for (int j = pg * 64; j < (pg + 1) * 64; j++)
        {
            lo = Math.Min(lo, (float)k[0, j, g, c]);
            hi = Math.Max(hi, (float)k[0, j, g, c]);
        }
        return Math.Max(x * lo, x * hi);
    };

    /// <summary>
    /// A batch of sequences of different lengths (1 to 1025 tokens, their pages interleaved in the pool by round-robin
    /// appends) decodes in one launch: every row equals float64 attention over its own sequence — dense, Quest (each
    /// sequence's chosen pages; shorter sequences than the budget read all of theirs), a subset of the sequences in
    /// another order — and after two sequences are removed, a new sequence reuses their pages.
    /// </summary>
    [CudaFact]
    public void Should_decode_a_batch_of_sequences_of_different_lengths()
    {
        const int h = 8, hkv = 2, d = 128, budget = 256;
        int[] lengths = [1, 7, 97, 257, 1025];
        var k = new TensorView<BFloat16>[lengths.Length + 1];
        var v = new TensorView<BFloat16>[lengths.Length + 1];
        for (int i = 0; i <= lengths.Length; i++)
        {
            int n = i < lengths.Length ? lengths[i] : 300;   // the last: the sequence added after the removals
            k[i] = TestData.Random<BFloat16>(100 + i, 1, n, hkv, d);
            v[i] = TestData.Random<BFloat16>(200 + i, 1, n, hkv, d);
        }
        using DevicePagedCache<BFloat16> cache = DevicePagedCache<BFloat16>.Create(hkv, d, lengths.Sum() + 64 * lengths.Length, maxSequences: lengths.Length);
        for (int i = 1; i < lengths.Length; i++) Assert.Equal(i, cache.AddSequence());
        int[] filled = new int[lengths.Length];
        for (bool more = true; more;)
        {
            more = false;
            for (int i = 0; i < lengths.Length; i++)
            {
                int n = Math.Min(50, lengths[i] - filled[i]);
                if (n == 0) continue;
                cache.Append(k[i].Slice(1, filled[i], n), v[i].Slice(1, filled[i], n), i);
                filled[i] += n;
                more = true;
            }
        }
        for (int i = 0; i < lengths.Length; i++) Assert.Equal(lengths[i], cache.Length(i));
        var q = new TensorView<BFloat16>(TestData.Random<BFloat16>(300, lengths.Length, 1, h, d).ToArray(), lengths.Length, h, d);
        using DeviceTensor<BFloat16> dq = DeviceTensor<BFloat16>.FromHost(q), dO = DeviceTensor<BFloat16>.Allocate(lengths.Length, h, d);
        TensorView<BFloat16> Row(int b) => new(q.ToArray().AsSpan(b * h * d, h * d).ToArray(), 1, h, d);
        BFloat16[] RowOut(BFloat16[] all, int b) => all.AsSpan(b * h * d, h * d).ToArray();

        CudaPagedDecode.Forward(dq, cache, dO);
        BFloat16[] dense = dO.ToHost();
        CudaPagedDecode.Forward(dq, cache, dO, questTokenBudget: budget);
        BFloat16[] quest = dO.ToHost();
        for (int b = 0; b < lengths.Length; b++)
        {
            int pages = (lengths[b] + 63) / 64;
            for (int g = 0; g < hkv; g++)
            {
                double worst = WorstOverPages(Row(b), k[b], v[b], RowOut(dense, b), g, h / hkv, Enumerable.Range(0, pages));
                Assert.True(worst < 1e-2, $"batch row {b} ({lengths[b]} tokens), kv head {g}: dense decoding differs from float64 by {worst:E3}");
            }
            double worstQuest = WorstOverChosenPages(Row(b), k[b], v[b], RowOut(quest, b), budget / 64, QuestTerm(k[b]));
            Assert.True(worstQuest < 1e-2, $"batch row {b} ({lengths[b]} tokens): Quest differs from float64 over its pages by {worstQuest:E3}");
        }

        // A subset in another order: rows follow the listed sequences.
        using DeviceTensor<BFloat16> dq2 = DeviceTensor<BFloat16>.FromHost(new TensorView<BFloat16>([.. Row(4).ToArray(), .. Row(2).ToArray()], 2, h, d));
        using DeviceTensor<BFloat16> dO2 = DeviceTensor<BFloat16>.Allocate(2, h, d);
        CudaPagedDecode.Forward(dq2, cache, dO2, sequences: [4, 2]);
        BFloat16[] pair = dO2.ToHost();
        for (int g = 0; g < hkv; g++)
        {
            Assert.True(WorstOverPages(Row(4), k[4], v[4], RowOut(pair, 0), g, h / hkv, Enumerable.Range(0, 17)) < 1e-2, "sequences [4, 2]: row 0");
            Assert.True(WorstOverPages(Row(2), k[2], v[2], RowOut(pair, 1), g, h / hkv, Enumerable.Range(0, 2)) < 1e-2, "sequences [4, 2]: row 1");
        }

        // Removing sequences 1 and 3 frees their pages; the next sequence takes id 1 and reuses them.
        int free = cache.FreePages;
        cache.RemoveSequence(1);
        cache.RemoveSequence(3);
        Assert.Equal(free + 1 + 5, cache.FreePages);
        Assert.False(cache.HasSequence(3));
        Assert.Equal(1, cache.AddSequence());
        cache.Append(k[5], v[5], 1);
        Assert.Equal(free + 1, cache.FreePages);
        using DeviceTensor<BFloat16> dq3 = DeviceTensor<BFloat16>.FromHost(new TensorView<BFloat16>([.. Row(0).ToArray(), .. Row(1).ToArray()], 2, h, d));
        using DeviceTensor<BFloat16> dO3 = DeviceTensor<BFloat16>.Allocate(2, h, d);
        CudaPagedDecode.Forward(dq3, cache, dO3, sequences: [0, 1]);
        BFloat16[] after = dO3.ToHost();
        for (int g = 0; g < hkv; g++)
        {
            Assert.True(WorstOverPages(Row(0), k[0], v[0], RowOut(after, 0), g, h / hkv, [0]) < 1e-2, "after the removals: sequence 0");
            Assert.True(WorstOverPages(Row(1), k[5], v[5], RowOut(after, 1), g, h / hkv, Enumerable.Range(0, 5)) < 1e-2, "after the removals: the new sequence 1");
        }
    }

    /// <summary>
    /// Forks share their full pages and copy a partial last one; truncating into a shared page copies it first; every
    /// sequence then decodes as float64 attention over its own tokens, whatever the others append, truncate or remove.
    /// </summary>
    [CudaFact]
    public void Should_fork_and_truncate_sequences_sharing_pages()
    {
        const int h = 8, hkv = 2, d = 64;
        TensorView<BFloat16> k = TestData.Random<BFloat16>(61, 1, 400, hkv, d), v = TestData.Random<BFloat16>(62, 1, 400, hkv, d);
        TensorView<BFloat16> kAlt = TestData.Random<BFloat16>(63, 1, 400, hkv, d), vAlt = TestData.Random<BFloat16>(64, 1, 400, hkv, d);
        var q = new TensorView<BFloat16>(TestData.Random<BFloat16>(65, 1, 1, h, d).ToArray(), 1, h, d);
        using DevicePagedCache<BFloat16> cache = DevicePagedCache<BFloat16>.Create(hkv, d, 20 * 64, maxSequences: 3);
        using DeviceTensor<BFloat16> dq = DeviceTensor<BFloat16>.FromHost(q), dO = DeviceTensor<BFloat16>.Allocate(1, h, d);
        // The tokens each sequence should hold, as (source, first, count) runs.
        var held = new Dictionary<int, List<(TensorView<BFloat16> K, TensorView<BFloat16> V, int From, int Count)>>();
        void Append(int sequence, TensorView<BFloat16> ks, TensorView<BFloat16> vs, int from, int count)
        {
            cache.Append(ks.Slice(1, from, count), vs.Slice(1, from, count), sequence);
            held[sequence].Add((ks, vs, from, count));
        }
        void Check(int sequence, string when)
        {
            var runs = held[sequence];
            int n = runs.Sum(r => r.Count);
            Assert.Equal(n, cache.Length(sequence));
            var kh = new BFloat16[n * hkv * d];
            var vh = new BFloat16[n * hkv * d];
            int at = 0;
            foreach (var r in runs)
            {
                r.K.Slice(1, r.From, r.Count).ToArray().CopyTo(kh, at);
                r.V.Slice(1, r.From, r.Count).ToArray().CopyTo(vh, at);
                at += r.Count * hkv * d;
            }
            CudaPagedDecode.Forward(dq, cache, dO, sequences: [sequence]);
            BFloat16[] got = dO.ToHost();
            for (int g = 0; g < hkv; g++)
            {
                double worst = WorstOverPages(q, new TensorView<BFloat16>(kh, 1, n, hkv, d), new TensorView<BFloat16>(vh, 1, n, hkv, d), got, g, h / hkv, Enumerable.Range(0, (n + 63) / 64));
                Assert.True(worst < 1e-2, $"{when}: sequence {sequence} ({n} tokens) differs from float64 attention over its tokens by {worst:E3}");
            }
        }
        void Truncate(int sequence, int length)
        {
            cache.Truncate(sequence, length);
            var runs = held[sequence];
            int n = runs.Sum(r => r.Count);
            while (n > length)
            {
                var last = runs[^1];
                int cut = Math.Min(last.Count, n - length);
                runs[^1] = last with { Count = last.Count - cut };
                if (runs[^1].Count == 0) runs.RemoveAt(runs.Count - 1);
                n -= cut;
            }
        }

        held[0] = [];
        Append(0, k, v, 0, 200);                       // 3 full pages + 8 tokens
        int free = cache.FreePages;
        int fork = cache.Fork(0);
        held[fork] = [.. held[0]];
        Assert.Equal(free - 1, cache.FreePages);       // only the partial page is copied
        Append(fork, kAlt, vAlt, 0, 100);
        Append(0, k, v, 200, 30);
        Check(0, "after forking and appending to both");
        Check(fork, "after forking and appending to both");

        CudaPagedDecode.Forward(dq, cache, dO, sequences: [0]);
        BFloat16[] before = dO.ToHost();
        free = cache.FreePages;
        Truncate(fork, 150);                           // into page 2, shared with sequence 0: copied; the fork's pages 3, 4 freed
        Assert.Equal(free + 2 - 1, cache.FreePages);
        Check(fork, "after truncating into a shared page");
        CudaPagedDecode.Forward(dq, cache, dO, sequences: [0]);
        Assert.Equal(before, dO.ToHost());             // the sharer is untouched
        Append(fork, kAlt, vAlt, 200, 20);
        Check(fork, "after appending to the truncated fork");

        Truncate(fork, 128);                           // a page boundary
        Check(fork, "after truncating to a page boundary");
        int second = cache.Fork(fork);                 // only full pages: nothing copied
        held[second] = [.. held[fork]];
        Check(second, "a fork of full pages only");
        cache.RemoveSequence(0);
        held.Remove(0);
        Check(fork, "after removing the first sharer");
        Truncate(fork, 0);
        Append(fork, kAlt, vAlt, 300, 70);
        Check(fork, "after truncating to nothing and appending");
        Check(second, "the other fork, unchanged");
        Assert.Equal("length", Assert.Throws<ArgumentOutOfRangeException>(() => cache.Truncate(fork, 71)).ParamName);
        Assert.Equal(0, cache.Fork(second));           // the lowest free id
        Assert.Contains("maximum of 3", Assert.Throws<InvalidOperationException>(() => cache.Fork(second)).Message);
    }

    /// <summary>
    /// H2O on the device follows the CPU policy's rules step by step: a float64 replay here (the first step reads every
    /// page; then the recent window, never-read pages and the kept pages of largest accumulated mass within the heavy
    /// budget; the rest evicted for good; each read page's mass — the mean over the group of its softmax share — added to
    /// its score) predicts the pages of every step, and the GPU's output equals float64 attention over exactly them
    /// (appending 16 tokens a step, so pages leave the window and compete); a heavy budget covering the cache equals
    /// dense decoding, bitwise.
    /// </summary>
    [CudaFact]
    public void Should_keep_the_heavy_hitters_the_cpu_rules_keep()
    {
        const int h = 8, hkv = 2, d = 64, group = h / hkv, prompt = 1000, steps = 40, perStep = 16, heavyTokens = 256, recentTokens = 128;
        int total = prompt + (steps * perStep);
        TensorView<BFloat16> k = TestData.Random<BFloat16>(71, 1, total, hkv, d), v = TestData.Random<BFloat16>(72, 1, total, hkv, d);
        using DevicePagedCache<BFloat16> cache = DevicePagedCache<BFloat16>.Create(hkv, d, total);
        using DevicePagedCache<BFloat16> twin = DevicePagedCache<BFloat16>.Create(hkv, d, total);
        cache.Append(k.Slice(1, 0, prompt), v.Slice(1, 0, prompt));
        twin.Append(k.Slice(1, 0, prompt), v.Slice(1, 0, prompt));
        using var state = new DeviceHeavyHitters(heavyTokens, recentTokens);
        using var everything = new DeviceHeavyHitters(total, recentTokens);
        using DeviceTensor<BFloat16> dO = DeviceTensor<BFloat16>.Allocate(1, h, d), dense = DeviceTensor<BFloat16>.Allocate(1, h, d);
        // The float64 replay: per kv head a score and a state (0 unread, 1 kept, 2 evicted) per page.
        var score = new double[hkv][];
        var kept = new int[hkv][];
        for (int g = 0; g < hkv; g++)
        {
            score[g] = new double[(total + 63) / 64];
            kept[g] = new int[score[g].Length];
        }
        int length = prompt;
        for (int step = 0; step < steps; step++)
        {
            var q = new TensorView<BFloat16>(TestData.Random<BFloat16>(1000 + step, 1, 1, h, d).ToArray(), 1, h, d);
            using DeviceTensor<BFloat16> dq = DeviceTensor<BFloat16>.FromHost(q);
            CudaPagedDecode.ForwardHeavyHitters(dq, cache, dO, state);
            BFloat16[] got = dO.ToHost();
            int pages = (length + 63) / 64, firstRecent = Math.Max(0, pages - (recentTokens / 64));
            TensorView<BFloat16> kNow = k.Slice(1, 0, length), vNow = v.Slice(1, 0, length);
            for (int g = 0; g < hkv; g++)
            {
                int[] heavy = [.. Enumerable.Range(0, firstRecent).Where(pg => kept[g][pg] == 1).OrderByDescending(pg => score[g][pg]).ThenBy(pg => pg).Take(heavyTokens / 64)];
                for (int pg = 0; pg < firstRecent; pg++) if (kept[g][pg] == 1 && !heavy.Contains(pg)) kept[g][pg] = 2;
                int[] read = [.. Enumerable.Range(0, pages).Where(pg => pg >= firstRecent || kept[g][pg] == 0 || heavy.Contains(pg))];
                double worst = WorstOverPages(q, kNow, vNow, got, g, group, read);
                Assert.True(worst < 1e-2, $"step {step}, kv head {g}: H2O on the GPU differs from float64 attention over the replayed pages by {worst:E3}");
                // The step's masses, float64.
                int[] keys = [.. read.SelectMany(pg => Enumerable.Range(pg * 64, Math.Min(64, length - (pg * 64))))];
                var mass = new double[pages];
                for (int r = 0; r < group; r++)
                {
                    int hh = (g * group) + r;
                    double[] w = [.. keys.Select(j => Enumerable.Range(0, d).Sum(c => (double)(float)q[0, hh, c] * (float)kNow[0, j, g, c]) / Math.Sqrt(d))];
                    double m = w.Max(), z = w.Sum(x => Math.Exp(x - m));
                    for (int i = 0; i < keys.Length; i++) mass[keys[i] / 64] += Math.Exp(w[i] - m) / z / group;
                }
                foreach (int pg in read)
                {
                    score[g][pg] += mass[pg];
                    kept[g][pg] = 1;
                }
            }
            CudaPagedDecode.ForwardHeavyHitters(dq, twin, dO, everything);
            CudaPagedDecode.Forward(dq, twin, dense);
            Assert.Equal(dense.ToHost(), dO.ToHost());
            cache.Append(k.Slice(1, length, perStep), v.Slice(1, length, perStep));
            twin.Append(k.Slice(1, length, perStep), v.Slice(1, length, perStep));
            length += perStep;
        }
        Assert.True(state.LastStepPages < (length + 63) / 64, "the heavy budget should leave pages unread by the end");
        Assert.Throws<ArgumentOutOfRangeException>(() => new DeviceHeavyHitters(-1, 64));
        Assert.Throws<ArgumentOutOfRangeException>(() => new DeviceHeavyHitters(64, 0));
        using DeviceTensor<BFloat16> q1 = DeviceTensor<BFloat16>.Allocate(1, h, d);
        Assert.Contains("another cache", Assert.Throws<InvalidOperationException>(() => CudaPagedDecode.ForwardHeavyHitters(q1, twin, dO, state)).Message);
        cache.Truncate(0, 500);
        cache.Append(k.Slice(1, 0, 100), v.Slice(1, 0, 100));   // growing again does not make the old scores hold
        Assert.Contains("truncated or replaced", Assert.Throws<InvalidOperationException>(() => CudaPagedDecode.ForwardHeavyHitters(q1, cache, dO, state)).Message);
    }

    /// <summary>
    /// A batched append (one call for several sequences: 1 token a step across page boundaries, then 20 at once, f16 and
    /// bf16) leaves every sequence decoding exactly as appending sequence by sequence does — dense and Quest, bitwise —
    /// and bad batches (a sequence twice, a row count that is not the list's, no room) change nothing.
    /// </summary>
    [CudaFact]
    public void Should_append_to_a_batch_as_sequence_by_sequence()
    {
        BatchedAppend<BFloat16>();
        BatchedAppend<Half>();
    }

    private static void BatchedAppend<T>() where T : unmanaged
    {
        const int h = 8, hkv = 2, d = 64, steps = 70;
        int[] start = [63, 64, 130];
        int[] ids = [2, 0, 1];   // rows of each batched append, in this order
        int most = start.Max() + steps + 40 + 10;   // room for the bad appends' rows below
        var k = new TensorView<T>[3];
        var v = new TensorView<T>[3];
        for (int i = 0; i < 3; i++)
        {
            k[i] = TestData.Random<T>(80 + i, 1, most, hkv, d);
            v[i] = TestData.Random<T>(90 + i, 1, most, hkv, d);
        }
        using DevicePagedCache<T> batched = DevicePagedCache<T>.Create(hkv, d, 3 * most, maxSequences: 3), single = DevicePagedCache<T>.Create(hkv, d, 3 * most, maxSequences: 3);
        foreach (DevicePagedCache<T> cache in new[] { batched, single })
        {
            cache.AddSequence();
            cache.AddSequence();
            for (int i = 0; i < 3; i++) cache.Append(k[i].Slice(1, 0, start[i]), v[i].Slice(1, 0, start[i]), i);
        }
        var q = new TensorView<T>(TestData.Random<T>(99, 3, 1, h, d).ToArray(), 3, h, d);
        using DeviceTensor<T> dq = DeviceTensor<T>.FromHost(q), a = DeviceTensor<T>.Allocate(3, h, d), b = DeviceTensor<T>.Allocate(3, h, d);
        int[] length = [.. start];
        TensorView<T> Rows(TensorView<T>[] x, int n)
        {
            // [3 rows in ids' order, n tokens, Hkv, D]
            var data = new List<T>();
            foreach (int id in ids) data.AddRange(x[id].Slice(1, length[id], n).ToArray());
            return new TensorView<T>([.. data], 3, n, hkv, d);
        }
        foreach (int n in Enumerable.Repeat(1, steps).Concat([20, 20]))
        {
            batched.Append(Rows(k, n), Rows(v, n), ids);
            foreach (int id in ids)
            {
                single.Append(k[id].Slice(1, length[id], n), v[id].Slice(1, length[id], n), id);
                length[id] += n;
            }
            foreach (int? budget in new int?[] { null, 128 })
            {
                CudaPagedDecode.Forward(dq, batched, a, questTokenBudget: budget);
                CudaPagedDecode.Forward(dq, single, b, questTokenBudget: budget);
                Assert.True(a.ToHost().SequenceEqual(b.ToHost()), $"{typeof(T).Name}: after a batched append of {n} (lengths {string.Join(", ", length)}, Quest {budget?.ToString() ?? "none"}) the decodes differ");
            }
        }
        for (int i = 0; i < 3; i++) Assert.Equal(length[i], batched.Length(i));
        int free = batched.FreePages;
        Assert.Equal("sequences", Assert.Throws<ArgumentException>(() => batched.Append(Rows(k, 1), Rows(v, 1), [0, 1, 0])).ParamName);
        Assert.Equal("k", Assert.Throws<ArgumentException>(() => batched.Append(Rows(k, 1), Rows(v, 1), [0, 1])).ParamName);
        var big = new TensorView<T>(new T[3 * 100 * hkv * d], 3, 100, hkv, d);   // 16 pages needed in all, the pool has 12
        Assert.Contains("capacity", Assert.Throws<InvalidOperationException>(() => batched.Append(big, big, ids)).Message);
        Assert.Equal(free, batched.FreePages);
        for (int i = 0; i < 3; i++) Assert.Equal(length[i], batched.Length(i));
    }

    /// <summary>Batches naming missing, removed or empty sequences, too many sequences, and a full shared pool are named.</summary>
    [CudaFact]
    public void Should_name_bad_batches()
    {
        TensorView<BFloat16> k = TestData.Random<BFloat16>(41, 1, 100, 2, 64);
        using DevicePagedCache<BFloat16> cache = DevicePagedCache<BFloat16>.Create(2, 64, 192, maxSequences: 3);
        cache.Append(k, k);
        Assert.Equal(1, cache.AddSequence());
        using DeviceTensor<BFloat16> q2 = DeviceTensor<BFloat16>.Allocate(2, 4, 64), o2 = DeviceTensor<BFloat16>.Allocate(2, 4, 64);
        Assert.Contains("empty", Assert.Throws<InvalidOperationException>(() => CudaPagedDecode.Forward(q2, cache, o2)).Message);
        cache.Append(k.Slice(1, 0, 64), k.Slice(1, 0, 64), 1);
        CudaPagedDecode.Forward(q2, cache, o2);
        Assert.Equal("sequences", Assert.Throws<ArgumentException>(() => CudaPagedDecode.Forward(q2, cache, o2, sequences: [0])).ParamName);
        Assert.Equal("sequences", Assert.Throws<ArgumentOutOfRangeException>(() => CudaPagedDecode.Forward(q2, cache, o2, sequences: [0, 2])).ParamName);
        Assert.Equal("sequence", Assert.Throws<ArgumentOutOfRangeException>(() => cache.Append(k, k, 7)).ParamName);
        Assert.Equal("q", Assert.Throws<ArgumentException>(() => CudaPagedDecode.Forward(q2, cache, o2, [[0]])).ParamName);
        Assert.Equal(2, cache.AddSequence());
        Assert.Contains("maximum of 3", Assert.Throws<InvalidOperationException>(() => cache.AddSequence()).Message);
        // The pool (3 pages) holds sequence 0's two and sequence 1's one: nothing is left for sequence 2.
        Assert.Contains("capacity of 192 tokens", Assert.Throws<InvalidOperationException>(() => cache.Append(k.Slice(1, 0, 1), k.Slice(1, 0, 1), 2)).Message);
        cache.RemoveSequence(0);
        Assert.Equal("sequence", Assert.Throws<ArgumentOutOfRangeException>(() => cache.RemoveSequence(0)).ParamName);
        Assert.Equal("sequences", Assert.Throws<ArgumentOutOfRangeException>(() => CudaPagedDecode.Forward(q2, cache, o2)).ParamName);
        cache.Append(k, k, 2);   // sequence 0's pages serve sequence 2 now
        CudaPagedDecode.Forward(q2, cache, o2, sequences: [2, 1]);
    }

    /// <summary>
    /// The largest difference from float64 attention over the pages a page score chooses per kv head: every page but the
    /// last scores the largest over the group's query heads of Σ_c term(q_c, kv head, page, c); the keep − 1 best and the
    /// last page are read (the device's rule for Quest and Landmark).
    /// </summary>
    private static double WorstOverChosenPages(TensorView<BFloat16> q, TensorView<BFloat16> k, TensorView<BFloat16> v, BFloat16[] got, int keep,
        Func<double, int, int, int, double> term)
    {
        int s = k.Dim(1), hkv = k.Dim(2), d = k.Dim(3), group = q.Dim(1) / hkv, pages = (s + 63) / 64;
        double worst = 0;
        for (int g = 0; g < hkv; g++)
        {
            var score = new double[pages - 1];
            for (int pg = 0; pg < pages - 1; pg++)
                score[pg] = Enumerable.Range(0, group).Max(r => Enumerable.Range(0, d).Sum(c => term((float)q[0, (g * group) + r, c], g, pg, c)));
            int[] chosen = [.. Enumerable.Range(0, pages - 1).OrderByDescending(pg => score[pg]).Take(keep - 1).Append(pages - 1)];
            worst = Math.Max(worst, WorstOverPages(q, k, v, got, g, group, chosen));
        }
        return worst;
    }

    /// <summary>
    /// The largest difference between the GPU's output rows of kv head <paramref name="g"/>'s query heads and float64
    /// attention over exactly the keys of <paramref name="pages"/> (64-token pages; q [1, H, D], k/v [1, S, Hkv, D]).
    /// </summary>
    private static double WorstOverPages(TensorView<BFloat16> q, TensorView<BFloat16> k, TensorView<BFloat16> v, BFloat16[] got, int g, int group, IEnumerable<int> pages)
    {
        int s = k.Dim(1), d = k.Dim(3);
        double scale = 1 / Math.Sqrt(d), worst = 0;
        int[] keys = [.. pages.SelectMany(pg => Enumerable.Range(pg * 64, Math.Min(64, s - (pg * 64))))];
        for (int r = 0; r < group; r++)
        {
            int hh = (g * group) + r;
            double[] w = [.. keys.Select(j => Enumerable.Range(0, d).Sum(c => (double)(float)q[0, hh, c] * (float)k[0, j, g, c]) * scale)];
            double m = w.Max(), z = w.Sum(x => Math.Exp(x - m));
            for (int c = 0; c < d; c++)
            {
                double expected = keys.Select((j, i) => Math.Exp(w[i] - m) / z * (float)v[0, j, g, c]).Sum();
                worst = Math.Max(worst, Math.Abs(expected - (float)got[(hh * d) + c]));
            }
        }
        return worst;
    }

    [CudaFact]
    public void Should_name_bad_input_of_the_paged_cache()
    {
        TensorView<BFloat16> k = TestData.Random<BFloat16>(1, 1, 100, 2, 64);
        Assert.Contains("permutation", Assert.Throws<ArgumentException>(() => DevicePagedCache<BFloat16>.FromHost(k, k, [0, 0])).Message);
        Assert.Throws<NotSupportedException>(() => DevicePagedCache<float>.FromHost(TestData.Random<float>(1, 1, 100, 2, 64), TestData.Random<float>(1, 1, 100, 2, 64)));
        using DevicePagedCache<BFloat16> cache = DevicePagedCache<BFloat16>.FromHost(k, k);
        using DeviceTensor<BFloat16> q = DeviceTensor<BFloat16>.Allocate(1, 4, 64), wrong = DeviceTensor<BFloat16>.Allocate(1, 4, 32), o = DeviceTensor<BFloat16>.Allocate(1, 4, 64);
        Assert.Equal("q", Assert.Throws<ArgumentException>(() => CudaPagedDecode.Forward(wrong, cache, o)).ParamName);
        Assert.Throws<ArgumentOutOfRangeException>(() => CudaPagedDecode.Forward(q, cache, o, questTokenBudget: 0));
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
