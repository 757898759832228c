using Attend.Masks;
using Attend.Sparse;
using Attend.Tensors;
using Xunit;

namespace Attend.Tests;

/// <summary>Token permutations, bucket plans (hash-sparse / QK-sparse) and the hash selector.</summary>
public class BucketPlanTests
{
    private static int[] RandomBuckets(int count, int buckets, int seed, double dropped)
    {
        var rng = new Random(seed);
        return [.. Enumerable.Range(0, count).Select(_ => rng.NextDouble() < dropped ? -1 : rng.Next(buckets))];
    }

    /// <summary>The permuted executor against the float64 reference of the same pairs, on awkward sizes, GQA, Sq ≠ Skv and dropped tokens.</summary>
    [Theory]
    [InlineData(1, 1, 1, 1, 1, 40, true)]
    [InlineData(1, 7, 7, 2, 1, 64, true)]
    [InlineData(2, 97, 97, 4, 2, 80, false)]
    [InlineData(1, 257, 257, 2, 2, 128, true)]
    [InlineData(1, 97, 257, 2, 1, 64, true)]
    [InlineData(1, 257, 97, 2, 2, 256, false)]
    [InlineData(1, 1025, 1025, 1, 1, 64, true)]
    public void BucketPlanMatchesTheReference(int b, int sq, int skv, int h, int hkv, int d, bool causal)
    {
        foreach ((int buckets, double dropped, int block) in new[] { (1, 0.0, 64), (3, 0.2, 128), (8, 0.0, 64) })
        {
            int[] qb = RandomBuckets(b * h * sq, buckets, sq + buckets, dropped);
            int[] kb = RandomBuckets(b * hkv * skv, buckets, skv + 7 * buckets, dropped);
            SparsityPlan plan = BucketPlan.Create(b, h, hkv, sq, skv, qb, kb, causal, block);
            AttentionConformance.Check<float>(b, sq, skv, h, hkv, d, new AttentionOptions { Plan = plan }, $"buckets={buckets} dropped={dropped} causal={causal}",
                (q, k, v, o, lse, options) => Attention.Forward(q, k, v, o, options, lse));
        }
    }

    /// <summary>Every pair of the plan against the rule itself: same bucket, not dropped, causal — so block classes are right.</summary>
    [Fact]
    public void BucketPlanAllowsExactlyTheRule()
    {
        const int b = 2, h = 4, hkv = 2, sq = 300, skv = 333;
        int[] qb = RandomBuckets(b * h * sq, 4, 1, 0.1), kb = RandomBuckets(b * hkv * skv, 4, 2, 0.1);
        foreach (bool causal in new[] { false, true })
        {
            SparsityPlan plan = BucketPlan.Create(b, h, hkv, sq, skv, qb, kb, causal, 64);
            for (int bi = 0; bi < b; bi++)
                for (int hi = 0; hi < h; hi++)
                    for (int q = 0; q < sq; q++)
                        for (int kv = 0; kv < skv; kv++)
                        {
                            int qBucket = qb[(bi * h + hi) * sq + q], kBucket = kb[(bi * hkv + hi / 2) * skv + kv];
                            bool expected = qBucket >= 0 && qBucket == kBucket && (!causal || kv <= q + skv - sq);
                            Assert.True(expected == plan.Allows(bi, hi, q, kv), $"causal={causal} b={bi} h={hi} q={q} kv={kv}: expected {expected}");
                        }
            // One bucket, nothing dropped: the dense (causal) pattern, so most blocks are Full.
            SparsityPlan one = BucketPlan.Create(1, 1, 1, 512, 512, new int[512], new int[512], causal, 64);
            Assert.Equal(causal ? 513.0 / 1024 : 1.0, Metrics.Density(one, causal: false), 6);
        }
    }

