using System.Diagnostics;
using Attend.Masks;
using Attend.Tensors;

namespace Attend.Cli;

/// <summary>
/// <c>attend bench --suite masks</c>: the block-mask bars of the masks issue, each against a baseline measured in
/// the same run — plan construction time for long sequences, executor time vs block density (random block masks),
/// the all-Full plan vs plain dense, and a sliding window vs dense causal at S = 65536.
/// </summary>
internal static class MaskBench
{
    public const int Steps = 6;

    public static List<BenchCommand.BenchRow> Run(BenchCommand.BenchPlan plan, double peak, Action<string> status, Action advance)
    {
        var rows = new List<BenchCommand.BenchRow>();
        int threads = plan.Threads;

        status("plan: causal & window(4096) | sink(64), S=1M");
        int million = 1 << 20;
        rows.Add(PlanRow("plan causal&window(4096)|sink(64)", million, () =>
            BlockMask.Create((Mask.Causal & Mask.SlidingWindow(4096)) | Mask.Sink(64), 1, 1, million, million, 128, 128), plan.Reps, threads));
        advance();

        status("plan: neighborhood 256x256, kernel 13, dilation 2");
        Mask nbh = Mask.Neighborhood([256, 256], [13, 13], [2, 2]);
        rows.Add(PlanRow("plan neighborhood 256x256 k13 d2", 65536, () => BlockMask.Create(nbh, 1, 1, 65536, 65536, 128, 128), plan.Reps, threads));
        advance();

        // Executor vs density at S = 16384 (B=1, H=8, D=128 by default), random 128×128 block masks.
        int s = plan.Lengths.Length > 0 && plan.Lengths[0] != 1024 ? plan.Lengths[0] : 16384;
        int h = plan.Heads > 0 ? plan.Heads : 8, d = plan.HeadDims.Length > 0 && plan.HeadDims[0] != 64 ? plan.HeadDims[0] : 128;
        status($"executor: dense and random block masks, S={s}");
        TensorView<float> q = BenchCommand.RandomView<float>(1, 1, s, h, d), k = BenchCommand.RandomView<float>(2, 1, s, h, d), v = BenchCommand.RandomView<float>(3, 1, s, h, d);
        var o = new TensorView<float>(new float[q.ElementCount], 1, s, h, d);
        var tuning = new KernelTuning { Threads = threads, Path = plan.Path, BlockQ = 128 };
        var shape = AttentionShape.Of(q, k, v);
        BenchCommand.Timing dense = BenchCommand.Measure(() => Attention.Forward(q, k, v, o, AttentionOptions.Default, tuning: tuning), plan.Reps);
        rows.Add(Row("dense (no plan)", s, h, d, dense, shape.DenseFlops, peak, threads, 1.0, 1.0, "baseline of this block"));
        var full = new AttentionOptions { Plan = BlockMask.Create(Mask.Full, 1, h, s, s, 128, 128) };
        BenchCommand.Timing fullTime = BenchCommand.Measure(() => Attention.Forward(q, k, v, o, full, tuning: tuning), plan.Reps);
        rows.Add(Row("dense via all-Full plan", s, h, d, fullTime, shape.DenseFlops, peak, threads, 1.0, dense.MedianMs / fullTime.MedianMs, "bar: within 3% of dense"));
        advance();
        foreach (double density in new[] { 0.5, 0.25, 0.1, 0.05 })
        {
            BlockMask random = RandomBlocks(h, s, density, seed: 7);
            double visited = 1 - random.Sparsity;
            var options = new AttentionOptions { Plan = random };
            BenchCommand.Timing t = BenchCommand.Measure(() => Attention.Forward(q, k, v, o, options, tuning: tuning), plan.Reps);
            double bound = 1.25 * visited * dense.MedianMs + 0.05 * dense.MedianMs;
            rows.Add(Row($"random blocks d={density}", s, h, d, t, shape.DenseFlops * visited, peak, threads, visited, dense.MedianMs / t.MedianMs,
                $"bar: <= 1.25*d*dense + 5% = {bound:F0} ms: {(t.MedianMs <= bound ? "met" : "MISSED")}"));
        }
        advance();

        // Sliding window 1024 vs dense causal at S = 65536 (B=1, H=1, D=64).
        status("executor: window(1024) vs dense causal, S=65536");
        int sl = 65536, hl = 1, dl = 64;
        TensorView<float> ql = BenchCommand.RandomView<float>(4, 1, sl, hl, dl), kl = BenchCommand.RandomView<float>(5, 1, sl, hl, dl), vl = BenchCommand.RandomView<float>(6, 1, sl, hl, dl);
        var ol = new TensorView<float>(new float[ql.ElementCount], 1, sl, hl, dl);
        var shapeL = AttentionShape.Of(ql, kl, vl);
        var causal = new AttentionOptions { Causal = true };
        BenchCommand.Timing causalTime = BenchCommand.Measure(() => Attention.Forward(ql, kl, vl, ol, causal, tuning: tuning), Math.Min(plan.Reps, 3));
        rows.Add(Row("dense causal", sl, hl, dl, causalTime, shapeL.CausalFlops, peak, threads, 0.5, 1.0, "baseline of this block"));
        var window = new AttentionOptions { Mask = Mask.Causal & Mask.SlidingWindow(1023) };
        BenchCommand.Timing windowTime = BenchCommand.Measure(() => Attention.Forward(ql, kl, vl, ol, window, tuning: tuning), plan.Reps);
        double windowPairs = 1024.0 * sl - 1024.0 * 1023 / 2;
        rows.Add(Row("causal window 1024", sl, hl, dl, windowTime, 4.0 * hl * windowPairs * dl, peak, threads,
            windowPairs / ((double)sl * sl), causalTime.MedianMs / windowTime.MedianMs, $"bar: >= 10x dense causal: {(causalTime.MedianMs / windowTime.MedianMs >= 10 ? "met" : "MISSED")}"));
        advance();

        rows.AddRange(Patterns(plan, peak, status, tuning));
        advance();
        return rows;
    }

