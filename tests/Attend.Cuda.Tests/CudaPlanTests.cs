using Attend.Masks;
using Attend.Sparse;
using Attend.Tensors;

namespace Attend.Cuda.Tests;

/// <summary>Masks and block-sparse plans on the GPU against the float64 reference of the same plan (CUDA part 2).</summary>
public sealed class CudaPlanTests
{
    public static TheoryData<string> MaskNames() => [.. Masks().Keys];

    private static Dictionary<string, Mask> Masks() => new()
    {
        ["causal&window(100)"] = Mask.Causal & Mask.SlidingWindow(100),
        ["sink(16)|causal&window(40)"] = Mask.Sink(16) | (Mask.Causal & Mask.SlidingWindow(40)),
        ["window(30,30)"] = Mask.SlidingWindow(30, 30),
        ["dilated(8,3)"] = Mask.DilatedWindow(8, 3),
        ["strided_shards"] = Mask.StridedShards(64, 1, 2),
    };

    [CudaTheory]
    [MemberData(nameof(MaskNames))]
    public void Should_match_the_reference_on_masks(string name)
    {
        Mask mask = Masks()[name];
        foreach ((int sq, int skv, int d) in new[] { (300, 300, 64), (97, 97, 128), (200, 330, 128), (130, 130, 256), (1, 50, 64) })
        {
            AttentionConformance.Check<BFloat16>(1, sq, skv, 4, 2, d, new AttentionOptions { Mask = mask }, $"cuda mask {name}", CudaAttentionTests.OnGpu);
        }
        AttentionConformance.Check<BFloat16>(2, 260, 260, 2, 2, 64, new AttentionOptions { Mask = mask, Causal = true }, $"cuda mask {name} & causal", CudaAttentionTests.OnGpu);
        AttentionConformance.Check<float>(1, 200, 200, 2, 1, 80, new AttentionOptions { Mask = mask }, $"cuda mask {name} f32", CudaAttentionTests.OnGpu, DType.BFloat16);
    }

    [CudaFact]
    public void Should_match_the_reference_on_block_plans()
    {
        const int s = 700, h = 4;
        var rng = new Random(3);
        // Random per-head plans with Full and Partial (causal) blocks, 128 and 256 blocks.
        foreach ((int bq, int bk) in new[] { (128, 128), (256, 128), (128, 256) })
        {
            int qBlocks = (s + bq - 1) / bq, kBlocks = (s + bk - 1) / bk;
            var keep = new bool[h, qBlocks, kBlocks];
            for (int i = 0; i < keep.Length; i++) keep[i / (qBlocks * kBlocks), i / kBlocks % qBlocks, i % kBlocks] = rng.NextDouble() < 0.4;
            BlockMask plan = BlockMask.FromBlocks(1, h, s, s, bq, bk, (b, hh, qb) =>
                Enumerable.Range(0, kBlocks).Where(kb => keep[hh, qb, kb] || kb == 0).Select(kb => (kb, (kb + 1) * bk <= qb * bq ? BlockClass.Full : BlockClass.Partial)), Mask.Causal);
            foreach (int d in new[] { 64, 128, 256 })
            {
                AttentionConformance.Check<BFloat16>(1, s, s, h, 2, d, new AttentionOptions { Plan = plan }, $"cuda plan {bq}x{bk}", CudaAttentionTests.OnGpu);
            }
        }
        // Per-head masks (MoA windows): one plan row set per head.
        AttentionConformance.Check<BFloat16>(1, s, s, h, 2, 128, new AttentionOptions { Mask = Mask.HeadWindows(20, 200, 50, 1000) }, "cuda head windows", CudaAttentionTests.OnGpu);
    }

    [CudaFact]
    public void Should_match_the_reference_on_documents_and_strided_neighborhoods()
    {
        int[] docs = [.. Enumerable.Range(0, 300).Select(i => i < 70 ? 0 : i < 71 ? 1 : i < 200 ? 2 : 3)];
        AttentionConformance.Check<BFloat16>(1, 300, 300, 2, 1, 64, new AttentionOptions { Mask = Mask.Document(docs), Causal = true }, "cuda documents", CudaAttentionTests.OnGpu);
        Mask strided = Mask.Neighborhood([16, 16], [5, 7], [1, 2], [false, true], [3, 2]);
        AttentionConformance.Check<BFloat16>(1, 256, 256, 2, 2, 128, new AttentionOptions { Mask = strided }, "cuda strided neighborhood", CudaAttentionTests.OnGpu);
    }

