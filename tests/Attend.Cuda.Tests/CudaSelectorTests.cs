using Attend.Masks;
using Attend.Sparse;
using Attend.Tensors;

namespace Attend.Cuda.Tests;

/// <summary>Selectors that build their plan on the GPU (CUDA part 2, item 2) against the CPU selector and executor.</summary>
public sealed class CudaSelectorTests
{
    private static IEnumerable<(string Name, PooledBlockSelector Selector)> Selectors() =>
    [
        ("top-p 0.95 (default)", new PooledBlockSelector()),
        ("top-p 0.5", new PooledBlockSelector { Budget = BlockBudget.TopP(0.5) }),
        ("top-k 3", new PooledBlockSelector { Budget = BlockBudget.TopK(3) }),
        ("threshold 0.02, no sink/diagonal", new PooledBlockSelector { Budget = BlockBudget.Threshold(0.02), KeepSinkAndDiagonal = false }),
        ("top-p 0.9, 256 blocks", new PooledBlockSelector { Budget = BlockBudget.TopP(0.9), BlockSize = 256 }),
    ];

    /// <summary>
    /// The device plan keeps the CPU selector's blocks on the same (bf16-rounded) structured inputs: awkward lengths,
    /// GQA, Sq &lt; Skv, causal or not, every budget kind. Float sums in another order may flip an entry at the budget's
    /// edge, so at most 1% of the blocks may differ; kinds (Full / Partial on the diagonal) must agree where both keep.
    /// </summary>
    [CudaFact]
    public void Should_choose_the_cpu_selectors_blocks()
    {
        foreach ((int sq, int skv, int h, int hkv, int d, bool causal) in new[] { (1000, 1000, 4, 2, 64, true), (2048, 2048, 2, 2, 128, true), (300, 1100, 2, 1, 128, true), (777, 777, 2, 1, 80, false) })
        {
            (TensorView<float> qf, TensorView<float> kf, _, _) = StructuredInputs.Generate(1, Math.Max(sq, skv), h, hkv, d, StructureOptions.Default with { Seed = sq });
            TensorView<BFloat16> q = Rows(qf, Math.Max(sq, skv) - sq, sq), k = Rows(kf, 0, skv);
            using DeviceTensor<BFloat16> dq = DeviceTensor<BFloat16>.FromHost(q), dk = DeviceTensor<BFloat16>.FromHost(k);
            foreach ((string name, PooledBlockSelector selector) in Selectors())
            {
                BlockMask cpu = selector.Plan(q, k, causal).Blocks!;
                using DeviceBlockPlan plan = CudaSelectors.Plan(selector, dq, dk, causal);
                AssertSameBlocks(cpu, plan, $"{name} Sq={sq} Skv={skv} D={d} causal={causal}", 0.01);
            }
        }
    }

    /// <summary>
    /// The device plan keeps the CPU plan's blocks: at most <paramref name="share"/> of them may differ (float sums in
    /// another order flip entries at the budget's edge), kinds agree where both keep a block, rows ascend.
    /// </summary>
    private static void AssertSameBlocks(BlockMask cpu, DeviceBlockPlan plan, string what, double share)
    {
        BlockMask gpu = plan.ToHost();
        Assert.Equal(cpu.QueryBlocks, gpu.QueryBlocks);
        long differing = 0;
        for (int hh = 0; hh < cpu.Extent.Heads; hh++)
            for (int qb = 0; qb < cpu.QueryBlocks; qb++)
            {
                int[] a = cpu.Row(0, hh, qb, out ReadOnlySpan<BlockClass> ak).ToArray(), b = gpu.Row(0, hh, qb, out ReadOnlySpan<BlockClass> bk).ToArray();
                BlockClass[] akinds = ak.ToArray(), bkinds = bk.ToArray();
                differing += a.Except(b).Count() + b.Except(a).Count();
                for (int i = 0; i < a.Length; i++)
                {
                    int j = Array.IndexOf(b, a[i]);
                    if (j >= 0) Assert.True(akinds[i] == bkinds[j], $"{what}: block ({hh}, {qb}, {a[i]}) is {akinds[i]} on the CPU, {bkinds[j]} on the GPU");
                }
                Assert.True(b.SequenceEqual(b.Order()), $"{what}: GPU row ({hh}, {qb}) not ascending");
            }
        Assert.True(differing <= Math.Max(1, (long)(cpu.VisitedBlocks * share)), $"{what}: {differing} blocks differ of {cpu.VisitedBlocks} (CPU) / {gpu.VisitedBlocks} (GPU)");
        Assert.Equal(gpu.VisitedBlocks, plan.VisitedBlocks);
    }

