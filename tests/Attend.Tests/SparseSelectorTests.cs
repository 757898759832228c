using Attend.Masks;
using Attend.Sparse;
using Attend.Tensors;
using Xunit;

namespace Attend.Tests;

public class SparseSelectorTests
{
    /// <summary>Each selector with a budget that covers every block: the result must be dense attention within the dense tolerance.</summary>
    public static TheoryData<string> CoveringSelectors() => new()
    {
        "pooled:budget=top100000,block=64",
        "pooled:budget=p1,block=64",
        "vertical-slash:v=100000,s=100000,block=64",
        "flexprefill:gamma=1,min=100000,block=64",
        "xattention:t=1,stride=8,block=64",
        "anchor:theta=1e9,block=64",
        "anchor:theta=1e9,rows=1,block=64",
        "hierarchical:k=100000,block=64",
        "sale:t=0,block=64",
        "sale:t=0,bits=8,block=64",
        "sale:t=0,rows=5,block=64",
        "dhsa:budget=100000,L=8,block=64",
    };

    [Theory]
    [MemberData(nameof(CoveringSelectors))]
    public void CoveringBudgetEqualsDenseCausal(string spec)
    {
        SparsitySelector selector = Selectors.Parse(spec);
        foreach ((int s, int d) in new[] { (257, 40), (97, 64), (1, 64), (130, 128) })
        {
            AttentionConformance.Check<float>(1, s, s, 2, 1, d, new AttentionOptions { Causal = true }, spec,
                (q, k, v, o, lse, options) => SparseAttention.Forward(selector, q, k, v, o, options, lse));
        }
    }

    [Theory]
    [InlineData("xattention:t=1,block=64")]
    [InlineData("pooled:budget=p1,block=64")]
    [InlineData("anchor:theta=1e9,block=64")]
    [InlineData("hierarchical:k=100000,block=64")]
    [InlineData("sale:t=0,block=64")]
    [InlineData("sale:t=0,rows=3,block=64")]
    [InlineData("dhsa:budget=100000,L=16,block=64")]
    public void CoveringBudgetEqualsDenseNonCausalAndOffset(string spec)
    {
        SparsitySelector selector = Selectors.Parse(spec);
        AttentionConformance.Check<float>(1, 97, 97, 2, 2, 40, new AttentionOptions(), spec,
            (q, k, v, o, lse, options) => SparseAttention.Forward(selector, q, k, v, o, options, lse));
        // Sq < Skv: bottom-right causal (a chunk of prefill against a longer cache).
        AttentionConformance.Check<float>(2, 70, 200, 2, 1, 40, new AttentionOptions { Causal = true }, spec,
            (q, k, v, o, lse, options) => SparseAttention.Forward(selector, q, k, v, o, options, lse));
    }

    [Fact]
    public void CoveringBudgetEqualsDenseInHalfPrecision()
    {
        SparsitySelector selector = Selectors.Parse("xattention:t=1,block=64");
        AttentionConformance.Check<Half>(1, 130, 130, 2, 1, 64, new AttentionOptions { Causal = true }, "xattention f16",
            (q, k, v, o, lse, options) => SparseAttention.Forward(selector, q, k, v, o, options, lse));
    }

    /// <summary>Default selectors on structured inputs: sparse, causal, and keeping most of the attention mass.</summary>
    [Fact]
    public void DefaultSelectorsKeepTheMassOfStructuredInputs()
    {
        const int s = 4096, h = 2, d = 64;
        (TensorView<float> q, TensorView<float> k, TensorView<float> v, IReadOnlyList<Needle> needles) =
            StructuredInputs.Generate(1, s, h, 1, d, StructureOptions.Default with { Seed = 3 });
        var dense = new TensorView<float>(new float[q.ElementCount], 1, s, h, d);
        var denseLse = new TensorView<float>(new float[s * h], 1, s, h);
        Attention.Forward(q, k, v, dense, new AttentionOptions { Causal = true }, denseLse);
        Assert.NotEmpty(needles);
        var report = new List<string>();
        bool ok = true;
        foreach (SparsitySelector selector in Selectors.Defaults())
        {
            var o = new TensorView<float>(new float[q.ElementCount], 1, s, h, d);
            var lse = new TensorView<float>(new float[s * h], 1, s, h);
            (SparsityPlan plan, _) = SparseAttention.Forward(selector, q, k, v, o, new AttentionOptions { Causal = true }, lse);
            double recall = Metrics.AttentionRecall(lse, denseLse), density = Metrics.Density(plan, causal: true), cosine = Metrics.Cosine(o, dense);
            report.Add($"{selector.Name}: recall {recall:F3} density {density:F3} cosine {cosine:F4} needles {Metrics.NeedleHitRate(plan, needles):F2}");
            ok &= recall >= 0.85 && density < 0.8 && cosine > 0.9;
            // Never a future key.
            var rng = new Random(5);
            for (int i = 0; i < 2000; i++)
            {
                int qi = rng.Next(s), kj = qi + 1 + rng.Next(s);
                if (kj < s) Assert.False(plan.Allows(0, rng.Next(h), qi, kj), $"{selector.Name} allows future key {kj} for query {qi}");
            }
        }
        Assert.True(ok, string.Join("; ", report));
    }

