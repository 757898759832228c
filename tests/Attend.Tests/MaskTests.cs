using Attend.Masks;
using Attend.Reference;
using Attend.Tensors;

namespace Attend.Tests;

public sealed class MaskTests
{
    public static TheoryData<string> MaskNames() => [.. Catalog(64, 64).Keys];

    /// <summary>Built-ins and compositions over Sq × Skv (Sq = Skv where the mask needs it).</summary>
    private static Dictionary<string, Mask> Catalog(int sq, int skv)
    {
        int[] docs = Enumerable.Range(0, sq).Select(i => i < 20 ? 0 : i < 45 ? 1 : 2).ToArray();
        var m = new Dictionary<string, Mask>
        {
            ["full"] = Mask.Full,
            ["causal"] = Mask.Causal,
            ["window(7,0)"] = Mask.SlidingWindow(7),
            ["window(5,3)"] = Mask.SlidingWindow(5, 3),
            ["causal&window(9)"] = Mask.Causal & Mask.SlidingWindow(9),
            ["sink(4)|causal&window(6)"] = Mask.Sink(4) | (Mask.Causal & Mask.SlidingWindow(6)),
            ["prefix(10)|causal"] = Mask.Prefix(10) | Mask.Causal,
            ["!causal"] = !Mask.Causal,
            ["predicate"] = Mask.FromPredicate((b, h, q, kv) => (q * 7 + kv * 3 + h) % 5 != 0),
            ["causal&!window(3)"] = Mask.Causal & !Mask.SlidingWindow(3),
            ["dilated(5,3)"] = Mask.DilatedWindow(5, 3),
            ["dilated(9,1)"] = Mask.DilatedWindow(9, 1),
            ["strided_shards(8,2,3)"] = Mask.StridedShards(8, 2, 3),
            ["head_windows(5,17)"] = Mask.HeadWindows(5, 17),
            ["head_chunks&causal"] = Mask.HeadChunks(10, [[0, 2], [1, 3, 4]]) & Mask.Causal,
            ["global(3,20)|causal&window(4)"] = Mask.GlobalTokens(3, 20) | (Mask.Causal & Mask.SlidingWindow(4)),
            ["global_columns(0,1)|window(2,2)"] = Mask.GlobalColumns(0, 1) | Mask.SlidingWindow(2, 2),
            ["regions"] = Mask.Regions([(0, 10, 5, 30), (20, 40, 0, 8), (30, 64, 30, 48)]),
        };
        if (sq == skv)
        {
            int[] d = sq == 64 ? docs : Enumerable.Range(0, sq).Select(i => i * 3 / sq).ToArray();
            m["document"] = Mask.Document(d);
            m["block_causal(16)&document"] = Mask.BlockCausal(16) & Mask.Document(d);
            m["document&causal"] = Mask.Document(d) & Mask.Causal;
            m["shifted_groups(8)&causal"] = Mask.ShiftedGroups(8) & Mask.Causal;
            m["shifted_groups(6)"] = Mask.ShiftedGroups(6);
            m["blockrank"] = Mask.BlockDiagonal(d, 5, sq - 1);
        }
        if (sq == 64 && skv == 64)
        {
            m["nbh1d(k7,d3)"] = Mask.Neighborhood([64], [7], [3]);
            m["nbh2d(8x8,k3,d2)"] = Mask.Neighborhood([8, 8], [3, 3], [2, 2]);
            m["nbh2d(8x8,k5,causal-y)"] = Mask.Neighborhood([8, 8], [5, 3], [1, 1], [true, false]);
            m["nbh3d(4x4x4,k3)"] = Mask.Neighborhood([4, 4, 4], [3, 3, 3], [1, 1, 1], [false, false, true]);
            m["nbh2d&causal"] = Mask.Neighborhood([8, 8], [3, 5]) & Mask.Causal;
            m["block_causal(24)"] = Mask.BlockCausal(24);
            m["nbh2d(8x8,k5x3,stride 2x3)"] = Mask.Neighborhood([8, 8], [5, 3], [1, 1], null, [2, 3]);
            m["nbh1d(k5,d2,stride 4,causal)"] = Mask.Neighborhood([64], [5], [2], [true], [4]);
        }
        return m;
    }