    private static IEnumerable<(string Name, XAttentionSelector Selector)> XAttentionSelectors() =>
    [
        ("defaults (t 0.9, stride 8, block 128)", new XAttentionSelector()),
        ("t 0.95, stride 16", new XAttentionSelector { Threshold = 0.95, Stride = 16 }),
        ("t 0.8, block 256", new XAttentionSelector { Threshold = 0.8, BlockSize = 256 }),
        ("t 0.9, block 64", new XAttentionSelector { BlockSize = 64 }),
        ("t 0.9, stride 2 (64 groups a block)", new XAttentionSelector { Stride = 2 }),
    ];

    /// <summary>
    /// XAttention's antidiagonal estimate on the tensor cores keeps the CPU selector's blocks on the same bf16 inputs
    /// (bf16 operands are exact; only the fp32 sums' order differs): awkward lengths, GQA, Sq &lt; Skv, causal or not,
    /// every groups-per-block variant. At most 1% may differ.
    /// </summary>
    [CudaFact]
    public void Should_choose_the_cpu_xattention_blocks()
    {
        foreach ((int sq, int skv, int h, int hkv, int d, bool causal) in new[] { (1000, 1000, 4, 2, 64, true), (2048, 2048, 2, 2, 128, true), (300, 1100, 2, 1, 128, true), (777, 777, 2, 1, 80, false), (97, 97, 2, 1, 256, true) })
        {
            (TensorView<float> qf, TensorView<float> kf, _, _) = StructuredInputs.Generate(1, Math.Max(sq, skv), h, hkv, d, StructureOptions.Default with { Seed = sq + 3 });
            TensorView<BFloat16> q = Rows(qf, Math.Max(sq, skv) - sq, sq), k = Rows(kf, 0, skv);
            using DeviceTensor<BFloat16> dq = DeviceTensor<BFloat16>.FromHost(q), dk = DeviceTensor<BFloat16>.FromHost(k);
            foreach ((string name, XAttentionSelector selector) in XAttentionSelectors())
            {
                BlockMask cpu = selector.Plan(q, k, causal).Blocks!;
                using DeviceBlockPlan plan = CudaSelectors.Plan(selector, dq, dk, causal);
                AssertSameBlocks(cpu, plan, $"xattention {name} Sq={sq} Skv={skv} D={d} causal={causal}", 0.01);
                using DeviceBlockPlan dispatched = CudaSelectors.Plan((ISparsitySelector)selector, dq, dk, causal);
                Assert.Equal(plan.VisitedBlocks, dispatched.VisitedBlocks);
            }
        }
        // f32 inputs are rounded to bf16 operands on the device (the CPU estimates in f32): close, not identical.
        {
            (TensorView<float> qf, TensorView<float> kf, _, _) = StructuredInputs.Generate(1, 1000, 4, 2, 64, StructureOptions.Default with { Seed = 5 });
            using DeviceTensor<float> dq = DeviceTensor<float>.FromHost(qf), dk = DeviceTensor<float>.FromHost(kf);
            var selector = new XAttentionSelector();
            using DeviceBlockPlan plan = CudaSelectors.Plan(selector, dq, dk, causal: true);
            AssertSameBlocks(selector.Plan(qf, kf, causal: true).Blocks!, plan, "xattention f32 inputs", 0.03);
        }
    }