    [Fact]
    public void DroppedQueriesGiveZeroOutputAndMinusInfinityLse()
    {
        const int s = 130, d = 40;
        TensorView<float> q = TestData.Random<float>(1, 1, s, 1, d), k = TestData.Random<float>(2, 1, s, 1, d), v = TestData.Random<float>(3, 1, s, 1, d);
        int[] buckets = [.. Enumerable.Range(0, s).Select(i => i % 3 == 0 ? -1 : 0)];
        SparsityPlan plan = BucketPlan.Create(1, 1, 1, s, s, buckets, buckets, causal: true);
        var o = new TensorView<float>(new float[s * d], 1, s, 1, d);
        var lse = new TensorView<float>(new float[s], 1, s, 1);
        Attention.Forward(q, k, v, o, new AttentionOptions { Plan = plan }, lse);
        for (int i = 0; i < s; i += 3)
        {
            Assert.Equal(float.NegativeInfinity, lse[0, i, 0]);
            for (int x = 0; x < d; x++) Assert.Equal(0f, o[0, i, 0, x]);
        }
        Assert.True(float.IsFinite(lse[0, 1, 0]));
    }

    /// <summary>Shared-QK hashing (q = k, as Reformer): every query lands in its own key's bucket, so it sees itself.</summary>
    [Fact]
    public void HashSelectorPutsEqualVectorsInOneBucket()
    {
        const int s = 500, h = 2, d = 64;
        TensorView<float> x = TestData.Random<float>(5, 1, s, h, d);
        var selector = (HashSparseSelector)Selectors.ParseAny("hash:buckets=16,seed=3,block=64");
        SparsityPlan plan = selector.Plan(x, x, causal: true);
        Assert.NotNull(plan.Permutation);
        for (int hi = 0; hi < h; hi++)
            for (int i = 0; i < s; i++)
            {
                Assert.True(plan.Allows(0, hi, i, i), $"h={hi} query {i} does not see its own key");
                if (i + 1 < s) Assert.False(plan.Allows(0, hi, i, i + 1), "future key");
            }
        // Sixteen buckets: about 1/16 of the causal pairs.
        double density = Metrics.Density(plan, causal: true);
        Assert.InRange(density, 0.02, 0.3);
        Assert.Equal("hash(buckets=16)", selector.Name);

        // A hash plan runs exactly: the executor against the float64 reference of the plan's pairs.
        TensorView<float> hq = TestData.Random<float>(6, 1, 257, 2, 64), hk = TestData.Random<float>(7, 1, 257, 1, 64);
        AttentionConformance.Check<float>(1, 257, 257, 2, 1, 64, new AttentionOptions { Plan = selector.Plan(hq, hk, causal: true) }, "hash plan",
            (q, k, v, o, lse, options) => Attention.Forward(q, k, v, o, options, lse));
    }

    /// <summary>TopP = 1 keeps every cluster pair: dense attention within the dense tolerance, causal or not, GQA, Sq ≠ Skv.</summary>
    [Theory]
    [InlineData(1, 97, 97, 2, 1, 64, true)]
    [InlineData(1, 257, 257, 2, 2, 40, false)]
    [InlineData(2, 70, 200, 4, 2, 80, true)]
    [InlineData(1, 1, 1, 1, 1, 64, false)]
    public void ClusterSelectorWithFullBudgetIsDense(int b, int sq, int skv, int h, int hkv, int d, bool causal)
    {
        var selector = (ClusterSelector)Selectors.ParseAny("cluster:q=8,k=16,p=1,block=64");
        AttentionConformance.Check<float>(b, sq, skv, h, hkv, d, new AttentionOptions { Causal = causal }, selector.Name,
            (q, k, v, o, lse, options) => SparseAttention.Forward(selector, q, k, v, o, options, lse));
    }

