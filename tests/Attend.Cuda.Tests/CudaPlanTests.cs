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
    public void Should_name_what_the_gpu_does_not_run()
    {
        using DeviceTensor<BFloat16> x = DeviceTensor<BFloat16>.Allocate(1, 256, 2, 128), o = DeviceTensor<BFloat16>.Allocate(1, 256, 2, 128);
        TokenSet tokens = TokenSet.Create(1, 2, 256, 256, 128, (_, _, _) => [0, 5]);
        Assert.Contains("TokenSet", Assert.Throws<NotSupportedException>(() => Attention.Forward(x, x, x, o, new AttentionOptions { Plan = tokens })).Message);
        BlockMask small = BlockMask.Create(Mask.Causal, 1, 2, 256, 256, 64, 64);
        Assert.Contains("multiples of 128", Assert.Throws<NotSupportedException>(() => Attention.Forward(x, x, x, o, new AttentionOptions { Plan = small })).Message);
        Mask predicate = Mask.FromPredicate((_, _, q, kv) => q >= kv);
        Assert.Throws<NotSupportedException>(() => Attention.Forward(x, x, x, o, new AttentionOptions { Mask = predicate }));
    }
}