    private static IEnumerable<(string Name, SaleSelector Selector)> SaleSelectors() =>
    [
        ("defaults (t 0.02, 4-bit, rows/4)", new SaleSelector()),
        ("t 0.004, every row", new SaleSelector { Threshold = 0.004, RowStride = 1 }),
        ("8-bit, t 0.05, rows/3", new SaleSelector { Bits = 8, Threshold = 0.05, RowStride = 3 }),
        ("block 256, rows/8", new SaleSelector { BlockSize = 256, RowStride = 8 }),
        ("block 64, t 0.01, no sink/diagonal", new SaleSelector { BlockSize = 64, Threshold = 0.01, KeepSinkAndDiagonal = false }),
    ];

    /// <summary>
    /// SALE's low-bit estimate on the tensor cores keeps the CPU selector's blocks on the same bf16 inputs: the integer
    /// products are exact on both; the keys' mean is summed in f32 on the device (f64 on the CPU), which may move a
    /// quantized key across a rounding edge, so at most 2% may differ. Awkward lengths, GQA, Sq &lt; Skv, causal or
    /// not, 4 and 8 bits, row strides, block sizes.
    /// </summary>
    [CudaFact]
    public void Should_choose_the_cpu_sale_blocks()
    {
        foreach ((int sq, int skv, int h, int hkv, int d, bool causal) in new[] { (1000, 1000, 4, 2, 64, true), (2048, 2048, 2, 2, 128, true), (300, 1100, 2, 1, 128, true), (777, 777, 2, 1, 80, false), (97, 97, 2, 1, 256, true) })
        {
            (TensorView<float> qf, TensorView<float> kf, _, _) = StructuredInputs.Generate(1, Math.Max(sq, skv), h, hkv, d, StructureOptions.Default with { Seed = sq + 11 });
            TensorView<BFloat16> q = Rows(qf, Math.Max(sq, skv) - sq, sq), k = Rows(kf, 0, skv);
            using DeviceTensor<BFloat16> dq = DeviceTensor<BFloat16>.FromHost(q), dk = DeviceTensor<BFloat16>.FromHost(k);
            foreach ((string name, SaleSelector selector) in SaleSelectors())
            {
                BlockMask cpu = selector.Plan(q, k, causal).Blocks!;
                using DeviceBlockPlan plan = CudaSelectors.Plan((ISparsitySelector)selector, dq, dk, causal);
                AssertSameBlocks(cpu, plan, $"sale {name} Sq={sq} Skv={skv} D={d} causal={causal}", 0.02);
            }
        }
    }

    /// <summary>
    /// The estimates' other input types: f16 (XAttention multiplies f16 operands on the tensor cores, SALE widens f16 to
    /// quantize) and f32 (SALE quantizes the f32 values themselves) keep the CPU selector's blocks on the same inputs.
    /// </summary>
    [CudaFact]
    public void Should_choose_the_cpu_blocks_from_f16_and_f32_inputs()
    {
        (TensorView<float> qf, TensorView<float> kf, _, _) = StructuredInputs.Generate(1, 1000, 4, 2, 64, StructureOptions.Default with { Seed = 9 });
        TensorView<Half> qh = ToHalf(qf), kh = ToHalf(kf);
        using DeviceTensor<Half> dqh = DeviceTensor<Half>.FromHost(qh), dkh = DeviceTensor<Half>.FromHost(kh);
        using DeviceTensor<float> dqf = DeviceTensor<float>.FromHost(qf), dkf = DeviceTensor<float>.FromHost(kf);
        foreach (SparsitySelector selector in new SparsitySelector[] { new XAttentionSelector(), new XAttentionSelector { Stride = 16 }, new SaleSelector(), new SaleSelector { Bits = 8, RowStride = 1 } })
        {
            using (DeviceBlockPlan plan = CudaSelectors.Plan(selector, dqh, dkh, causal: true))
            {
                AssertSameBlocks(selector.Plan(qh, kh, causal: true).Blocks!, plan, $"{selector.Name} f16 inputs", 0.02);
            }
            if (selector is SaleSelector)
            {
                using DeviceBlockPlan plan = CudaSelectors.Plan(selector, dqf, dkf, causal: true);
                AssertSameBlocks(selector.Plan(qf, kf, causal: true).Blocks!, plan, $"{selector.Name} f32 inputs", 0.02);
            }
        }
    }