    /// <summary>
    /// Selectors reuse their per-worker arrays across plans (a pool of idle sets): plans built on several threads at once,
    /// of different sizes, equal the same plans built one after another — no set is shared by two running plans.
    /// </summary>
    [Fact]
    public void PlansBuiltConcurrentlyEqualPlansBuiltAlone()
    {
        string[] specs = ["anchor:block=64", "anchor:block=64", "vertical-slash:v=64,s=16,block=64", "vertical-slash:v=64,s=16,block=64"];
        // Same sizes with different contents: a shared array would mix two inputs.
        int[] lengths = [1025, 1025, 1025, 1025, 1025, 1025, 1025, 1025];
        var inputs = lengths.Select((s, i) => StructuredInputs.Generate(1, s, 2, 1, 64, StructureOptions.Default with { Seed = i + 1 })).ToArray();
        BlockMask Plan(int i) => Selectors.Parse(specs[i % specs.Length]).Plan(inputs[i % inputs.Length].Q, inputs[i % inputs.Length].K).Blocks!;
        BlockMask[] alone = [.. Enumerable.Range(0, 8).Select(Plan)];
        var together = new BlockMask[8];
        // Dedicated threads (the thread pool grows too slowly to overlap 8 plans on a 2-core machine).
        Thread[] threads = [.. Enumerable.Range(0, 8).Select(i => new Thread(() => together[i] = Plan(i)))];
        foreach (Thread t in threads) t.Start();
        foreach (Thread t in threads) t.Join();
        for (int i = 0; i < 8; i++)
            for (int h = 0; h < 2; h++)
                for (int qb = 0; qb < alone[i].QueryBlocks; qb++) Assert.Equal(alone[i].Row(0, h, qb, out _).ToArray(), together[i].Row(0, h, qb, out _).ToArray());
    }

    /// <summary>
    /// AnchorAttention's stripes against a float64 recomputation: the anchor is the mean, over every N-th row of a block
    /// ending at its last row, of the row's largest score over the first block and the local pair; a key before the
    /// local pair (after the first block) is a stripe when the block's mean query scores it within θ of the anchor.
    /// </summary>
    [Theory]
    [InlineData(1, 700, 40)]
    [InlineData(8, 700, 40)]
    [InlineData(7, 1025, 64)]
    [InlineData(200, 1025, 80)]
    public void AnchorStripesMatchAFloat64Recomputation(int rowStride, int length, int d)
    {
        const int bs = 64;
        const double theta = 6;
        var (q, k, _, _) = StructuredInputs.Generate(1, length, 1, 1, d, StructureOptions.Default with { Seed = rowStride + d });
        SparsityPlan plan = new AnchorSelector { BlockSize = bs, Theta = theta, AnchorRowStride = rowStride }.Plan(q, k);
        double scale = 1 / Math.Sqrt(d);
        double Dot(int i, int j) => Enumerable.Range(0, d).Sum(c => (double)q[0, i, 0, c] * k[0, j, 0, c]) * scale;
        int stripes = 0, nearCut = 0;
        for (int qb = 0; qb < (length + bs - 1) / bs; qb++)
        {
            int q0 = qb * bs, q1 = Math.Min(q0 + bs, length), diagonal = (q1 - 1) / bs;
            if (diagonal < 3) continue;   // no key before the local pair after the first block
            var sampled = Enumerable.Range(q0, q1 - q0).Where(r => (q1 - 1 - r) % rowStride == 0).ToArray();
            double anchor = sampled.Average(r => Enumerable.Range(0, r + 1).Where(j => j < bs || j >= (diagonal - 1) * bs).Max(j => Dot(r, j)));
            double[] meanQuery = [.. Enumerable.Range(0, d).Select(c => Enumerable.Range(q0, q1 - q0).Average(r => (double)q[0, r, 0, c]) * scale)];
            var chosen = (plan.Tokens?.Row(0, 0, qb).ToArray() ?? []).ToHashSet();
            for (int j = bs; j < (diagonal - 1) * bs; j++)
            {
                double score = Enumerable.Range(0, d).Sum(c => meanQuery[c] * k[0, j, 0, c]);
                if (Math.Abs(score - (anchor - theta)) < 1e-4)
                {
                    nearCut++;   // float32 rounding may decide either way
                    continue;
                }
                Assert.True((score >= anchor - theta) == chosen.Contains(j), $"rows/{rowStride}, block {qb}, key {j}: score {score}, cut {anchor - theta}");
                if (chosen.Contains(j)) stripes++;
            }
        }
        Assert.True(stripes > 0, "the input should give some stripes");
        Assert.True(nearCut < 5, $"{nearCut} scores within rounding of the cut");
        Assert.Throws<ArgumentOutOfRangeException>("AnchorRowStride", () => new AnchorSelector { AnchorRowStride = 0 });
    }