    /// <summary>
    /// The mask patterns of the Long-Context Attention Benchmark (full, causal, causal document, share-question,
    /// causal blockwise, prefix-LM causal, sliding window, global + sliding window, block-causal document) and ours
    /// (dilated, 2-D/3-D neighborhood, per-head strided shards), each timed against dense in the same run at S = 8192,
    /// B = 1, H = 4, D = 128 (qk-sparse and hash-sparse are content-dependent: they are the sparse suite's selectors).
    /// </summary>
    private static List<BenchCommand.BenchRow> Patterns(BenchCommand.BenchPlan plan, double peak, Action<string> status, KernelTuning tuning)
    {
        const int s = 8192, h = 4, d = 128;
        TensorView<float> q = BenchCommand.RandomView<float>(11, 1, s, h, d), k = BenchCommand.RandomView<float>(12, 1, s, h, d), v = BenchCommand.RandomView<float>(13, 1, s, h, d);
        var o = new TensorView<float>(new float[q.ElementCount], 1, s, h, d);
        var shape = AttentionShape.Of(q, k, v);
        var rng = new Random(3);
        var docs = new int[s];
        for (int i = 0, id = 0; i < s; id++)
        {
            int len = 256 + rng.Next(1792);
            for (int j = 0; j < len && i < s; j++) docs[i++] = id;
        }
        var question = new int[s];   // a 1024-token question (id 0) shared by four answers (ids 1..4)
        for (int i = 0; i < s; i++) question[i] = i < 1024 ? 0 : 1 + ((i - 1024) * 4 / (s - 1024));
        int[] globals = [0, 1, 2, 3, 2048, 4096, 6144];
        // Prefix-LM per document: the first quarter of each document is bidirectional (visible to the whole document).
        var prefixDocs = new int[s];
        for (int start = 0, end; start < s; start = end)
        {
            for (end = start; end < s && docs[end] == docs[start]; end++) { }
            for (int i = start; i < end; i++) prefixDocs[i] = i - start < (end - start) / 4 ? docs[i] : -1;
        }
        (string Name, Mask Mask)[] patterns =
        [
            ("pattern full", Mask.Full),
            ("pattern causal", Mask.Causal),
            ("pattern causal document", Mask.Causal & Mask.Document(docs)),
            ("pattern share-question", Mask.Causal & (Mask.Document(question) | Mask.Prefix(1024))),
            ("pattern causal blockwise (1024)", Mask.BlockCausal(1024)),
            ("pattern prefix-LM causal (2048)", Mask.Causal | Mask.Prefix(2048)),
            ("pattern prefix-LM document (1/4 of each)", (Mask.Causal & Mask.Document(docs)) | Mask.Document(docs, prefixDocs)),
            ("pattern sliding window 1024", Mask.Causal & Mask.SlidingWindow(1023)),
            ("pattern global + sliding window", (Mask.Causal & Mask.SlidingWindow(1023)) | Mask.GlobalTokens(globals)),
            ("pattern block-causal document (512)", Mask.BlockCausal(512) & Mask.Document(docs)),
            ("pattern dilated window 512 x4", Mask.DilatedWindow(512, 4)),
            ("pattern neighborhood 2-D 64x128 k13", Mask.Neighborhood([64, 128], [13, 13])),
            ("pattern neighborhood 3-D 16x16x32 k7", Mask.Neighborhood([16, 16, 32], [7, 7, 7])),
            ("pattern strided shards (S2)", Mask.StridedShards(128, 2, 4)),
        ];
        var rows = new List<BenchCommand.BenchRow>();
        status("patterns: dense baseline, S=8192");
        BenchCommand.Timing dense = BenchCommand.Measure(() => Attention.Forward(q, k, v, o, AttentionOptions.Default, tuning: tuning), plan.Reps);
        foreach ((string name, Mask mask) in patterns)
        {
            status(name);
            BlockMask blocks = BlockMask.Create(mask, 1, h, s, s, 128, 128);
            double visited = Metrics.Density(blocks, causal: false);
            var options = new AttentionOptions { Plan = blocks };
            BenchCommand.Timing t = BenchCommand.Measure(() => Attention.Forward(q, k, v, o, options, tuning: tuning), plan.Reps);
            rows.Add(Row(name, s, h, d, t, shape.DenseFlops * visited, peak, plan.Threads, visited, dense.MedianMs / t.MedianMs,
                $"density = computed share of all S² pairs; dense {dense.MedianMs:F0} ms in this run"));
        }

        // Content-dependent patterns (Pagliardini et al. arXiv:2306.01160): QK-sparse drops half of the queries and
        // keys of each head at random, hash-sparse keeps the pairs whose angular-LSH buckets agree. Both run as
        // bucket plans over a token permutation; building the plan is reported, not timed in the row.
        var drop = new Random(5);
        int[] keepQ = [.. Enumerable.Range(0, h * s).Select(_ => drop.Next(2) == 0 ? 0 : -1)];
        int[] keepK = [.. Enumerable.Range(0, h * s).Select(_ => drop.Next(2) == 0 ? 0 : -1)];
        var build = System.Diagnostics.Stopwatch.StartNew();
        Masks.SparsityPlan qkSparse = Sparse.BucketPlan.Create(1, h, h, s, s, keepQ, keepK, causal: true);
        double qkBuild = build.Elapsed.TotalMilliseconds;
        build.Restart();
        Masks.SparsityPlan hashSparse = new Sparse.HashSparseSelector { Buckets = 8 }.Plan(q, k, causal: true);
        double hashBuild = build.Elapsed.TotalMilliseconds;
        foreach ((string name, Masks.SparsityPlan sparsePlan, double buildMs) in new[] { ("pattern qk-sparse (drop 1/2)", qkSparse, qkBuild), ("pattern hash-sparse (8 buckets)", hashSparse, hashBuild) })
        {
            status(name);
            double visited = Metrics.Density(sparsePlan, causal: false);
            var options = new AttentionOptions { Plan = sparsePlan };
            BenchCommand.Timing t = BenchCommand.Measure(() => Attention.Forward(q, k, v, o, options, tuning: tuning), plan.Reps);
            rows.Add(Row(name, s, h, d, t, shape.DenseFlops * visited, peak, plan.Threads, visited, dense.MedianMs / t.MedianMs,
                $"permuted bucket plan (gather, run, scatter timed); plan built in {buildMs:F0} ms; dense {dense.MedianMs:F0} ms in this run"));
        }
        return rows;
    }