    private static TensorView<Half> ToHalf(TensorView<float> x)
    {
        var data = new Half[(long)x.Dim(0) * x.Dim(1) * x.Dim(2) * x.Dim(3)];
        int i = 0;
        for (int b = 0; b < x.Dim(0); b++)
            for (int t = 0; t < x.Dim(1); t++)
                for (int h = 0; h < x.Dim(2); h++)
                    for (int c = 0; c < x.Dim(3); c++) data[i++] = (Half)x[b, t, h, c];
        return new TensorView<Half>(data, x.Dim(0), x.Dim(1), x.Dim(2), x.Dim(3));
    }

    /// <summary>A device SALE plan runs on the GPU as its host copy runs on the float64 reference (bf16 rule).</summary>
    [CudaFact]
    public void Should_execute_device_sale_plans_like_the_reference_of_their_host_copy()
    {
        (TensorView<float> qf, TensorView<float> kf, _, _) = StructuredInputs.Generate(1, 1000, 4, 2, 64);
        using DeviceTensor<BFloat16> dq = DeviceTensor<BFloat16>.FromHost(Rows(qf, 0, 1000)), dk = DeviceTensor<BFloat16>.FromHost(Rows(kf, 0, 1000));
        using DeviceBlockPlan plan = CudaSelectors.Plan(new SaleSelector { Threshold = 0.05 }, dq, dk, causal: true);
        Assert.InRange(plan.Density, 0.01, 0.99);
        BlockMask host = plan.ToHost();
        void Run(TensorView<BFloat16> q, TensorView<BFloat16> k, TensorView<BFloat16> v, TensorView<BFloat16> o, TensorView<float> lse, AttentionOptions options) =>
            CudaAttentionTests.OnGpu(q, k, v, o, lse, options with { Plan = null }, plan);
        AttentionConformance.Check<BFloat16>(1, 1000, 1000, 4, 2, 64, new AttentionOptions { Plan = host }, "cuda device-built sale plan", Run);
    }

    /// <summary>A device XAttention plan runs on the GPU as its host copy runs on the float64 reference (bf16 rule).</summary>
    [CudaFact]
    public void Should_execute_device_xattention_plans_like_the_reference_of_their_host_copy()
    {
        foreach ((int s, int h, int hkv, int d) in new[] { (1000, 4, 2, 64), (513, 2, 1, 128) })
        {
            (TensorView<float> qf, TensorView<float> kf, _, _) = StructuredInputs.Generate(1, s, h, hkv, d);
            using DeviceTensor<BFloat16> dq = DeviceTensor<BFloat16>.FromHost(Rows(qf, 0, s)), dk = DeviceTensor<BFloat16>.FromHost(Rows(kf, 0, s));
            using DeviceBlockPlan plan = CudaSelectors.Plan(new XAttentionSelector { Threshold = 0.8 }, dq, dk, causal: true);
            Assert.InRange(plan.Density, 0.01, 0.99);
            BlockMask host = plan.ToHost();
            void Run(TensorView<BFloat16> q, TensorView<BFloat16> k, TensorView<BFloat16> v, TensorView<BFloat16> o, TensorView<float> lse, AttentionOptions options) =>
                CudaAttentionTests.OnGpu(q, k, v, o, lse, options with { Plan = null }, plan);
            AttentionConformance.Check<BFloat16>(1, s, s, h, hkv, d, new AttentionOptions { Plan = host }, "cuda device-built xattention plan", Run);
        }
    }