    /// <summary>
    /// Selectors read a head's rows straight from the view (block means, sampled rows, key panels): a permuted view
    /// (D innermost with a large stride, S innermost, …) gives the same plan as its contiguous copy, and a half-precision
    /// view the same plan as its float32 values.
    /// </summary>
    [Theory]
    [InlineData("pooled:block=64")]
    [InlineData("anchor:block=64")]
    [InlineData("vertical-slash:v=64,s=16,block=64")]
    [InlineData("flexprefill:block=64")]
    [InlineData("hierarchical:block=64")]
    [InlineData("sale:block=64")]
    [InlineData("xattention:block=64")]
    [InlineData("dhsa:block=64")]
    public void PlansDoNotDependOnTheViewLayout(string spec)
    {
        const int s = 300, h = 4, kvh = 2, d = 40;
        var (q, k, v, _) = StructuredInputs.Generate(1, s, h, kvh, d, StructureOptions.Default with { Seed = 9 });
        // The same values as views of [B, D, H, S] and [B, H, D, S] arrays, permuted to [B, S, H, D].
        TensorView<float> Permuted(TensorView<float> x, int heads)
        {
            var data = new float[x.ElementCount];
            for (int i = 0; i < s; i++)
                for (int j = 0; j < heads; j++)
                    for (int c = 0; c < d; c++) data[(((c * heads) + j) * s) + i] = x[0, i, j, c];
            return new TensorView<float>(data, 1, d, heads, s).Permute(0, 3, 2, 1);
        }
        TensorView<Half> ToHalf(TensorView<float> x) => new(x.ToArray().Select(v => (Half)v).ToArray(), x.Shape.ToArray());
        TensorView<float> Rounded(TensorView<float> x) => new(x.ToArray().Select(v => (float)(Half)v).ToArray(), x.Shape.ToArray());
        SparsitySelector selector = Selectors.Parse(spec);
        SparsityPlan expected = selector.Plan(q, k), permuted = selector.Plan(Permuted(q, h), Permuted(k, kvh));
        SparsityPlan half = selector.Plan(ToHalf(q), ToHalf(k)), rounded = selector.Plan(Rounded(q), Rounded(k));
        AssertSamePlan(expected, permuted);
        AssertSamePlan(rounded, half);
        // End to end, selectors that score keys read the executor's K panels (packed before selection): the same plans.
        var output = new TensorView<float>(new float[q.ElementCount], q.Shape.ToArray());
        var causal = new AttentionOptions { Causal = true };
        AssertSamePlan(expected, SparseAttention.Forward(selector, q, k, v, output, causal).Plan);
        AssertSamePlan(expected, SparseAttention.Forward(selector, Permuted(q, h), Permuted(k, kvh), v, output, causal).Plan);
        AssertSamePlan(rounded, SparseAttention.Forward(selector, ToHalf(q), ToHalf(k), ToHalf(v), ToHalf(output), causal).Plan);

        static void AssertSamePlan(SparsityPlan a, SparsityPlan b)
        {
            for (int hh = 0; hh < h; hh++)
                for (int qb = 0; qb < (s + 63) / 64; qb++)
                {
                    Assert.Equal(a.Blocks?.Row(0, hh, qb, out _).ToArray(), b.Blocks?.Row(0, hh, qb, out _).ToArray());
                    Assert.Equal(a.Tokens?.Row(0, hh, qb).ToArray(), b.Tokens?.Row(0, hh, qb).ToArray());
                }
        }
    }

    /// <summary>The pool of idle per-worker sets: a set on loan is never handed to another taker.</summary>
    [Fact]
    public void HeadBufferPoolHandsASetToOneTakerAtATime()
    {
        HeadBuffers a = HeadBuffers.Rent(), b = HeadBuffers.Rent();
        Assert.NotSame(a, b);
        HeadBuffers.Return(a);
        HeadBuffers c = HeadBuffers.Rent(), d = HeadBuffers.Rent();
        Assert.NotSame(c, d);
        Assert.NotSame(b, c);   // b is still out: never handed to another taker (a may come back, or go to another test's plan)
        Assert.NotSame(b, d);
        HeadBuffers.Return(b);
        HeadBuffers.Return(c);
        HeadBuffers.Return(d);
    }