    private static readonly (int Sq, int Skv)[] Extents = [(64, 64), (64, 48), (48, 64), (1, 33)];

    /// <summary>Where a mask gives a row as runs, the runs are exactly the keys <c>Allows</c> accepts.</summary>
    [Theory]
    [MemberData(nameof(MaskNames))]
    public void Row_runs_equal_elementwise_allows(string name)
    {
        Span<(int Start, int End)> runs = stackalloc (int, int)[64];
        foreach ((int sq, int skv) in Extents)
        {
            if (!Catalog(sq, skv).TryGetValue(name, out Mask? mask)) continue;
            var e = new MaskExtent(1, 2, sq, skv);
            foreach (int width in new[] { 5, 16, 64 })
                for (int h = 0; h < 2; h++)
                    for (int q = 0; q < sq; q++)
                        for (int k0 = 0; k0 < skv; k0 += width)
                        {
                            int k1 = Math.Min(k0 + width, skv);
                            int n = mask.RowRuns(e, 0, h, q, k0, k1, runs);
                            if (n < 0) continue;
                            var fromRuns = new HashSet<int>();
                            for (int i = 0; i < n; i++)
                            {
                                Assert.True(runs[i].Start >= k0 && runs[i].End <= k1 && runs[i].Start < runs[i].End, $"{name}: run {runs[i]} outside [{k0},{k1})");
                                if (i > 0) Assert.True(runs[i].Start > runs[i - 1].End - 1, $"{name}: runs not ascending");
                                for (int kv = runs[i].Start; kv < runs[i].End; kv++) fromRuns.Add(kv);
                            }
                            for (int kv = k0; kv < k1; kv++)
                            {
                                Assert.True(fromRuns.Contains(kv) == mask.Allows(e, 0, h, q, kv), $"{name} Sq={sq} Skv={skv} h={h} q={q} kv={kv}: runs say {fromRuns.Contains(kv)}");
                            }
                        }
        }
    }

    [Theory]
    [MemberData(nameof(MaskNames))]
    public void Should_classify_blocks_exactly_as_elementwise_allows_says(string name)
    {
        foreach ((int sq, int skv) in Extents)
        {
            if (!Catalog(sq, skv).TryGetValue(name, out Mask? mask)) continue;
            var e = new MaskExtent(1, 2, sq, skv);
            foreach ((int bq, int bk) in new[] { (7, 5), (16, 16), (64, 64), (3, 11) })
            {
                for (int h = 0; h < 2; h++)
                    for (int q0 = 0; q0 < sq; q0 += bq)
                        for (int k0 = 0; k0 < skv; k0 += bk)
                        {
                            int q1 = Math.Min(q0 + bq, sq), k1 = Math.Min(k0 + bk, skv);
                            int allowed = 0;
                            for (int q = q0; q < q1; q++)
                                for (int kv = k0; kv < k1; kv++)
                                    if (mask.Allows(e, 0, h, q, kv)) allowed++;
                            BlockClass c = mask.Classify(e, 0, h, q0, q1, k0, k1);
                            string where = $"{name} Sq={sq} Skv={skv} block [{q0},{q1})x[{k0},{k1})";
                            if (allowed == 0) Assert.True(c is BlockClass.Empty or BlockClass.Partial, $"{where}: {c} but nothing allowed");
                            else if (allowed == (q1 - q0) * (k1 - k0)) Assert.True(c is BlockClass.Full or BlockClass.Partial, $"{where}: {c} but all allowed");
                            else Assert.True(c == BlockClass.Partial, $"{where}: {c} but {allowed} of {(q1 - q0) * (k1 - k0)} allowed");
                            // Built-ins must be exact (no needless Partial) on single masks.
                            if (name is "causal" or "window(7,0)" or "window(5,3)" or "full")
                            {
                                BlockClass exact = allowed == 0 ? BlockClass.Empty : allowed == (q1 - q0) * (k1 - k0) ? BlockClass.Full : BlockClass.Partial;
                                Assert.True(c == exact, $"{where}: {c}, exactly {exact}");
                            }
                        }
            }
        }
    }