    /// <summary>A device-built plan runs on the GPU as its host copy runs on the float64 reference (bf16 rule).</summary>
    [CudaFact]
    public void Should_execute_device_plans_like_the_reference_of_their_host_copy()
    {
        foreach ((int s, int h, int hkv, int d) in new[] { (1000, 4, 2, 64), (513, 2, 1, 128) })
        {
            (TensorView<float> qf, TensorView<float> kf, _, _) = StructuredInputs.Generate(1, s, h, hkv, d);
            using DeviceTensor<BFloat16> dq = DeviceTensor<BFloat16>.FromHost(Rows(qf, 0, s)), dk = DeviceTensor<BFloat16>.FromHost(Rows(kf, 0, s));
            using DeviceBlockPlan plan = CudaSelectors.Plan(new PooledBlockSelector { Budget = BlockBudget.TopP(0.8) }, dq, dk, causal: true);
            Assert.InRange(plan.Density, 0.01, 0.99);
            BlockMask host = plan.ToHost();
            void Run(TensorView<BFloat16> q, TensorView<BFloat16> k, TensorView<BFloat16> v, TensorView<BFloat16> o, TensorView<float> lse, AttentionOptions options) =>
                CudaAttentionTests.OnGpu(q, k, v, o, lse, options with { Plan = null }, plan);
            AttentionConformance.Check<BFloat16>(1, s, s, h, hkv, d, new AttentionOptions { Plan = host }, "cuda device-built plan", Run);
        }
    }

    private static IEnumerable<(string Name, VerticalSlashSelector Selector)> VerticalSlashSelectors() =>
    [
        ("v40 s12", new VerticalSlashSelector { Verticals = 40, Slashes = 12, SinkColumns = 4, LocalDiagonals = 8 }),
        ("v100 s30, 20 last queries", new VerticalSlashSelector { Verticals = 100, Slashes = 30, SinkColumns = 8, LocalDiagonals = 16, LastQueries = 20 }),
        ("defaults (v1000 s200: most of a short row)", new VerticalSlashSelector()),
    ];

    /// <summary>
    /// The device vertical-slash plan keeps the CPU selector's choice on the same bf16 inputs: the blocks the slashes
    /// cross and the vertical tokens outside them (the device drops tokens inside visited blocks, which count them
    /// anyway), causal or not, Sq &lt; Skv, Sq below the estimate's rows, GQA. At most 1% may differ (float sums
    /// at the top-k edge).
    /// </summary>
    [CudaFact]
    public void Should_choose_the_cpu_vertical_slash_plan()
    {
        foreach ((int sq, int skv, int h, int hkv, int d, bool causal) in new[] { (1000, 1000, 4, 2, 64, true), (300, 1100, 2, 1, 128, true), (777, 777, 2, 1, 80, false), (50, 600, 2, 2, 128, true) })
        {
            (TensorView<float> qf, TensorView<float> kf, _, _) = StructuredInputs.Generate(1, Math.Max(sq, skv), h, hkv, d, StructureOptions.Default with { Seed = sq + 7 });
            TensorView<BFloat16> q = Rows(qf, Math.Max(sq, skv) - sq, sq), k = Rows(kf, 0, skv);
            using DeviceTensor<BFloat16> dq = DeviceTensor<BFloat16>.FromHost(q), dk = DeviceTensor<BFloat16>.FromHost(k);
            foreach ((string name, VerticalSlashSelector selector) in VerticalSlashSelectors())
            {
                SparsityPlan cpu = selector.Plan(q, k, causal);
                using DeviceBlockPlan plan = CudaSelectors.Plan(selector, dq, dk, causal);
                Assert.True(plan.HasTokens);
                SparsityPlan gpu = plan.ToHostPlan();
                long differing = 0, total = 0;
                for (int hh = 0; hh < h; hh++)
                    for (int qb = 0; qb < cpu.Blocks!.QueryBlocks; qb++)
                    {
                        int[] cb = cpu.Blocks.Row(0, hh, qb, out _).ToArray(), gb = gpu.Blocks!.Row(0, hh, qb, out _).ToArray();
                        int[] ct = cpu.Tokens!.Row(0, hh, qb).ToArray().Where(t => Array.IndexOf(cb, t / selector.BlockSize) < 0).ToArray();
                        int[] gt = gpu.Tokens!.Row(0, hh, qb).ToArray();
                        Assert.True(gb.SequenceEqual(gb.Order()) && gt.SequenceEqual(gt.Order()), $"{name}: GPU row ({hh}, {qb}) not ascending");
                        Assert.DoesNotContain(gt, t => Array.IndexOf(gb, t / selector.BlockSize) >= 0);
                        differing += cb.Except(gb).Count() + gb.Except(cb).Count() + ct.Except(gt).Count() + gt.Except(ct).Count();
                        total += cb.Length + ct.Length;
                    }
                Assert.True(differing <= Math.Max(2, total / 100), $"{name} Sq={sq} Skv={skv} D={d} causal={causal}: {differing} of {total} blocks and tokens differ");
            }
        }
    }