    [CudaFact]
    public void Should_run_selector_plans_like_the_cpu()
    {
        const int s = 1000, h = 2, d = 64;
        (TensorView<float> q, TensorView<float> k, TensorView<float> _, _) = StructuredInputs.Generate(1, s, h, 1, d);
        foreach (SparsitySelector selector in new SparsitySelector[] { new XAttentionSelector(), new PooledBlockSelector(), new FlexPrefillSelector() })
        {
            SparsityPlan plan = selector.Plan(q, k, causal: true);
            Assert.Null(plan.Tokens);
            AttentionConformance.Check<BFloat16>(1, s, s, h, 1, d, new AttentionOptions { Plan = plan }, $"cuda {selector.Name}", CudaAttentionTests.OnGpu);
        }
    }

    [CudaFact]
    public void Should_match_the_reference_on_gathered_tokens()
    {
        // Token-only plans (per head, some rows empty, the last key, tokens beyond one gathered tile), with and without
        // a causal element mask, D 64/128/256, GQA, Sq < Skv.
        var rng = new Random(5);
        foreach ((int sq, int skv, int d) in new[] { (300, 300, 64), (200, 450, 128), (257, 257, 256) })
        {
            foreach (Mask? mask in new Mask?[] { null, Mask.Causal })
            {
                int[][][] chosen = [.. Enumerable.Range(0, 4).Select(_ => Enumerable.Range(0, (sq + 127) / 128).Select(qb =>
                    qb == 1 ? Array.Empty<int>() : Enumerable.Range(0, skv).Where(_ => rng.NextDouble() < 0.35).Append(skv - 1).ToArray()).ToArray())];
                TokenSet tokens = TokenSet.Create(1, 4, sq, skv, 128, (_, h, qb) => chosen[h][qb], mask);
                AttentionConformance.Check<BFloat16>(1, sq, skv, 4, 2, d, new AttentionOptions { Plan = tokens }, $"cuda tokens {sq}x{skv} d{d} {mask}", CudaAttentionTests.OnGpu);
            }
        }
        // Blocks and tokens together: tokens inside visited blocks belong to the blocks (the host drops them from the
        // gathered rows), the others are gathered; causal partial blocks, causal tokens; f16 too.
        const int s = 640;
        BlockMask blocks = BlockMask.FromBlocks(1, 2, s, s, 128, 128, (_, h, qb) =>
            new[] { 0, qb }.Distinct().Select(kb => (kb, kb < qb ? BlockClass.Full : BlockClass.Partial)), Mask.Causal);
        TokenSet stripes = TokenSet.Create(1, 2, s, s, 128, (_, h, qb) => Enumerable.Range(0, s).Where(t => t % (7 + h) == 3), Mask.Causal);
        var plan = new SparsityPlan(blocks, stripes);
        foreach (int d in new[] { 64, 128 })
        {
            AttentionConformance.Check<BFloat16>(1, s, s, 2, 1, d, new AttentionOptions { Plan = plan }, $"cuda blocks+tokens d{d}", CudaAttentionTests.OnGpu);
            AttentionConformance.Check<Half>(1, s, s, 2, 1, d, new AttentionOptions { Plan = plan }, $"cuda blocks+tokens f16 d{d}", CudaAttentionTests.OnGpu);
        }
    }

    [CudaFact]
    public void Should_run_token_selector_plans_like_the_cpu()
    {
        // Vertical-slash (columns as tokens + diagonal bands as blocks) and AnchorAttention (stripes as tokens).
        const int s = 1000, h = 2, d = 64;
        (TensorView<float> q, TensorView<float> k, TensorView<float> _, _) = StructuredInputs.Generate(1, s, h, 1, d);
        foreach (SparsitySelector selector in new SparsitySelector[] { new VerticalSlashSelector { BlockSize = 128 }, new AnchorSelector { BlockSize = 128 } })
        {
            SparsityPlan plan = selector.Plan(q, k, causal: true);
            Assert.NotNull(plan.Tokens);
            AttentionConformance.Check<BFloat16>(1, s, s, h, 1, d, new AttentionOptions { Plan = plan }, $"cuda {selector.Name}", CudaAttentionTests.OnGpu);
        }
    }