    [Theory]
    [MemberData(nameof(MaskNames))]
    public void Should_give_row_intervals_that_match_allows(string name)
    {
        foreach ((int sq, int skv) in Extents)
        {
            if (!Catalog(sq, skv).TryGetValue(name, out Mask? mask)) continue;
            var e = new MaskExtent(1, 2, sq, skv);
            for (int h = 0; h < 2; h++)
                for (int q = 0; q < sq; q++)
                    foreach ((int k0, int k1) in new[] { (0, skv), (5, Math.Min(29, skv)), (skv / 2, skv) })
                    {
                        if (!mask.TryRowInterval(e, 0, h, q, k0, k1, out int start, out int end)) continue;
                        Assert.True(k0 <= start && start <= end && end <= k1, $"{name}: [{start},{end}) outside [{k0},{k1})");
                        for (int kv = k0; kv < k1; kv++)
                            Assert.True((kv >= start && kv < end) == mask.Allows(e, 0, h, q, kv), $"{name} q={q} kv={kv} interval [{start},{end})");
                    }
        }
    }

    [Theory]
    [MemberData(nameof(MaskNames))]
    public void Should_plan_exactly_the_allowed_pairs(string name)
    {
        foreach ((int sq, int skv) in Extents)
        {
            if (!Catalog(sq, skv).TryGetValue(name, out Mask? mask)) continue;
            var e = new MaskExtent(1, 2, sq, skv);
            BlockMask plan = BlockMask.Create(mask, 1, 2, sq, skv, blockQ: 8, blockK: 16);
            for (int h = 0; h < 2; h++)
            {
                bool[,] dense = plan.ToDense(0, h);
                for (int q = 0; q < sq; q++)
                    for (int kv = 0; kv < skv; kv++)
                        Assert.True(dense[q, kv] == mask.Allows(e, 0, h, q, kv), $"{name} Sq={sq} Skv={skv} h={h} ({q},{kv})");
            }
        }
    }

    [Theory]
    [MemberData(nameof(MaskNames))]
    public void Should_execute_masks_like_the_reference(string name)
    {
        foreach ((int sq, int skv) in new[] { (64, 64), (64, 48), (48, 64) })
        {
            if (!Catalog(sq, skv).TryGetValue(name, out Mask? mask)) continue;
            var options = new AttentionOptions { Mask = mask };
            int b = 1, h = 2, hkv = 1, d = 24;
            AttentionConformance.Check<float>(b, sq, skv, h, hkv, d, options,
                new[] { KernelPath.Scalar, KernelPath.Vector256, KernelPath.Vector512 }.Select(path => (path.ToString(), (AttentionRunner<float>)((q, k, v, o, lse, opt) =>
                    Attention.Forward(q, k, v, o, opt, lse, new KernelTuning { Path = path, Threads = 2, BlockQ = 16 })))).ToList());
        }
    }

    [Fact]
    public void Should_execute_a_prebuilt_plan_with_128_key_blocks()
    {
        int s = 300;
        BlockMask plan = BlockMask.Create(Mask.Sink(8) | (Mask.Causal & Mask.SlidingWindow(100)), 1, 2, s, s, blockQ: 64, blockK: 128);
        AttentionConformance.Check<BFloat16>(1, s, s, 2, 2, 32, new AttentionOptions { Plan = plan }, "plan",
            (q, k, v, o, lse, opt) => Attention.Forward(q, k, v, o, opt, lse));
    }