    /// <summary>
    /// Cluster pairs: every block class agrees with the pair rule element by element (Full blocks allow every pair,
    /// skipped blocks none), and on inputs made of aligned clusters the plan keeps most of the attention mass.
    /// </summary>
    [Fact]
    public void ClusterPlansAreConsistentAndKeepTheMassOfClusteredInputs()
    {
        const int s = 1024, h = 2, d = 32, groups = 8;
        var rng = new Random(11);
        float[][] centers = [.. Enumerable.Range(0, groups).Select(_ => TestData.Normal(d, rng.Next(), std: 1.2f))];
        TensorView<float> Clustered(int seed)
        {
            var r = new Random(seed);
            float[] noise = TestData.Normal((long)s * h * d, seed, std: 0.4f);
            for (int t = 0; t < s; t++)
                for (int hi = 0; hi < h; hi++)
                {
                    float[] c = centers[r.Next(groups)];
                    for (int x = 0; x < d; x++) noise[((t * h) + hi) * d + x] += c[x];
                }
            return new TensorView<float>(noise, 1, s, h, d);
        }
        TensorView<float> q = Clustered(1), k = Clustered(2), v = TestData.Random<float>(3, 1, s, h, d);
        foreach (bool causal in new[] { false, true })
        {
            var selector = new ClusterSelector { QueryClusters = 8, KeyClusters = 8, TopP = 0.9, BlockSize = 64 };
            SparsityPlan plan = selector.Plan(q, k, causal);
            BlockMask blocks = plan.Blocks!;
            var extent = blocks.Extent;
            for (int hi = 0; hi < h; hi++)
                for (int i = 0; i < s; i += 3)
                    for (int j = 0; j < s; j++)
                        Assert.True(blocks.Allows(0, hi, i, j) == blocks.Mask!.Allows(extent, 0, hi, i, j), $"causal={causal} h={hi} permuted ({i}, {j})");
            Assert.True(Metrics.Density(plan, causal) < 0.8, $"density {Metrics.Density(plan, causal)}");

            var dense = new TensorView<float>(new float[s * h * d], 1, s, h, d);
            var o = new TensorView<float>(new float[s * h * d], 1, s, h, d);
            var denseLse = new TensorView<float>(new float[s * h], 1, s, h);
            var lse = new TensorView<float>(new float[s * h], 1, s, h);
            Attention.Forward(q, k, v, dense, new AttentionOptions { Causal = causal }, denseLse);
            Attention.Forward(q, k, v, o, new AttentionOptions { Plan = plan }, lse);
            if (!causal) Assert.True(Metrics.AttentionRecall(lse, denseLse) >= 0.85, $"recall {Metrics.AttentionRecall(lse, denseLse):F3}");
        }
    }

    /// <summary>
    /// Keys constant within each skipped block make the centroid exact (exp(q·k̄) = mean exp(q·k)): a diagonal-only
    /// plan plus compensation then equals dense causal attention, for Sq = Skv and Sq &lt; Skv.
    /// </summary>
    [Theory]
    [InlineData(256, 256, 64, 2, 1)]
    [InlineData(100, 300, 128, 2, 2)]
    public void CentroidCompensationIsExactForConstantKeyBlocks(int sq, int skv, int d, int h, int hkv)
    {
        const int block = 64;
        TensorView<float> q = TestData.Random<float>(1, 1, sq, h, d), v = TestData.Random<float>(3, 1, skv, hkv, d);
        float[] blockKeys = TestData.Normal((long)((skv + block - 1) / block) * hkv * d, 2, std: 0.5f);
        var kData = new float[skv * hkv * d];
        for (int j = 0; j < skv; j++)
            for (int hi = 0; hi < hkv; hi++)
                Array.Copy(blockKeys, ((j / block) * hkv + hi) * d, kData, (j * hkv + hi) * d, d);
        var k = new TensorView<float>(kData, 1, skv, hkv, d);
        long offset = skv - sq;
        BlockMask diagonal = BlockMask.FromBlocks(1, h, sq, skv, block, block,
            (_, _, qb) => Enumerable.Range(0, (skv + block - 1) / block)
                .Where(kb => kb * block <= qb * block + block - 1 + offset && (kb + 1) * block - 1 > qb * block + offset)
                .Select(kb => (kb, BlockClass.Partial)), Mask.Causal);

        var dense = new TensorView<float>(new float[sq * h * d], 1, sq, h, d);
        var denseLse = new TensorView<float>(new float[sq * h], 1, sq, h);
        Attention.Forward(q, k, v, dense, new AttentionOptions { Causal = true }, denseLse);
        var o = new TensorView<float>(new float[sq * h * d], 1, sq, h, d);
        var lse = new TensorView<float>(new float[sq * h], 1, sq, h);
        Attention.Forward(q, k, v, o, new AttentionOptions { Plan = diagonal }, lse);
        double before = Metrics.RelativeL2(o, dense);
        CentroidCompensation.Apply(q, k, v, diagonal, scale: null, o, lse);
        double after = Metrics.RelativeL2(o, dense);
        Assert.True(before > 0.1, $"the diagonal alone should be far from dense: {before}");
        Assert.True(after < 1e-5, $"relative L2 after compensation {after:E2} (before {before:F3})");
        for (int i = 0; i < sq; i++)
            for (int hi = 0; hi < h; hi++) Assert.Equal(denseLse[0, i, hi], lse[0, i, hi], 3);

        // The same through the executor: a plan that carries the compensation, without asking for the LSE.
        var viaPlan = new TensorView<float>(new float[sq * h * d], 1, sq, h, d);
        Attention.Forward(q, k, v, viaPlan, new AttentionOptions { Plan = new SparsityPlan(diagonal).WithCompensation(Compensation.Centroid) });
        Assert.True(Metrics.RelativeL2(viaPlan, dense) < 1e-5, $"relative L2 via the plan {Metrics.RelativeL2(viaPlan, dense):E2}");
    }