    /// <summary>SALE's SIMD and scalar products use the same integers: identical plans, on awkward sizes and both bit widths.</summary>
    [Fact]
    public void SaleSimdAndScalarChooseTheSameBlocks()
    {
        foreach ((int s, int d, int bits, int stride) in new[] { (700, 80, 4, 1), (257, 40, 8, 1), (1025, 128, 4, 1), (97, 64, 8, 1), (1025, 128, 4, 4), (700, 80, 8, 7) })
        {
            (TensorView<float> q, TensorView<float> k, _, _) = StructuredInputs.Generate(1, s, 2, 1, d, StructureOptions.Default with { Seed = s });
            var fast = new SaleSelector { Bits = bits, BlockSize = 64, RowStride = stride };
            var slow = new SaleSelector { Bits = bits, BlockSize = 64, RowStride = stride, ForceScalar = true };
            BlockMask a = fast.Plan(q, k).Blocks!, b = slow.Plan(q, k).Blocks!;
            Assert.Equal(b.VisitedBlocks, a.VisitedBlocks);
            for (int h = 0; h < 2; h++)
                for (int qb = 0; qb < a.QueryBlocks; qb++) Assert.Equal(b.Row(0, h, qb, out _).ToArray(), a.Row(0, h, qb, out _).ToArray());
            Assert.InRange(a.VisitedBlocks, 1, (long)a.QueryBlocks * a.KeyBlocks * 2);
        }
    }

    /// <summary>
    /// Row sampling (SALE's estimate from every 4th row of a block) keeps a subset of the full estimate's blocks — a
    /// block's best relative score over fewer rows can only be lower — and most of them on structured inputs, whose
    /// structure spans consecutive rows (what it drops are mostly blocks kept for one row's noise maximum; its
    /// attention recall is measured in the sparse bench).
    /// </summary>
    [Fact]
    public void SaleRowSamplingKeepsTheFullEstimatesBlocks()
    {
        (TensorView<float> q, TensorView<float> k, _, _) = StructuredInputs.Generate(1, 2048, 2, 1, 64, StructureOptions.Default with { Seed = 3 });
        BlockMask full = new SaleSelector { Threshold = 0.02, BlockSize = 64 }.Plan(q, k).Blocks!;
        BlockMask sampled = new SaleSelector { Threshold = 0.02, BlockSize = 64, RowStride = 4 }.Plan(q, k).Blocks!;
        long kept = 0, total = 0;
        for (int h = 0; h < 2; h++)
            for (int qb = 0; qb < full.QueryBlocks; qb++)
            {
                int[] a = full.Row(0, h, qb, out _).ToArray(), b = sampled.Row(0, h, qb, out _).ToArray();
                kept += a.Intersect(b).Count();
                total += a.Length;
                Assert.Empty(b.Except(a));
            }
        Assert.InRange((double)kept / total, 0.8, 1.0);
    }

    /// <summary>Hierarchical top-k keeps exactly k blocks (plus sink and diagonal) per row that sees more, all of them otherwise.</summary>
    [Fact]
    public void HierarchicalKeepsItsBudgetPerRow()
    {
        const int s = 3000, k = 5;
        (TensorView<float> q, TensorView<float> kk, _, _) = StructuredInputs.Generate(1, s, 2, 2, 64);
        BlockMask plan = new HierarchicalSelector { TopK = k, BlockSize = 64 }.Plan(q, kk).Blocks!;
        for (int h = 0; h < 2; h++)
            for (int qb = 0; qb < plan.QueryBlocks; qb++)
            {
                int visible = qb + 1, kept = plan.Row(0, h, qb, out _).Length;
                if (visible <= k) Assert.Equal(visible, kept);
                else Assert.InRange(kept, k, k + 2);
                Assert.Equal(qb, plan.Row(0, h, qb, out _)[^1]);   // the diagonal
                Assert.Equal(0, plan.Row(0, h, qb, out _)[0]);     // the sink
            }
    }

    /// <summary>DHSA cuts where the content changes: on inputs made of segments it keeps whole same-segment key chunks.</summary>
    [Fact]
    public void DhsaCutsAtContentChangesAndKeepsItsBudget()
    {
        // Clusters of 256 tokens and nothing else: chunk boundaries should fall on the segment edges, and a budget of
        // one segment's keys per query chunk should find its own cluster's segments.
        const int s = 4096;
        (TensorView<float> q, TensorView<float> k, TensorView<float> v, _) = StructuredInputs.Generate(1, s, 1, 1, 64, StructureOptions.Parse("clusters=6,local", seed: 4));
        var selector = new DhsaSelector { ChunkLength = 128, TokenBudget = 512, BlockSize = 64 };
        SparsityPlan plan = selector.Plan(q, k);
        Assert.NotNull(plan.Tokens);
        double density = Metrics.Density(plan, causal: true);
        var dense = new TensorView<float>(new float[q.ElementCount], 1, s, 1, 64);
        var denseLse = new TensorView<float>(new float[s], 1, s, 1);
        Attention.Forward(q, k, v, dense, new AttentionOptions { Causal = true }, denseLse);
        var o = new TensorView<float>(new float[q.ElementCount], 1, s, 1, 64);
        var lse = new TensorView<float>(new float[s], 1, s, 1);
        Attention.Forward(q, k, v, o, new AttentionOptions { Plan = plan }, lse);
        double recall = Metrics.AttentionRecall(lse, denseLse);
        Assert.True(density < 0.5 && recall > 0.8, $"dhsa on clusters: density {density:F3}, recall {recall:F3}");
    }