    /// <summary>
    /// Plans over a token permutation (bucket plans with dropped tokens, GQA, Sq ≠ Skv; the hash-sparse and cluster
    /// selectors' plans) gathered, run and scattered on the device, against the float64 reference of the same plan.
    /// </summary>
    [CudaFact]
    public void Should_run_permuted_plans_like_the_reference()
    {
        foreach ((int b, int sq, int skv, int h, int hkv, int d, bool causal) in new[] { (1, 257, 257, 2, 1, 64, true), (2, 97, 97, 4, 2, 128, false), (1, 97, 300, 2, 1, 64, true) })
        {
            var rng = new Random(sq + skv);
            int[] qb = [.. Enumerable.Range(0, b * h * sq).Select(_ => rng.NextDouble() < 0.1 ? -1 : rng.Next(3))];
            int[] kb = [.. Enumerable.Range(0, b * hkv * skv).Select(_ => rng.NextDouble() < 0.1 ? -1 : rng.Next(3))];
            SparsityPlan plan = BucketPlan.Create(b, h, hkv, sq, skv, qb, kb, causal, 128);
            AttentionConformance.Check<BFloat16>(b, sq, skv, h, hkv, d, new AttentionOptions { Plan = plan }, $"cuda buckets causal={causal}", CudaAttentionTests.OnGpu);
            AttentionConformance.Check<float>(b, sq, skv, h, hkv, d, new AttentionOptions { Plan = plan }, $"cuda buckets f32 causal={causal}", CudaAttentionTests.OnGpu, DType.BFloat16);
        }
        const int s = 700;
        (TensorView<float> q, TensorView<float> k, _, _) = StructuredInputs.Generate(1, s, 2, 1, 64);
        foreach (ISparsitySelector selector in new ISparsitySelector[] { new HashSparseSelector { Buckets = 4 }, new ClusterSelector { QueryClusters = 8, KeyClusters = 8 } })
        {
            SparsityPlan plan = selector.Plan(q, k, causal: true);
            Assert.NotNull(plan.Permutation);
            AttentionConformance.Check<BFloat16>(1, s, s, 2, 1, 64, new AttentionOptions { Plan = plan }, $"cuda {selector.Name}", CudaAttentionTests.OnGpu);
        }
    }