    [Fact]
    public void Should_follow_natten_window_semantics_on_small_grids()
    {
        // 1-D, length 7, kernel 3: the border query 0 sees 0,1,2 (shifted in), query 6 sees 4,5,6, query 3 sees 2,3,4.
        Assert.Equal(0, NeighborhoodStart(0, 7, 3, 1));
        Assert.Equal(4, NeighborhoodStart(6, 7, 3, 1));
        Assert.Equal(2, NeighborhoodStart(3, 7, 3, 1));
        // Dilation 2 over length 9: groups {0,2,4,6,8} and {1,3,5,7}; query 8 (group 0, local 4) sees 4,6,8;
        // query 7 (group 1 of 4 positions, local 3) sees 3,5,7; query 1 sees 1,3,5.
        Assert.Equal(4, NeighborhoodStart(8, 9, 3, 2));
        Assert.Equal(3, NeighborhoodStart(7, 9, 3, 2));
        Assert.Equal(1, NeighborhoodStart(1, 9, 3, 2));
        // 2-D 5x5 grid, kernel 3x3: the corner (0,0) sees the 3x3 top-left square, the centre its 3x3 neighbourhood.
        Mask m = Mask.Neighborhood([5, 5], [3, 3]);
        var e = new MaskExtent(1, 1, 25, 25);
        int[] corner = Enumerable.Range(0, 25).Where(kv => m.Allows(e, 0, 0, 0, kv)).ToArray();
        Assert.Equal([0, 1, 2, 5, 6, 7, 10, 11, 12], corner);
        int[] centre = Enumerable.Range(0, 25).Where(kv => m.Allows(e, 0, 0, 12, kv)).ToArray();
        Assert.Equal([6, 7, 8, 11, 12, 13, 16, 17, 18], centre);
        // Every query sees exactly kernel^2 keys (shifted, never truncated).
        for (int q = 0; q < 25; q++) Assert.Equal(9, Enumerable.Range(0, 25).Count(kv => m.Allows(e, 0, 0, q, kv)));
        // Causal 1-D, kernel 3: query 1 sees 0,1; query 5 sees 3,4,5.
        Mask c = Mask.Neighborhood([8], [3], causal: [true]);
        var e8 = new MaskExtent(1, 1, 8, 8);
        Assert.Equal([0, 1], Enumerable.Range(0, 8).Where(kv => c.Allows(e8, 0, 0, 1, kv)).ToArray());
        Assert.Equal([3, 4, 5], Enumerable.Range(0, 8).Where(kv => c.Allows(e8, 0, 0, 5, kv)).ToArray());
    }

    [Fact]
    public void Should_run_a_3d_neighborhood_like_the_reference()
    {
        Mask m = Mask.Neighborhood([3, 4, 5], [3, 3, 3], [1, 1, 1], [false, true, false]);
        AttentionConformance.Check<float>(1, 60, 60, 2, 2, 16, new AttentionOptions { Mask = m }, "nbh3d",
            (q, k, v, o, lse, opt) => Attention.Forward(q, k, v, o, opt, lse, new KernelTuning { BlockQ = 16 }));
        Mask dilated = Mask.Neighborhood([12, 10], [3, 5], [2, 2]);
        BlockMask plan = BlockMask.Create(dilated, 1, 1, 120, 120, 16, 16);
        var e = new MaskExtent(1, 1, 120, 120);
        bool[,] dense = plan.ToDense();
        for (int q = 0; q < 120; q++)
            for (int kv = 0; kv < 120; kv++)
                Assert.Equal(dilated.Allows(e, 0, 0, q, kv), dense[q, kv]);
    }