    /// <summary>A device vertical-slash plan (blocks and gathered tokens) runs as its host copy on the float64 reference.</summary>
    [CudaFact]
    public void Should_execute_device_vertical_slash_plans_like_the_reference_of_their_host_copy()
    {
        foreach ((int s, int h, int hkv, int d) in new[] { (1000, 4, 2, 64), (513, 2, 1, 128), (700, 2, 2, 256) })
        {
            (TensorView<float> qf, TensorView<float> kf, _, _) = StructuredInputs.Generate(1, s, h, hkv, d);
            using DeviceTensor<BFloat16> dq = DeviceTensor<BFloat16>.FromHost(Rows(qf, 0, s)), dk = DeviceTensor<BFloat16>.FromHost(Rows(kf, 0, s));
            using DeviceBlockPlan plan = CudaSelectors.Plan(new VerticalSlashSelector { Verticals = 50, Slashes = 10, SinkColumns = 4, LocalDiagonals = 4 }, dq, dk, causal: true);
            Assert.InRange(plan.Density, 0.01, 0.99);
            Assert.True(plan.TokenCount > 0);
            SparsityPlan host = plan.ToHostPlan();
            void Run(TensorView<BFloat16> q, TensorView<BFloat16> k, TensorView<BFloat16> v, TensorView<BFloat16> o, TensorView<float> lse, AttentionOptions options) =>
                CudaAttentionTests.OnGpu(q, k, v, o, lse, options with { Plan = null }, plan);
            AttentionConformance.Check<BFloat16>(1, s, s, h, hkv, d, new AttentionOptions { Plan = host }, "cuda device-built vertical-slash plan", Run);
        }
    }

    [CudaFact]
    public void Should_name_selectors_without_a_gpu_version_and_reject_a_long_estimate()
    {
        using DeviceTensor<BFloat16> q = DeviceTensor<BFloat16>.Allocate(1, 256, 4, 64), k = DeviceTensor<BFloat16>.Allocate(1, 256, 2, 64);
        Assert.Contains("anchor", Assert.Throws<NotSupportedException>(() => CudaSelectors.Plan(new AnchorSelector(), q, k)).Message);
        using (DeviceTensor<BFloat16> q264 = DeviceTensor<BFloat16>.Allocate(1, 128, 2, 264), k264 = DeviceTensor<BFloat16>.Allocate(1, 128, 2, 264))
        {
            Assert.Contains("up to 256", Assert.Throws<NotSupportedException>(() => CudaSelectors.Plan(new SaleSelector(), q264, k264)).Message);
        }
        using (CudaSelectors.Plan(new SaleSelector(), q, k)) { }   // grows the workspace once
        long liveSale = DeviceMemory.LiveBuffers;
        using (CudaSelectors.Plan(new SaleSelector(), q, k)) { }
        Assert.Equal(liveSale, DeviceMemory.LiveBuffers);
        Assert.Contains("BlockSize / Stride in 8, 16, 32 or 64", Assert.Throws<NotSupportedException>(() => CudaSelectors.Plan(new XAttentionSelector { Stride = 1 }, q, k)).Message);
        using (DeviceTensor<BFloat16> q36 = DeviceTensor<BFloat16>.Allocate(1, 256, 4, 36), k36 = DeviceTensor<BFloat16>.Allocate(1, 256, 2, 36))
        {
            Assert.Contains("multiples of 8", Assert.Throws<NotSupportedException>(() => CudaSelectors.Plan(new XAttentionSelector(), q36, k36)).Message);
        }
        using (DeviceTensor<BFloat16> kBadDim = DeviceTensor<BFloat16>.Allocate(1, 256, 2, 32))
        {
            Assert.Contains("k must be", Assert.Throws<ArgumentException>(() => CudaSelectors.Plan(new XAttentionSelector(), q, kBadDim)).Message);
        }
        using (CudaSelectors.Plan(new XAttentionSelector(), q, k)) { }   // grows the workspace once
        long liveBefore = DeviceMemory.LiveBuffers;
        using (CudaSelectors.Plan(new XAttentionSelector(), q, k)) { }
        Assert.Equal(liveBefore, DeviceMemory.LiveBuffers);
        Assert.Contains("at most 64 last queries", Assert.Throws<NotSupportedException>(() => CudaSelectors.Plan(new VerticalSlashSelector { LastQueries = 65 }, q, k)).Message);
        using (CudaSelectors.Plan(new VerticalSlashSelector(), q, k)) { }   // grows the workspace once
        long live = DeviceMemory.LiveBuffers;
        using (DeviceBlockPlan plan = CudaSelectors.Plan(new VerticalSlashSelector(), q, k))
        {
            Assert.True(plan.HasTokens || plan.TokenCount == 0);
        }
        Assert.Equal(live, DeviceMemory.LiveBuffers);
    }