    [Fact]
    public void CompensatedSelectorsRunThroughSparseAttention()
    {
        var selector = Selectors.ParseAny("pooled:budget=top2,block=64+centroid");
        Assert.Equal("pooled(top2)+centroid", selector.Name);
        const int s = 512, h = 2, d = 64;
        (TensorView<float> q, TensorView<float> k, TensorView<float> v, _) = StructuredInputs.Generate(1, s, h, h, d, StructureOptions.Default with { Seed = 4 });
        var dense = new TensorView<float>(new float[s * h * d], 1, s, h, d);
        Attention.Forward(q, k, v, dense, new AttentionOptions { Causal = true });
        var plain = new TensorView<float>(new float[s * h * d], 1, s, h, d);
        SparseAttention.Forward(((CompensatedSelector)selector).Inner, q, k, v, plain, new AttentionOptions { Causal = true });
        var compensated = new TensorView<float>(new float[s * h * d], 1, s, h, d);
        SparseAttention.Forward(selector, q, k, v, compensated, new AttentionOptions { Causal = true });
        double before = Metrics.RelativeL2(plain, dense), after = Metrics.RelativeL2(compensated, dense);
        Assert.True(after < before, $"compensation should reduce the error here: {before:F4} -> {after:F4}");
        // A covering budget skips nothing: compensation changes nothing.
        AttentionConformance.Check<float>(1, 130, 130, 2, 1, 64, new AttentionOptions { Causal = true }, "covering + centroid",
            (q2, k2, v2, o2, lse2, options) => SparseAttention.Forward(Selectors.ParseAny("pooled:budget=p1,block=64+centroid"), q2, k2, v2, o2, options, lse2));
        Assert.Contains("Softcap", Assert.Throws<ArgumentException>(() =>
            SparseAttention.Forward(selector, q, k, v, compensated, new AttentionOptions { Causal = true, Softcap = 30 })).Message);
    }