    /// <summary>
    /// Strided NA against an independent transcription of NATTEN's per-axis rule (its Flex backend's mask): per
    /// dilation group, the stride group's leader (centre query, or last query when causal) picks the window; the
    /// window is clamped inside the axis; a causal window still ends at the query.
    /// </summary>
    [Fact]
    public void Strided_neighborhoods_follow_natten()
    {
        static bool Natten(int q, int kv, int length, int k, int s, int d, bool causal)
        {
            int qg = q % d, kg = kv % d, qd = q / d, kd = kv / d;
            if (qg != kg) return false;
            int padding = 1 - ((qg + (d - (length % d))) / d);
            int corrected = (length / d) + padding;
            if (causal)
            {
                int leader = Math.Min((qd / s * s) + s - 1, corrected - 1);
                return qd - kd >= 0 && leader - kd < k;
            }
            int lead = Math.Min((qd / s * s) + (s / 2), corrected - 1);
            int left = k / 2, right = (k / 2) + ((k % 2) - 1);
            int center = Math.Clamp(lead, left, corrected - 1 - right);
            int w0 = center - kv / d, w1 = kv / d - center;
            return (w0 >= 0 && w0 <= left) || (w1 >= 0 && w1 <= right);
        }
        int checkedPairs = 0;
        foreach (int length in new[] { 9, 16, 23 })
            foreach (int k in new[] { 1, 3, 5, 7 })
                foreach (int d in new[] { 1, 2, 3 })
                    foreach (bool causal in new[] { false, true })
                        for (int s = 1; s <= k; s++)
                        {
                            if (k * d > length) continue;
                            Mask m = Mask.Neighborhood([length], [k], [d], [causal], [s]);
                            var e = new MaskExtent(1, 1, length, length);
                            for (int q = 0; q < length; q++)
                                for (int kv = 0; kv < length; kv++, checkedPairs++)
                                    Assert.True(Natten(q, kv, length, k, s, d, causal) == m.Allows(e, 0, 0, q, kv), $"L={length} k={k} d={d} s={s} causal={causal} q={q} kv={kv}");
                        }
        Assert.True(checkedPairs > 10_000);
        // Every query of a stride group shares its leader's window (non-causal).
        Mask strided = Mask.Neighborhood([12], [5], null, null, [4]);
        var ext = new MaskExtent(1, 1, 12, 12);
        for (int q = 0; q < 4; q++)
            Assert.Equal(Enumerable.Range(0, 12).Where(kv => strided.Allows(ext, 0, 0, 2, kv)), Enumerable.Range(0, 12).Where(kv => strided.Allows(ext, 0, 0, q, kv)));
        Assert.Contains("stride", Assert.Throws<ArgumentException>(() => Mask.Neighborhood([10], [3], null, null, [4])).Message);
        Assert.Equal(strided.ToString(), MaskExpression.Parse("neighborhood([12], [5], [1], [0], [4])").ToString());
    }

    private static int NeighborhoodStart(int index, int length, int kernel, int dilation)
    {
        Mask m = Mask.Neighborhood([length], [kernel], [dilation]);
        var e = new MaskExtent(1, 1, length, length);
        return Enumerable.Range(0, length).First(kv => m.Allows(e, 0, 0, index, kv));
    }

    [Fact]
    public void Should_zero_rows_that_a_mask_empties()
    {
        // Keys 0..9 only (sink 10) and not the first 4 keys: queries see keys 4..9; with !Full nothing at all.
        int s = 40;
        TensorView<float> q = TestData.Random<float>(1, 1, s, 1, 16), k = TestData.Random<float>(2, 1, s, 1, 16), v = TestData.Random<float>(3, 1, s, 1, 16);
        var o = new TensorView<float>(new float[s * 16], 1, s, 1, 16);
        var lse = new TensorView<float>(new float[s], 1, s, 1);
        Attention.Forward(q, k, v, o, new AttentionOptions { Mask = !Mask.Full }, lse);
        for (int i = 0; i < s; i++)
        {
            Assert.True(float.IsNegativeInfinity(lse[0, i, 0]));
            Assert.Equal(0f, o[0, i, 0, 3]);
        }
    }