    /// <summary>
    /// Error-aware routing: promoting every block (extra 1) covers the whole causal triangle, so the result is dense;
    /// with a small extra budget it adds blocks only where the inner plan skipped, compensates the rest, and its error
    /// is no worse than the inner plan with plain centroid compensation.
    /// </summary>
    [Fact]
    public void ErrorAwareRoutingPromotesSkippedBlocksAndCompensatesTheRest()
    {
        var all = Selectors.ParseAny("pooled:budget=top1,block=64+ear=1");
        foreach ((int s, int d) in new[] { (257, 40), (130, 128) })
        {
            AttentionConformance.Check<float>(1, s, s, 2, 1, d, new AttentionOptions { Causal = true }, all.Name,
                (q, k, v, o, lse, options) => SparseAttention.Forward(all, q, k, v, o, options, lse));
        }
        const int n = 2048, h = 2, dim = 64;
        (TensorView<float> qq, TensorView<float> kk, TensorView<float> vv, _) = StructuredInputs.Generate(1, n, h, 1, dim, StructureOptions.Default with { Seed = 9 });
        var dense = new TensorView<float>(new float[qq.ElementCount], 1, n, h, dim);
        Attention.Forward(qq, kk, vv, dense, new AttentionOptions { Causal = true });
        double Error(ISparsitySelector selector, out SparsityPlan plan)
        {
            var o = new TensorView<float>(new float[qq.ElementCount], 1, n, h, dim);
            (plan, _) = SparseAttention.Forward(selector, qq, kk, vv, o, new AttentionOptions { Causal = true });
            return Metrics.RelativeL2(o, dense);
        }
        double compensated = Error(Selectors.ParseAny("pooled:budget=top2,block=64+centroid"), out SparsityPlan inner);
        double routed = Error(Selectors.ParseAny("pooled:budget=top2,block=64+ear=0.1"), out SparsityPlan plan);
        Assert.Equal(Compensation.Centroid, plan.Compensation);
        Assert.True(plan.Blocks!.VisitedBlocks > inner.Blocks!.VisitedBlocks);
        for (int hh = 0; hh < h; hh++)
            for (int qb = 0; qb < inner.Blocks.QueryBlocks; qb++)
            {
                int[] before = inner.Blocks.Row(0, hh, qb, out _).ToArray(), after = plan.Blocks.Row(0, hh, qb, out _).ToArray();
                Assert.Subset(after.ToHashSet(), before.ToHashSet());
                Assert.InRange(after.Length - before.Length, 0, (int)Math.Ceiling(0.1 * (qb + 1)));
            }
        Assert.True(routed <= compensated, $"routed {routed:F4} vs centroid only {compensated:F4}");
        Assert.Contains("+ear takes", Assert.Throws<ArgumentException>(() => Selectors.ParseAny("pooled+ear0.1")).Message);
        Assert.Throws<ArgumentOutOfRangeException>(() => Selectors.ParseAny("pooled+ear=2"));
        Assert.Contains("without a permutation", Assert.Throws<NotSupportedException>(() => new ErrorAwareSelector(new HashSparseSelector()).Plan(qq, kk)).Message);
    }

    [Fact]
    public void MetricsOfIdenticalOutputsAndFullPlans()
    {
        TensorView<float> q = TestData.Random<float>(1, 1, 300, 2, 32), k = TestData.Random<float>(2, 1, 300, 2, 32), v = TestData.Random<float>(3, 1, 300, 2, 32);
        var o = new TensorView<float>(new float[q.ElementCount], 1, 300, 2, 32);
        var lse = new TensorView<float>(new float[600], 1, 300, 2);
        Attention.Forward(q, k, v, o, new AttentionOptions { Causal = true }, lse);
        Assert.Equal(0, Metrics.RelativeL2(o, o));
        Assert.Equal(1, Metrics.Cosine(o, o), 10);
        Assert.Equal(1, Metrics.AttentionRecall(lse, lse), 10);
        var full = BlockMask.Create(Mask.Causal, 1, 2, 300, 300, 64, 64);
        Assert.Equal(1, Metrics.Density(full, causal: true), 10);
        var window = BlockMask.Create(Mask.Causal & Mask.SlidingWindow(10), 1, 2, 300, 300, 64, 64);
        double expected = (300.0 * 11 - (10 * 11 / 2)) / (300.0 * 301 / 2);
        Assert.Equal(expected, Metrics.Density(window, causal: true), 10);
        Assert.Equal(1, Metrics.NeedleHitRate(full, [new Needle(0, 1, 200, 3)]));
        Assert.Equal(0, Metrics.NeedleHitRate(window, [new Needle(0, 1, 200, 3)]));
        // A plan that drops part of the mass: recall = exp(lse_plan − lse_dense) < 1.
        var lseWindow = new TensorView<float>(new float[600], 1, 300, 2);
        Attention.Forward(q, k, v, new TensorView<float>(new float[q.ElementCount], 1, 300, 2, 32), new AttentionOptions { Plan = window }, lseWindow);
        double recall = Metrics.AttentionRecall(lseWindow, lse);
        Assert.InRange(recall, 0.01, 0.99);
        Assert.True(Metrics.TopKeyMassShare(q, k, 0) is > 0.05 and < 1);
    }