    [Fact]
    public void BadInputIsNamed()
    {
        Assert.Contains("queryOrder", Assert.Throws<ArgumentException>(() => new TokenPermutation(1, 1, 1, 3, 3, [0, 0, 1], [0, 1, 2])).Message);
        Assert.Contains("keyOrder must hold", Assert.Throws<ArgumentException>(() => new TokenPermutation(1, 1, 1, 3, 3, [0, 1, 2], [0, 1])).Message);
        Assert.Contains("keyBuckets", Assert.Throws<ArgumentException>(() => BucketPlan.Create(1, 2, 1, 4, 4, new int[8], new int[3], true)).Message);
        Assert.Contains("queryBuckets", Assert.Throws<ArgumentException>(() => BucketPlan.Create(1, 2, 1, 4, 4, new int[7], new int[4], true)).Message);
        Assert.Contains("H a multiple of Hkv", Assert.Throws<ArgumentException>(() => BucketPlan.Create(1, 3, 2, 4, 4, new int[12], new int[8], true)).Message);
        Assert.Contains("H a multiple of Hkv", Assert.Throws<ArgumentException>(() => new TokenPermutation(1, 3, 2, 2, 2, [0, 1, 0, 1, 0, 1], [0, 1, 0, 1])).Message);
        var wrongExtent = new TokenPermutation(1, 1, 1, 4, 4, [0, 1, 2, 3], [3, 2, 1, 0]);
        Assert.Contains("permutation is for", Assert.Throws<ArgumentException>(() => new SparsityPlan(BlockMask.Create(Mask.Causal, 1, 1, 8, 8, 4, 4), null, wrongExtent)).Message);
        Assert.Throws<ArgumentNullException>(() => new CompensatedSelector(null!));
        Assert.Throws<ArgumentOutOfRangeException>(() => BucketPlan.Create(1, 1, 1, 4, 4, new int[4], new int[4], true, blockSize: 100));
        Assert.Throws<ArgumentOutOfRangeException>(() => new HashSparseSelector { Buckets = 3 });
        Assert.Contains("hash takes", Assert.Throws<ArgumentException>(() => Selectors.ParseAny("hash:zz=1")).Message);
        Assert.Contains("cluster takes", Assert.Throws<ArgumentException>(() => Selectors.ParseAny("cluster:buckets=1")).Message);
        Assert.Throws<ArgumentOutOfRangeException>(() => new ClusterSelector { TopP = 0 });
        Assert.Throws<ArgumentOutOfRangeException>(() => new ClusterSelector { QueryClusters = 0 });
        Assert.Throws<ArgumentOutOfRangeException>(() => new ClusterSelector { KeyClusters = 2000 });
        Assert.Throws<ArgumentOutOfRangeException>(() => new ClusterSelector { Iterations = 0 });
        Assert.Throws<ArgumentOutOfRangeException>(() => new ClusterSelector { BlockSize = 100 });
        Assert.Throws<ArgumentOutOfRangeException>(() => new HashSparseSelector { BlockSize = 32 });
        TensorView<float> q3 = TestData.Random<float>(1, 1, 8, 3, 16), k2h = TestData.Random<float>(2, 1, 8, 2, 16);
        Assert.Contains("Hkv dividing H=3", Assert.Throws<ArgumentException>(() => new HashSparseSelector().Plan(q3, k2h)).Message);
        Assert.Contains("Hkv dividing H=3", Assert.Throws<ArgumentException>(() => new ClusterSelector().Plan(q3, k2h)).Message);

        SparsityPlan plan = BucketPlan.Create(1, 2, 1, 8, 8, new int[16], new int[8], true, 64);
        TensorView<float> q = TestData.Random<float>(1, 1, 8, 2, 16), k = TestData.Random<float>(2, 1, 8, 1, 16);
        var o = new TensorView<float>(new float[8 * 2 * 16], 1, 8, 2, 16);
        Assert.Contains("AlibiSlopes or Bias", Assert.Throws<ArgumentException>(() =>
            Attention.Forward(q, k, k, o, new AttentionOptions { Plan = plan, AlibiSlopes = [0.5f, 0.25f] })).Message);
        TensorView<float> k2 = TestData.Random<float>(2, 1, 8, 2, 16);
        Assert.Contains("Hkv=1", Assert.Throws<ArgumentException>(() => Attention.Forward(q, k2, k2, o, new AttentionOptions { Plan = plan })).Message);

        // Compensation needs blocks in the original order; Apply checks its plan and shapes.
        Assert.Contains("compensation", Assert.Throws<ArgumentException>(() => plan.WithCompensation(Compensation.Centroid)).Message);
        TokenSet tokens = TokenSet.Create(1, 2, 8, 8, 4, (_, _, _) => [0]);
        Assert.Contains("compensation", Assert.Throws<ArgumentException>(() => new SparsityPlan(null, tokens, null, Compensation.Centroid)).Message);
        SparsityPlan blocks = BlockMask.Create(Mask.Causal, 1, 2, 8, 8, 4, 4);
        var lse = new TensorView<float>(new float[16], 1, 8, 2);
        Assert.Contains("lse", Assert.Throws<ArgumentException>(() => CentroidCompensation.Apply(q, k, k, blocks, null, o, new TensorView<float>(new float[8], 1, 8, 1))).Message);
        Assert.Contains("plan was built for", Assert.Throws<ArgumentException>(() =>
            CentroidCompensation.Apply(q, k, k, (SparsityPlan)BlockMask.Create(Mask.Causal, 1, 2, 8, 9, 4, 4), null, o, lse)).Message);
        Assert.Contains("permuted", Assert.Throws<ArgumentException>(() => CentroidCompensation.Apply(q, k, k, plan, null, o, lse)).Message);
    }
}