    [Fact]
    public void Should_reject_bad_mask_parameters()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => Mask.SlidingWindow(-1));
        Assert.Throws<ArgumentOutOfRangeException>(() => Mask.Sink(-5));
        Assert.Contains("exceeds", Assert.Throws<ArgumentException>(() => Mask.Neighborhood([10], [7], [2])).Message);
        Assert.Contains("odd", Assert.Throws<ArgumentException>(() => Mask.Neighborhood([10], [4])).Message);
        Assert.Contains("dilation", Assert.Throws<ArgumentException>(() => Mask.Neighborhood([10], [3], [0])).Message);
        Assert.Throws<ArgumentException>(() => Mask.Neighborhood([2, 2, 2, 2], [1, 1, 1, 1]));
        Assert.Contains("Sq = Skv = 25", Assert.Throws<ArgumentException>(() => BlockMask.Create(Mask.Neighborhood([5, 5], [3, 3]), 1, 1, 30, 30)).Message);
        Assert.Contains("one entry per token", Assert.Throws<ArgumentException>(() => BlockMask.Create(Mask.Document([0, 0, 1]), 1, 1, 4, 4)).Message);
        TensorView<float> x = TestData.Random<float>(1, 1, 8, 1, 8);
        var o = new TensorView<float>(new float[64], 1, 8, 1, 8);
        BlockMask wrong = BlockMask.Create(Mask.Causal, 1, 1, 16, 16, 64, 64);
        Assert.Contains("Plan was built for", Assert.Throws<ArgumentException>(() => Attention.Forward(x, x, x, o, new AttentionOptions { Plan = wrong })).Message);
        BlockMask odd = BlockMask.Create(Mask.Causal, 1, 1, 8, 8, 4, 48);
        Assert.Contains("multiple of 64", Assert.Throws<ArgumentException>(() => Attention.Forward(x, x, x, o, new AttentionOptions { Plan = odd })).Message);
        BlockMask ok = BlockMask.Create(Mask.Causal, 1, 1, 8, 8, 4, 64);
        Assert.Contains("leave Causal", Assert.Throws<ArgumentException>(() => Attention.Forward(x, x, x, o, new AttentionOptions { Plan = ok, Causal = true })).Message);
    }

    [Fact]
    public void Should_build_long_sparse_plans_without_touching_empty_blocks()
    {
        // causal & window(4096) | sink(64) at S = 1M, block 128: about 8192 × 34 visited blocks, built analytically.
        int s = 1 << 20;
        BlockMask plan = BlockMask.Create((Mask.Causal & Mask.SlidingWindow(4096)) | Mask.Sink(64), 1, 1, s, s, 128, 128);
        Assert.InRange(plan.VisitedBlocks, 8192 * 32, 8192 * 35);
        Assert.True(plan.Sparsity > 0.99);
        Assert.Contains("sparsity", plan.ToString());
    }
}

public sealed class MaskExpressionTests
{
    [Theory]
    [InlineData("causal & window(1024) | sink(64)", "((causal & window(1024, 0)) | sink(64))")]
    [InlineData("!(causal)", "!causal")]
    [InlineData("full", "full")]
    [InlineData("causal & (window(8, 2) | prefix(3))", "(causal & (window(8, 2) | sink(3)))")]
    [InlineData("neighborhood([16, 16], [3, 5], [1, 2])", "neighborhood(grid=[16,16], kernel=[3,5], dilation=[1,2], causal=[False,False], stride=[1,1])")]
    public void Should_parse_and_bind_and_tighter_than_or(string text, string expected) =>
        Assert.Equal(expected, MaskExpression.Parse(text).ToString());

    [Theory]
    [InlineData("causal &", "expected")]
    [InlineData("window(x)", "integer")]
    [InlineData("blah", "known mask name")]
    [InlineData("window(-3)", "≥ 0")]
    [InlineData("causal)", "end of expression")]
    public void Should_explain_bad_expressions(string text, string message) =>
        Assert.Contains(message, Assert.Throws<FormatException>(() => MaskExpression.Parse(text)).Message);
}

public sealed class TokenSetTests
{
    private static TokenSet RandomTokens(int heads, int s, int blockQ, int perBlock, int seed, Mask? mask) =>
        TokenSet.Create(1, heads, s, s, blockQ, (b, h, qb) =>
        {
            var rng = new Random(seed + h * 1000 + qb);
            return Enumerable.Range(0, perBlock).Select(_ => rng.Next(s));
        }, mask);

    /// <summary>
    /// Listed tokens, some in the future of part of their block (the causal token mask by intervals): head dims a multiple
    /// of 8 gather keys eight rows at a time from k (chunks of 64 and a short last chunk element by element), the others
    /// from the packed panels.
    /// </summary>
    [Theory]
    [InlineData(40)]
    [InlineData(12)]
    [InlineData(128)]
    public void Should_gather_listed_tokens_like_the_reference(int d)
    {
        int s = 150;
        TokenSet tokens = RandomTokens(2, s, 16, 70, 3, Mask.Causal);
        AttentionConformance.Check<float>(1, s, s, 2, 1, d, new AttentionOptions { Plan = tokens },
            new[] { KernelPath.Scalar, KernelPath.Vector512 }.Select(path => (path.ToString(), (AttentionRunner<float>)((q, k, v, o, lse, opt) =>
                Attention.Forward(q, k, v, o, opt, lse, new KernelTuning { Path = path })))).ToList());
    }