    [Fact]
    public void GeneratorIsDeterministicAndPlantsWhatItReports()
    {
        var a = StructuredInputs.Generate(1, 2048, 2, 1, 64, StructureOptions.Default with { Seed = 9 });
        var b = StructuredInputs.Generate(1, 2048, 2, 1, 64, StructureOptions.Default with { Seed = 9 });
        Assert.Equal(a.Q.ToArray(), b.Q.ToArray());
        Assert.Equal(a.K.ToArray(), b.K.ToArray());
        Assert.Equal(a.Needles, b.Needles);
        // A needle's query scores its key far above the median key.
        Needle n = a.Needles[0];
        float[] qi = new float[64], kj = new float[64], kx = new float[64];
        a.Q.CopyRow(0, n.Query, n.Head, qi);
        a.K.CopyRow(0, n.Key, 0, kj);
        double needle = Dot(qi, kj) / 8, typical = 0;
        for (int j = 0; j < 200; j++)
        {
            a.K.CopyRow(0, 300 + j, 0, kx);
            typical += Dot(qi, kx) / 8 / 200;
        }
        Assert.True(needle > typical + 5, $"needle logit {needle:F1} vs typical {typical:F1}");
        // Structured attention is concentrated; pure noise is not.
        var noise = StructuredInputs.Generate(1, 2048, 1, 1, 64, StructureOptions.Parse("noise", seed: 2));
        Assert.True(Metrics.TopKeyMassShare(a.Q, a.K, 0) > 0.8);
        Assert.True(Metrics.TopKeyMassShare(noise.Q, noise.K, 0) < 0.3);
    }

    [Fact]
    public void BadInputIsRejectedWithClearMessages()
    {
        TensorView<float> q = TestData.Random<float>(1, 1, 64, 2, 32), k = TestData.Random<float>(2, 1, 64, 2, 16);
        var selector = new XAttentionSelector();
        Assert.Contains("k must be", Assert.Throws<ArgumentException>(() => selector.Plan(q, k)).Message);
        Assert.Throws<ArgumentOutOfRangeException>(() => new PooledBlockSelector { BlockSize = 100 });
        Assert.Throws<ArgumentOutOfRangeException>(() => new XAttentionSelector { Stride = 0 });
        Assert.Contains("Stride dividing BlockSize", Assert.Throws<ArgumentException>(() => new XAttentionSelector { Stride = 48 }.Plan(q, q)).Message);
        Assert.Contains("Threshold", Assert.Throws<ArgumentException>(() => new XAttentionSelector { Threshold = 1.5 }.Plan(q, q)).Message);
        Assert.Contains("Gamma", Assert.Throws<ArgumentException>(() => new FlexPrefillSelector { Gamma = 0 }.Plan(q, q)).Message);
        Assert.Contains("Theta", Assert.Throws<ArgumentException>(() => new AnchorSelector { Theta = double.NaN }.Plan(q, q)).Message);
        Assert.Contains("LastQueries", Assert.Throws<ArgumentException>(() => new VerticalSlashSelector { LastQueries = 0 }.Plan(q, q)).Message);
        Assert.Throws<ArgumentOutOfRangeException>(() => new HierarchicalSelector { TopK = 0 });
        Assert.Throws<ArgumentOutOfRangeException>(() => new SaleSelector { Threshold = -0.1 });
        Assert.Contains("RowStride", Assert.Throws<ArgumentOutOfRangeException>(() => Selectors.Parse("sale:rows=0")).Message);
        Assert.Contains("AnchorRowStride", Assert.Throws<ArgumentOutOfRangeException>(() => Selectors.Parse("anchor:rows=0")).Message);
        Assert.Contains("rows must be an integer", Assert.Throws<ArgumentException>(() => Selectors.Parse("anchor:rows=x")).Message);
        Assert.Throws<ArgumentOutOfRangeException>(() => new DhsaSelector { ChunkLength = 1 });
        Assert.Throws<ArgumentOutOfRangeException>(() => new DhsaSelector { TokenBudget = 0 });
        Assert.Contains("Bits must be 4 or 8", Assert.Throws<ArgumentOutOfRangeException>(() => Selectors.Parse("sale:bits=5")).Message);
        Assert.Throws<ArgumentOutOfRangeException>(() => BlockBudget.TopP(0));
        Assert.Throws<ArgumentOutOfRangeException>(() => BlockBudget.TopK(0));
        Assert.Contains("unknown selector", Assert.Throws<ArgumentException>(() => Selectors.Parse("magic")).Message);
        Assert.Contains("no parameter 'zz'", Assert.Throws<ArgumentException>(() => Selectors.Parse("anchor:zz=1")).Message);
        Assert.Contains("budget must be", Assert.Throws<ArgumentException>(() => Selectors.Parse("pooled:budget=lots")).Message);
        var o = new TensorView<float>(new float[q.ElementCount], 1, 64, 2, 32);
        Assert.Contains("must be unset", Assert.Throws<ArgumentException>(() =>
            SparseAttention.Forward(selector, q, q, q, o, new AttentionOptions { Mask = Mask.Causal })).Message);
        // Selectors that read the executor's K panels get K and V packed before selection: bad shapes, element types and
        // tuning are rejected before the pack, naming the argument; a bad output after selection, with the pack released.
        var anchor = new AnchorSelector { BlockSize = 64 };
        Assert.Equal("k", Assert.Throws<ArgumentException>(() => SparseAttention.Forward(anchor, q, k, q, o)).ParamName);
        TensorView<float> shortV = TestData.Random<float>(3, 1, 32, 2, 32);
        Assert.Equal("v", Assert.Throws<ArgumentException>(() => SparseAttention.Forward(anchor, q, q, shortV, o)).ParamName);
        Assert.Equal("output", Assert.Throws<ArgumentException>(() => SparseAttention.Forward(anchor, q, q, q, new TensorView<float>(new float[64], 1, 32, 2, 1))).ParamName);
        Assert.Equal("tuning", Assert.Throws<ArgumentException>(() => SparseAttention.Forward(anchor, q, q, q, o, null, default, new KernelTuning { Threads = -1 })).ParamName);
        var qi = new TensorView<int>(new int[q.ElementCount], 1, 64, 2, 32);
        Assert.Contains("element type", Assert.Throws<ArgumentException>(() => SparseAttention.Forward(anchor, qi, qi, qi, new TensorView<int>(new int[q.ElementCount], 1, 64, 2, 32))).Message);
        Assert.Contains("D ≥ 32", Assert.Throws<ArgumentException>(() => StructuredInputs.Generate(1, 64, 1, 1, 16)).Message);
        Assert.Contains("unknown structure component", Assert.Throws<ArgumentException>(() => StructureOptions.Parse("sinks,bogus")).Message);
    }