    /// <summary>Random block masks of a given density; the diagonal block is always kept (as the peers script does).</summary>
    internal static BlockMask RandomBlocks(int heads, int s, double density, int seed)
    {
        int blocks = (s + 127) / 128;
        var rng = new Random(seed);
        var keep = new bool[heads, blocks, blocks];
        for (int h = 0; h < heads; h++)
            for (int i = 0; i < blocks; i++)
                for (int j = 0; j < blocks; j++)
                    keep[h, i, j] = i == j || rng.NextDouble() < density;
        return BlockMask.FromBlocks(1, heads, s, s, 128, 128, (b, h, qb) =>
            Enumerable.Range(0, blocks).Where(j => keep[h, qb, j]).Select(j => (j, BlockClass.Full)));
    }

    private static BenchCommand.BenchRow PlanRow(string name, int s, Func<BlockMask> build, int reps, int threads)
    {
        BlockMask? last = null;
        BenchCommand.Timing t = BenchCommand.Measure(() => last = build(), reps);
        return new BenchCommand.BenchRow("masks", name, DType.Float32, 1, 1, 1, s, 0, false, 1, KernelPath.Auto, t.MedianMs, t.MinMs, t.MaxMs, t.Count, 0, 0)
        {
            Memory = t.Memory,
            Density = 1 - last!.Sparsity,
            Note = $"{last.VisitedBlocks} blocks; bar: <= 50 ms: {(t.MedianMs <= 50 ? "met" : "MISSED")}",
        };
    }

    private static BenchCommand.BenchRow Row(string name, int s, int h, int d, BenchCommand.Timing t, double flops, double peak, int threads,
        double density, double speedup, string note) =>
        new("masks", name, DType.Float32, 1, h, h, s, d, false, threads, KernelPath.Auto, t.MedianMs, t.MinMs, t.MaxMs, t.Count, flops, peak)
        {
            Memory = t.Memory,
            Density = density,
            SpeedupVsDense = speedup,
            Note = note,
        };
}