    /// <summary>
    /// Tokens that list every key of an executor block (64 keys) all rows may attend run as a block: the same pairs as
    /// gathering them. Whole blocks under the diagonal, whole blocks crossing it (gathered and masked), the short last
    /// block listed whole, blocks missing one key, and whole blocks inside visited BlockMask blocks.
    /// </summary>
    [Fact]
    public void Should_run_whole_blocks_of_tokens_like_the_reference()
    {
        int s = 300;   // executor blocks [0, 64) … [256, 300)
        TokenSet Tokens(Mask? mask) => TokenSet.Create(1, 2, s, s, 32, (b, h, qb) =>
        {
            var listed = Enumerable.Range(0, 64).Concat(Enumerable.Range(256, 44));                 // whole blocks (the last one short)
            listed = listed.Concat(Enumerable.Range(128, 64).Where(t => t != 150 + h));              // one key missing
            if (qb % 2 == 0) listed = listed.Concat(Enumerable.Range(64, 64));                      // crosses the diagonal for qb ≤ 3
            return listed;
        }, mask);
        BlockMask window = BlockMask.Create(Mask.Causal & Mask.SlidingWindow(20), 1, 2, s, s, 32, 64);
        TokenSet causal = Tokens(Mask.Causal), unmasked = Tokens(null);
        foreach (SparsityPlan plan in new[] { new SparsityPlan(null, causal), new SparsityPlan(window, causal), new SparsityPlan(null, unmasked), new SparsityPlan(window, unmasked) })
        {
            AttentionConformance.Check<float>(1, s, s, 2, 1, 40, new AttentionOptions { Plan = plan }, "whole token blocks",
                (q, k, v, o, lse, opt) => Attention.Forward(q, k, v, o, opt, lse));
        }
    }

    [Fact]
    public void Should_combine_blocks_and_tokens_without_counting_twice()
    {
        // Vertical-slash-like: a causal window as blocks, plus stripe columns as tokens (some inside visited blocks).
        int s = 200;
        BlockMask window = BlockMask.Create(Mask.Causal & Mask.SlidingWindow(40), 1, 2, s, s, 32, 64);
        TokenSet stripes = TokenSet.Create(1, 2, s, s, 32, (b, h, qb) => [0, 1, 2, 17 + h, 90, 150, qb * 32 + 5], Mask.Causal);
        var plan = new SparsityPlan(window, stripes);
        var options = new AttentionOptions { Plan = plan, Softcap = 4f, AlibiSlopes = [0.1f, 0.02f] };
        AttentionConformance.Check<BFloat16>(1, s, s, 2, 2, 32, options, "blocks+tokens", (q, k, v, o, lse, opt) => Attention.Forward(q, k, v, o, opt, lse));
        // Exactly the union: a listed token inside a visited block follows the block's mask.
        Assert.False(plan.Allows(0, 0, 100, 150));      // token 150 is in the future: the token mask (causal) excludes it
        Assert.True(plan.Allows(0, 0, 160, 150));       // listed, past, outside the window blocks
        Assert.True(plan.Allows(0, 0, 100, 90));        // within the window
    }

    [Fact]
    public void Should_reject_tokens_outside_the_keys_and_mismatched_plans()
    {
        Assert.Throws<ArgumentException>(() => TokenSet.Create(1, 1, 10, 10, 4, (b, h, qb) => [10]));
        BlockMask blocks = BlockMask.Create(Mask.Causal, 1, 1, 64, 64, 16, 64);
        TokenSet tokens = TokenSet.Create(1, 1, 64, 64, 8, (b, h, qb) => [0]);
        Assert.Throws<ArgumentException>(() => new SparsityPlan(blocks, tokens));
    }
}