    private static double Dot(float[] a, float[] b)
    {
        double s = 0;
        for (int i = 0; i < a.Length; i++) s += a[i] * b[i];
        return s;
    }
}

public class CopyRowTests
{
    [Fact]
    public void CopyRowMatchesTheIndexerForEveryTypeAndLayout()
    {
        float[] data = TestData.Normal(2 * 5 * 3 * 7, 4);
        Check(new TensorView<float>(data, 2, 5, 3, 7));
        Check(new TensorView<float>(data, 2, 3, 5, 7).Permute(0, 2, 1, 3));
        Check(new TensorView<Half>(TestData.Convert<Half>(data), 2, 5, 3, 7));
        Check(new TensorView<BFloat16>(TestData.Convert<BFloat16>(data), 2, 5, 3, 7));
        Check(new TensorView<float>(data, 2, 5, 7, 3).Permute(0, 1, 3, 2));

        static void Check<T>(TensorView<T> x) where T : unmanaged
        {
            var row = new float[x.Shape[3]];
            for (int a = 0; a < x.Shape[0]; a++)
                for (int b = 0; b < x.Shape[1]; b++)
                    for (int c = 0; c < x.Shape[2]; c++)
                    {
                        x.CopyRow(a, b, c, row);
                        for (int d = 0; d < row.Length; d++) Assert.Equal(ElementConvert.ToSingle(x[a, b, c, d]), row[d]);
                    }
        }
    }
}

public class SparseCalibrationTests
{
    [Fact]
    public void DenseHeadsAndZeroBudgetEqualDense()
    {
        var perHead = new PerHeadSelector([null, Selectors.Parse("anchor:theta=1e9,block=64")], blockSize: 64);
        AttentionConformance.Check<float>(1, 200, 200, 2, 1, 40, new AttentionOptions { Causal = true }, "per-head",
            (q, k, v, o, lse, options) => SparseAttention.Forward(perHead, q, k, v, o, options, lse));
        // Its anchor heads read the executor's K panels end to end (as the anchor alone does): the same plan as Plan's.
        var (gq, gk, gv, _) = StructuredInputs.Generate(1, 300, 2, 1, 40);
        var mixed = new PerHeadSelector([Selectors.Parse("anchor:block=64"), Selectors.Parse("pooled:block=64")], blockSize: 64);
        SparsityPlan alone = mixed.Plan(gq, gk), endToEnd = SparseAttention.Forward(mixed, gq, gk, gv,
            new TensorView<float>(new float[gq.ElementCount], gq.Shape.ToArray()), new AttentionOptions { Causal = true }).Plan;
        for (int hh = 0; hh < 2; hh++)
            for (int qb = 0; qb < 5; qb++)
            {
                Assert.Equal(alone.Blocks!.Row(0, hh, qb, out _).ToArray(), endToEnd.Blocks!.Row(0, hh, qb, out _).ToArray());
                Assert.Equal(alone.Tokens?.Row(0, hh, qb).ToArray(), endToEnd.Tokens?.Row(0, hh, qb).ToArray());
            }
        var auto = new AutoSelector(0, ["xattention:t=0.5,block=64", "pooled:budget=top1,block=64"], sampleQueries: 128);
        AttentionConformance.Check<float>(1, 300, 300, 2, 2, 40, new AttentionOptions { Causal = true }, "auto(0)",
            (q, k, v, o, lse, options) => SparseAttention.Forward(auto, q, k, v, o, options, lse));
        Assert.All(auto.LastCalibration!.RelativeL2, e => Assert.Equal(0, e));
    }