    /// <summary>
    /// Centroid-compensated plans (blocks, blocks + gathered tokens; causal, non-causal, Sq &lt; Skv; GQA) on the GPU
    /// against the CPU executor on the same bf16 inputs and plan; compensation must change some results.
    /// </summary>
    [CudaFact]
    public void Should_compensate_skipped_blocks_like_the_cpu()
    {
        double largestChange = 0;
        foreach ((int sq, int skv, int h, int hkv, int d, bool causal, string spec) in new[]
        {
            (1000, 1000, 4, 2, 64, true, "pooled:budget=top2"), (700, 700, 2, 1, 128, false, "pooled:budget=top2"),
            (300, 900, 2, 2, 64, true, "pooled:budget=top1"), (1000, 1000, 2, 1, 64, true, "vertical-slash:v=64,s=8"),
        })
        {
            (TensorView<float> qf, TensorView<float> kf, TensorView<float> vf, _) = StructuredInputs.Generate(1, skv, h, hkv, d, StructureOptions.Default with { Seed = sq });
            TensorView<BFloat16> q = Bf16(qf, skv - sq, sq), k = Bf16(kf, 0, skv), v = Bf16(vf, 0, skv);
            SparsityPlan plain = Selectors.Parse(spec).Plan(q, k, causal);
            SparsityPlan plan = plain.WithCompensation(Compensation.Centroid);
            var cpu = new TensorView<BFloat16>(new BFloat16[q.ElementCount], 1, sq, h, d);
            var cpuLse = new TensorView<float>(new float[sq * h], 1, sq, h);
            Attention.Forward(q, k, v, cpu, new AttentionOptions { Plan = plan }, cpuLse);
            using DeviceTensor<BFloat16> dq = DeviceTensor<BFloat16>.FromHost(q), dk = DeviceTensor<BFloat16>.FromHost(k), dv = DeviceTensor<BFloat16>.FromHost(v);
            using DeviceTensor<BFloat16> o = DeviceTensor<BFloat16>.Allocate(1, sq, h, d), o0 = DeviceTensor<BFloat16>.Allocate(1, sq, h, d);
            using DeviceTensor<float> lse = DeviceTensor<float>.Allocate(1, sq, h);
            Attention.Forward(dq, dk, dv, o, new AttentionOptions { Plan = plan }, lse);
            Attention.Forward(dq, dk, dv, o0, new AttentionOptions { Plan = plain });
            BFloat16[] gpu = o.ToHost(), uncompensated = o0.ToHost();
            float[] gpuLse = lse.ToHost();
            double worst = 0, change = 0, worstLse = 0;
            BFloat16[] cpuHost = cpu.ToArray();
            for (int i = 0; i < gpu.Length; i++)
            {
                worst = Math.Max(worst, Math.Abs((float)gpu[i] - (float)cpuHost[i]));
                change = Math.Max(change, Math.Abs((float)gpu[i] - (float)uncompensated[i]));
            }
            float[] cpuLseHost = cpuLse.ToArray();
            for (int i = 0; i < gpuLse.Length; i++) if (float.IsFinite(cpuLseHost[i])) worstLse = Math.Max(worstLse, Math.Abs(gpuLse[i] - cpuLseHost[i]));
            string where = $"{spec}+centroid Sq={sq} Skv={skv} H={h}/{hkv} D={d} causal={causal}";
            Assert.True(worst < 3e-2, $"{where}: GPU vs CPU executor max error {worst:E3}");
            Assert.True(worstLse < 2e-2, $"{where}: LSE error {worstLse:E3}");
            largestChange = Math.Max(largestChange, change);
        }
        Assert.True(largestChange > 1e-2, $"compensation changed the outputs by only {largestChange:E3}");   // where little is skipped it changes little
    }

    private static TensorView<BFloat16> Bf16(TensorView<float> x, int start, int count)
    {
        int h = x.Dim(2), d = x.Dim(3);
        var data = new BFloat16[(long)count * h * d];
        int i = 0;
        for (int s = start; s < start + count; s++)
            for (int hh = 0; hh < h; hh++)
                for (int c = 0; c < d; c++) data[i++] = (BFloat16)x[0, s, hh, c];
        return new TensorView<BFloat16>(data, 1, count, h, d);
    }

    [CudaFact]
    public void Should_name_what_the_gpu_does_not_run()
    {
        using DeviceTensor<BFloat16> x = DeviceTensor<BFloat16>.Allocate(1, 256, 2, 128), o = DeviceTensor<BFloat16>.Allocate(1, 256, 2, 128);
        TokenSet small64 = TokenSet.Create(1, 2, 256, 256, 64, (_, _, _) => [0, 5]);
        Assert.Contains("multiples of 128", Assert.Throws<NotSupportedException>(() => Attention.Forward(x, x, x, o, new AttentionOptions { Plan = small64 })).Message);
        TokenSet otherShape = TokenSet.Create(1, 2, 256, 300, 128, (_, _, _) => [0, 5]);
        Assert.ThrowsAny<ArgumentException>(() => Attention.Forward(x, x, x, o, new AttentionOptions { Plan = otherShape }));
        BlockMask small = BlockMask.Create(Mask.Causal, 1, 2, 256, 256, 64, 64);
        Assert.Contains("multiples of 128", Assert.Throws<NotSupportedException>(() => Attention.Forward(x, x, x, o, new AttentionOptions { Plan = small })).Message);
        BlockMask windowed = BlockMask.Create(Mask.Causal & Mask.SlidingWindow(100), 1, 2, 256, 256, 128, 128);
        Assert.Contains("centroid compensation on the GPU", Assert.Throws<NotSupportedException>(() =>
            Attention.Forward(x, x, x, o, new AttentionOptions { Plan = new SparsityPlan(windowed).WithCompensation(Compensation.Centroid) })).Message);
        Mask predicate = Mask.FromPredicate((_, _, q, kv) => q >= kv);
        Assert.Throws<NotSupportedException>(() => Attention.Forward(x, x, x, o, new AttentionOptions { Mask = predicate }));
    }
}