    [CudaFact]
    public void Should_reject_bad_input_and_free_what_it_allocates()
    {
        using DeviceTensor<BFloat16> q = DeviceTensor<BFloat16>.Allocate(1, 256, 4, 64), k = DeviceTensor<BFloat16>.Allocate(1, 256, 2, 64);
        using DeviceTensor<BFloat16> kBadDim = DeviceTensor<BFloat16>.Allocate(1, 256, 2, 32), kBadHeads = DeviceTensor<BFloat16>.Allocate(1, 256, 3, 64);
        var selector = new PooledBlockSelector();
        Assert.Contains("k must be", Assert.Throws<ArgumentException>(() => CudaSelectors.Plan(selector, q, kBadDim)).Message);
        Assert.Contains("k must be", Assert.Throws<ArgumentException>(() => CudaSelectors.Plan(selector, q, kBadHeads)).Message);
        using (CudaSelectors.Plan(selector, q, k)) { }   // grows the selector's workspace once
        long live = DeviceMemory.LiveBuffers;
        using (DeviceBlockPlan plan = CudaSelectors.Plan(selector, q, k))
        using (DeviceTensor<BFloat16> other = DeviceTensor<BFloat16>.Allocate(1, 384, 4, 64), o = DeviceTensor<BFloat16>.Allocate(1, 384, 4, 64), o256 = DeviceTensor<BFloat16>.Allocate(1, 256, 4, 64))
        {
            Assert.Contains("plan was built for", Assert.Throws<ArgumentException>(() => CudaAttention.Forward(other, other, other, o, plan)).Message);
            Assert.Throws<ArgumentException>(() => CudaAttention.Forward(q, k, k, o256, plan, new AttentionOptions { Mask = Mask.Causal }));
        }
        Assert.Equal(live, DeviceMemory.LiveBuffers);   // the plan's buffers and any temporaries of the failed calls are freed
    }

    /// <summary>Rows [start, start + count) of a float tensor, rounded to bf16.</summary>
    private static TensorView<BFloat16> Rows(TensorView<float> x, int start, int count)
    {
        int b = x.Dim(0), h = x.Dim(2), d = x.Dim(3);
        var data = new BFloat16[(long)b * count * h * d];
        int i = 0;
        for (int bb = 0; bb < b; bb++)
            for (int s = start; s < start + count; s++)
                for (int hh = 0; hh < h; hh++)
                    for (int c = 0; c < d; c++) data[i++] = (BFloat16)x[bb, s, hh, c];
        return new TensorView<BFloat16>(data, b, count, h, d);
    }
}