    /// <summary>
    /// A calibration made on one seed keeps its budget on another seed of the same structure (the held-out use of a
    /// reusable calibration); the generator's needles sit at random places per head and seed, so a per-head choice can pass by luck — the
    /// calibration falls back to one candidate for every head unless per-head choices hold on the other half of the sample.
    /// </summary>
    [Fact]
    public void CalibrationKeepsItsBudgetOnAHeldOutSeed()
    {
        const int s = 4096, h = 4, d = 64;
        var train = StructuredInputs.Generate(1, s, h, h, d, StructureOptions.Default with { Seed = 21 });
        var test = StructuredInputs.Generate(1, s, h, h, d, StructureOptions.Default with { Seed = 22 });
        CalibratedHeads heads = SparseCalibration.Calibrate(train.Q, train.K, train.V, 0.05, ["pooled:budget=p0.9,block=64", "pooled:budget=p0.98,block=64",
            "sale:t=0.05,block=64", "sale:t=0.02,block=64", "sale:t=0.01,block=64"]);
        var dense = new TensorView<float>(new float[test.Q.ElementCount], 1, s, h, d);
        var sparse = new TensorView<float>(new float[test.Q.ElementCount], 1, s, h, d);
        Attention.Forward(test.Q, test.K, test.V, dense, new AttentionOptions { Causal = true });
        SparseAttention.Forward(heads.ToSelector(), test.Q, test.K, test.V, sparse, new AttentionOptions { Causal = true });
        double error = Metrics.RelativeL2(sparse, dense);
        Assert.True(error <= 0.05, $"held-out error {error:F4} with {string.Join(", ", heads.Specs)}");
        Assert.Contains(heads.Specs, spec => spec is not null);
        Assert.Throws<ArgumentOutOfRangeException>(() => SparseCalibration.Calibrate(train.Q, train.K, train.V, 0.05, margin: 0));

        // Several inputs of one layer: the sums run over all of them; inputs must share the head count.
        CalibratedHeads both = SparseCalibration.Calibrate([(train.Q, train.K, train.V), (test.Q, test.K, test.V)], 0.05, ["sale:t=0.02,block=64", "sale:t=0.005,block=64"]);
        Assert.All(both.RelativeL2, e => Assert.InRange(e, 0, 0.05));
        var other = StructuredInputs.Generate(1, 512, 2, 2, d, StructureOptions.Default with { Seed = 23 });
        Assert.Contains("heads", Assert.Throws<ArgumentException>(() => SparseCalibration.Calibrate([(train.Q, train.K, train.V), (other.Q, other.K, other.V)], 0.05)).Message);
        Assert.Throws<ArgumentException>(() => SparseCalibration.Calibrate(Array.Empty<(TensorView<float>, TensorView<float>, TensorView<float>)>(), 0.05));
    }

    [Fact]
    public void CalibrationMeetsItsBudgetOnTheSampleAndRoundTrips()
    {
        const int s = 4096, h = 2, d = 64;
        var train = StructuredInputs.Generate(1, s, h, 1, d, StructureOptions.Default with { Seed = 11 });
        CalibratedHeads heads = SparseCalibration.Calibrate(train.Q, train.K, train.V, 0.05, sampleQueries: 512);
        for (int head = 0; head < h; head++)
        {
            Assert.True(heads.RelativeL2[head] <= 0.05, $"head {head}: {heads.Specs[head]} error {heads.RelativeL2[head]}");
            Assert.True(heads.Specs[head] is null || heads.Density[head] < 1);
        }
        CalibratedHeads back = CalibratedHeads.FromJson(heads.ToJson());
        Assert.Equal(heads.Specs, back.Specs);
        Assert.Equal(heads.Density, back.Density);
        Assert.Equal(heads.ToSelector().Name, back.ToSelector().Name);

        Assert.Throws<ArgumentOutOfRangeException>(() => new AutoSelector(double.NaN));
        Assert.Contains("needs the values", Assert.Throws<NotSupportedException>(() => new AutoSelector(0.02).Plan(train.Q, train.K)).Message);
        Assert.Contains("BlockSize", Assert.Throws<ArgumentException>(() => new PerHeadSelector([Selectors.Parse("anchor:block=64")], blockSize: 128)).Message);
    }
}
