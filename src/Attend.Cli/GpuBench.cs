using Attend.Cuda;
using Attend.Masks;
using Attend.Tensors;

namespace Attend.Cli;

/// <summary><c>attend bench --device cuda</c>: dense attention on the GPU timed with CUDA events (median of ≥ 20).</summary>
internal static class GpuBench
{
    /// <summary>H100 dense bf16 matrix rate, about 800 TFLOPS (MEASURING.md): a nominal ceiling, not measured here.</summary>
    public const double NominalPeakGflops = 800_000;

    public static List<BenchCommand.BenchRow> Run(BenchCommand.BenchPlan plan, Action<string> status, Action advance)
    {
        var rows = new List<BenchCommand.BenchRow>();
        foreach (int s in plan.Lengths)
            foreach (int d in plan.HeadDims)
                foreach (bool causal in plan.Causal)
                {
                    int h = plan.Heads > 0 ? plan.Heads : 32;
                    int hkv = plan.KvHeads > 0 ? plan.KvHeads : h;
                    status($"cuda dense S={s} D={d}{(causal ? " causal" : "")}");
                    rows.Add(plan.DType switch
                    {
                        DType.Float16 => Time<Half>(plan, s, d, h, hkv, causal),
                        DType.Float32 => Time<float>(plan, s, d, h, hkv, causal),
                        _ => Time<BFloat16>(plan, s, d, h, hkv, causal),
                    });
                    advance();
                }
        return rows;
    }

    private static BenchCommand.BenchRow Time<T>(BenchCommand.BenchPlan plan, int s, int d, int h, int hkv, bool causal) where T : unmanaged
    {
        int b = plan.Batch;
        using DeviceTensor<T> q = DeviceTensor<T>.FromHost(BenchCommand.RandomView<T>(1, b, s, h, d));
        using DeviceTensor<T> k = DeviceTensor<T>.FromHost(BenchCommand.RandomView<T>(2, b, s, hkv, d));
        using DeviceTensor<T> v = DeviceTensor<T>.FromHost(BenchCommand.RandomView<T>(3, b, s, hkv, d));
        using DeviceTensor<T> o = DeviceTensor<T>.Allocate(b, s, h, d);
        var options = new AttentionOptions { Causal = causal };
        List<double> times = CudaTimer.Measure(() => CudaAttention.Forward(q, k, v, o, options), Math.Max(20, plan.Reps));
        var shape = new AttentionShape(b, s, s, h, hkv, d, d);
        return new BenchCommand.BenchRow("gpu", causal ? "dense-causal" : "dense", plan.DType, b, h, hkv, s, d, causal, 0, KernelPath.Auto,
            times[times.Count / 2], times[0], times[^1], times.Count, causal ? shape.CausalFlops : shape.DenseFlops, NominalPeakGflops)
        { Backend = "cuda", Mask = causal ? "causal" : "full", Memory = MemoryProbe.Observe(() => CudaAttention.Forward(q, k, v, o, options)) };
    }

    /// <summary>
    /// <c>attend bench --suite masks --device cuda</c>: the CUDA part 2 bars, each against our dense kernel in the same
    /// process — random 128×128 block masks (density 0.1, diagonal kept, one mask for all heads as the peers script
    /// draws it) at S = 16384, and a causal sliding window of 1024 keys at S = 4096 and 16384 (B = 1, H = 32, D = 128,
    /// bf16). Plans are built before timing (as FlexAttention's create_block_mask is).
    /// </summary>
    public static List<BenchCommand.BenchRow> RunMasks(BenchCommand.BenchPlan plan, Action<string> status)
    {
        var rows = new List<BenchCommand.BenchRow>();
        const int h = 32, d = 128;
        foreach (int s in plan.Lengths)
        {
            using DeviceTensor<BFloat16> q = DeviceTensor<BFloat16>.FromHost(BenchCommand.RandomView<BFloat16>(1, 1, s, h, d));
            using DeviceTensor<BFloat16> k = DeviceTensor<BFloat16>.FromHost(BenchCommand.RandomView<BFloat16>(2, 1, s, h, d));
            using DeviceTensor<BFloat16> v = DeviceTensor<BFloat16>.FromHost(BenchCommand.RandomView<BFloat16>(3, 1, s, h, d));
            using DeviceTensor<BFloat16> o = DeviceTensor<BFloat16>.Allocate(1, s, h, d);
            var shape = new AttentionShape(1, s, s, h, h, d, d);
            int reps = Math.Max(20, plan.Reps);
            BenchCommand.BenchRow Row(string name, string mask, AttentionOptions options, double visited, double? baseline, string note)
            {
                status($"cuda {name} S={s}");
                List<double> t = CudaTimer.Measure(() => CudaAttention.Forward(q, k, v, o, options), reps);
                double ms = t[t.Count / 2];
                return new BenchCommand.BenchRow("gpu-masks", name, DType.BFloat16, 1, h, h, s, d, false, 0, KernelPath.Auto,
                    ms, t[0], t[^1], t.Count, shape.DenseFlops * visited, NominalPeakGflops)
                { Backend = "cuda", Mask = mask, Memory = MemoryProbe.Observe(() => CudaAttention.Forward(q, k, v, o, options)), Density = visited, SpeedupVsDense = baseline is { } b ? b / ms : 1, Note = note };
            }
            BenchCommand.BenchRow dense = Row("dense", "full", AttentionOptions.Default, 1, null, "baseline (non-causal)");
            rows.Add(dense);
            int blocks = (s + 127) / 128;
            var rng = new Random(0);
            var keep = new bool[blocks, blocks];
            for (int i = 0; i < blocks; i++)
                for (int j = 0; j < blocks; j++) keep[i, j] = i == j || rng.NextDouble() < 0.1;
            var random = BlockMask.FromBlocks(1, 1, s, s, 128, 128, (_, _, qb) => Enumerable.Range(0, blocks).Where(j => keep[qb, j]).Select(j => (j, BlockClass.Full)));
            var broadcast = BlockMask.FromBlocks(1, h, s, s, 128, 128, (_, _, qb) => Enumerable.Range(0, blocks).Where(j => keep[qb, j]).Select(j => (j, BlockClass.Full)));
            double visited = 1 - random.Sparsity;
            BenchCommand.BenchRow sparse = Row("random blocks d=0.1", "blocks:0.1", new AttentionOptions { Plan = broadcast }, visited, dense.MedianMs, "");
            rows.Add(sparse with { Note = $"bar: <= 0.13x dense time: {sparse.MedianMs / dense.MedianMs:F3}x {(sparse.MedianMs <= 0.13 * dense.MedianMs ? "met" : "MISSED")}; visited {visited:F3}" });
            BenchCommand.BenchRow causal = Row("dense causal", "causal", new AttentionOptions { Causal = true }, 0.5, dense.MedianMs, "");
            rows.Add(causal);
            double windowPairs = (1024.0 * s) - (1024.0 * 1023 / 2);
            rows.Add(Row("causal window 1024", "window:1024", new AttentionOptions { Mask = Mask.Causal & Mask.SlidingWindow(1023) }, windowPairs / ((double)s * s), dense.MedianMs,
                "mask planned per call (host, analytic) and its plan uploaded per call"));
            BlockMask windowPlan = BlockMask.Create(Mask.Causal & Mask.SlidingWindow(1023), 1, h, s, s, 128, 128);
            rows.Add(Row("causal window 1024 (plan)", "window:1024", new AttentionOptions { Plan = windowPlan }, windowPairs / ((double)s * s), dense.MedianMs, "plan built once, as FlexAttention's block mask"));
            // Plans the GPU runs through extra passes: a permuted (hash-sparse) plan — gather, plan, scatter — and a
            // centroid-compensated block plan — plan, block means, compensation — against the same plan without it.
            TensorView<BFloat16> qh = BenchCommand.RandomView<BFloat16>(1, 1, s, h, d), kh = BenchCommand.RandomView<BFloat16>(2, 1, s, h, d);
            SparsityPlan hashed = new Sparse.HashSparseSelector { Buckets = 8 }.Plan(qh, kh, causal: true);
            rows.Add(Row("hash-sparse 8 buckets (permuted plan)", "hash:8", new AttentionOptions { Plan = hashed }, Metrics.Density(hashed, causal: false), dense.MedianMs,
                "q/k/v gathered into bucket order, the plan run, o and LSE scattered back (plan built once)"));
            SparsityPlan pooled = new Sparse.PooledBlockSelector { Budget = Sparse.BlockBudget.TopK(8) }.Plan(qh, kh, causal: true);
            BenchCommand.BenchRow plain = Row("pooled top8 (plan)", "pooled:top8", new AttentionOptions { Plan = pooled }, Metrics.Density(pooled, causal: false), dense.MedianMs, "plan built once");
            rows.Add(plain);
            BenchCommand.BenchRow compensated = Row("pooled top8 + centroid", "pooled:top8+centroid", new AttentionOptions { Plan = pooled.WithCompensation(Compensation.Centroid) },
                Metrics.Density(pooled, causal: false), dense.MedianMs, "");
            rows.Add(compensated with { Note = $"compensation adds {compensated.MedianMs - plain.MedianMs:F3} ms (block means of K and V, one centroid per skipped block a row sees whole)" });
        }
        return rows;
    }

    /// <summary>
    /// <c>attend bench --suite decode --device cuda</c>: one query token per head, GQA 32/8 heads, D = 128, bf16, against
    /// 32768 and 131072 keys; bandwidth = K+V bytes / time (the issue's measure), CUDA events, median of ≥ 50.
    /// </summary>
    public static List<BenchCommand.BenchRow> RunDecode(BenchCommand.BenchPlan plan, Action<string> status)
    {
        var rows = new List<BenchCommand.BenchRow>();
        const int hq = 32, hkv = 8, d = 128;
        foreach (int skv in new[] { 32768, 131072 })
        {
            status($"cuda decode {hq}/{hkv} heads, {skv} keys");
            using DeviceTensor<BFloat16> q = DeviceTensor<BFloat16>.FromHost(new TensorView<BFloat16>(BenchCommand.RandomView<BFloat16>(1, 1, 1, hq, d).ToArray(), 1, hq, d));
            using DeviceTensor<BFloat16> k = DeviceTensor<BFloat16>.FromHost(BenchCommand.RandomView<BFloat16>(2, 1, skv, hkv, d));
            using DeviceTensor<BFloat16> v = DeviceTensor<BFloat16>.FromHost(BenchCommand.RandomView<BFloat16>(3, 1, skv, hkv, d));
            using DeviceTensor<BFloat16> o = DeviceTensor<BFloat16>.Allocate(1, hq, d);
            List<double> t = CudaTimer.Measure(() => CudaDecode.Forward(q, k, v, o), Math.Max(50, plan.Reps));
            double ms = t[t.Count / 2];
            double tbps = CudaDecode.BytesRead(1, skv, hkv, d) / (ms * 1e-3) / 1e12;
            rows.Add(new BenchCommand.BenchRow("gpu-decode", $"decode {hq}/{hkv} heads", DType.BFloat16, 1, hq, hkv, skv, d, false, 0, KernelPath.Auto,
                ms, t[0], t[^1], t.Count, 4.0 * hq * skv * d, NominalPeakGflops)
            { Backend = "cuda", Mask = "decode", Memory = MemoryProbe.Observe(() => CudaDecode.Forward(q, k, v, o)), Note = $"{tbps:F2} TB/s of K+V read (bar >= 2.8 at 131072 keys: {(skv == 131072 ? (tbps >= 2.8 ? "met" : "MISSED") : "n/a")})" });
            if (skv != 131072) continue;
            // The same keys from a paged cache (pages in shuffled pool order), read whole and under Quest at 1/16.
            status($"cuda paged decode {hq}/{hkv} heads, {skv} keys");
            int pages = skv / DevicePagedCache<BFloat16>.PageSize;
            using DevicePagedCache<BFloat16> cache = DevicePagedCache<BFloat16>.FromHost(BenchCommand.RandomView<BFloat16>(2, 1, skv, hkv, d), BenchCommand.RandomView<BFloat16>(3, 1, skv, hkv, d),
                [.. Enumerable.Range(0, pages).OrderBy(i => (i * 7919) % 104729)]);
            List<double> tp = CudaTimer.Measure(() => CudaPagedDecode.Forward(q, cache, o), Math.Max(50, plan.Reps));
            double pagedMs = tp[tp.Count / 2];
            rows.Add(new BenchCommand.BenchRow("gpu-decode", $"paged decode {hq}/{hkv} heads", DType.BFloat16, 1, hq, hkv, skv, d, false, 0, KernelPath.Auto,
                pagedMs, tp[0], tp[^1], tp.Count, 4.0 * hq * skv * d, NominalPeakGflops)
            { Backend = "cuda", Mask = "decode", Note = $"{CudaDecode.BytesRead(1, skv, hkv, d) / (pagedMs * 1e-3) / 1e12:F2} TB/s of K+V read through the page table ({ms / pagedMs:F2}x the contiguous cache)" });
            List<double> tq = CudaTimer.Measure(() => CudaPagedDecode.Forward(q, cache, o, questTokenBudget: skv / 16), Math.Max(50, plan.Reps));
            double questMs = tq[tq.Count / 2];
            rows.Add(new BenchCommand.BenchRow("gpu-decode", $"paged quest 1/16 {hq}/{hkv} heads", DType.BFloat16, 1, hq, hkv, skv, d, false, 0, KernelPath.Auto,
                questMs, tq[0], tq[^1], tq.Count, 4.0 * hq * skv / 16 * d, NominalPeakGflops)
            { Backend = "cuda", Mask = "decode", SpeedupVsDense = pagedMs / questMs, Note = $"page bounds, selection and decode of 1/16 of the pages on the device: {pagedMs / questMs:F1}x paged dense" });

            List<double> tl = CudaTimer.Measure(() => CudaPagedDecode.ForwardLandmark(q, cache, o, skv / 16), Math.Max(50, plan.Reps));
            double landmarkMs = tl[tl.Count / 2];
            rows.Add(new BenchCommand.BenchRow("gpu-decode", $"paged landmark 1/16 {hq}/{hkv} heads", DType.BFloat16, 1, hq, hkv, skv, d, false, 0, KernelPath.Auto,
                landmarkMs, tl[0], tl[^1], tl.Count, 4.0 * hq * skv / 16 * d, NominalPeakGflops)
            { Backend = "cuda", Mask = "decode", SpeedupVsDense = pagedMs / landmarkMs, Note = $"pages ranked by q·(mean key) on the device, 1/16 read: {pagedMs / landmarkMs:F1}x paged dense" });

            // H2O on the device: heavy pages 1/32 + recent 1/32 (the CPU suite's setting); the first step reads every page.
            using (var h2o = new DeviceHeavyHitters(skv / 32, skv / 32))
            {
                CudaPagedDecode.ForwardHeavyHitters(q, cache, o, h2o);
                List<double> th = CudaTimer.Measure(() => CudaPagedDecode.ForwardHeavyHitters(q, cache, o, h2o), Math.Max(50, plan.Reps));
                double h2oMs = th[th.Count / 2];
                rows.Add(new BenchCommand.BenchRow("gpu-decode", $"paged h2o 1/32+1/32 {hq}/{hkv} heads", DType.BFloat16, 1, hq, hkv, skv, d, false, 0, KernelPath.Auto,
                    h2oMs, th[0], th[^1], th.Count, 4.0 * hq * h2o.LastStepPages * 64 * d, NominalPeakGflops)
                { Backend = "cuda", Mask = "decode", SpeedupVsDense = pagedMs / h2oMs, Note = $"{h2o.LastStepPages} pages a kv head by accumulated attention (selection, eviction, decode and the mass feedback on the device): {pagedMs / h2oMs:F1}x paged dense" });
            }

            // StreamingLLM's pages through the page-list decode: 64 sink tokens and the last 1/16 of the keys.
            IReadOnlyList<int> streaming = cache.SinkAndRecentPages(64, skv / 16);
            List<double> ts = CudaTimer.Measure(() => CudaPagedDecode.Forward(q, cache, o, [streaming]), Math.Max(50, plan.Reps));
            double streamingMs = ts[ts.Count / 2];
            rows.Add(new BenchCommand.BenchRow("gpu-decode", $"paged streaming 64+1/16 {hq}/{hkv} heads", DType.BFloat16, 1, hq, hkv, skv, d, false, 0, KernelPath.Auto,
                streamingMs, ts[0], ts[^1], ts.Count, 4.0 * hq * streaming.Count * 64 * d, NominalPeakGflops)
            { Backend = "cuda", Mask = "decode", SpeedupVsDense = pagedMs / streamingMs, Note = $"{streaming.Count} host-listed pages (sink + recent) through the page-list decode: {pagedMs / streamingMs:F1}x paged dense" });

            // Generation: each step appends the new token's key and value (from the host) and decodes — the last 256
            // tokens of the same length, timed on the host over the whole loop (the appends' copies synchronize).
            status($"cuda generation loop: append + decode, {hq}/{hkv} heads, up to {skv} keys");
            const int steps = 256;
            TensorView<BFloat16> newK = BenchCommand.RandomView<BFloat16>(4, 1, steps, hkv, d), newV = BenchCommand.RandomView<BFloat16>(5, 1, steps, hkv, d);
            foreach (int? budget in new int?[] { null, skv / 16 })
            {
                using DevicePagedCache<BFloat16> growing = DevicePagedCache<BFloat16>.FromHost(BenchCommand.RandomView<BFloat16>(2, 1, skv - steps - 1, hkv, d),
                    BenchCommand.RandomView<BFloat16>(3, 1, skv - steps - 1, hkv, d), capacityTokens: skv);
                growing.Append(newK.Slice(1, 0, 1), newV.Slice(1, 0, 1));   // warm-up: the append's kernels load outside the timed loop
                CudaPagedDecode.Forward(q, growing, o, questTokenBudget: budget);
                o.ToHost();
                var sw = System.Diagnostics.Stopwatch.StartNew();
                for (int i = 0; i < steps; i++)
                {
                    growing.Append(newK.Slice(1, i, 1), newV.Slice(1, i, 1));
                    CudaPagedDecode.Forward(q, growing, o, questTokenBudget: budget);
                }
                o.ToHost();
                double stepMs = sw.Elapsed.TotalMilliseconds / steps;
                rows.Add(new BenchCommand.BenchRow("gpu-decode", budget is null ? $"append + paged decode {hq}/{hkv} heads" : $"append + paged quest 1/16 {hq}/{hkv} heads",
                    DType.BFloat16, 1, hq, hkv, skv, d, false, 0, KernelPath.Auto, stepMs, stepMs, stepMs, steps, 4.0 * hq * skv * d / (budget is null ? 1 : 16), NominalPeakGflops)
                {
                    Backend = "cuda", Mask = "decode",
                    Note = $"mean of {steps} generation steps (one token appended from the host, then decoded) ending at {skv} keys; the decode alone: {(budget is null ? pagedMs : questMs):F3} ms",
                });
            }
            rows.AddRange(BatchedDecode(plan, status, skv));
        }
        return rows;
    }

    /// <summary>
    /// A batch of 8 sequences of different lengths (2048·(2i + 1) tokens, <paramref name="total"/> in all, pages
    /// interleaved in one pool by round-robin appends) decoded in one launch, against the same 8 decoded one launch each.
    /// </summary>
    private static List<BenchCommand.BenchRow> BatchedDecode(BenchCommand.BenchPlan plan, Action<string> status, int total)
    {
        const int hq = 32, hkv = 8, d = 128, batch = 8;
        int[] lengths = [.. Enumerable.Range(0, batch).Select(i => total / (batch * batch) * (2 * i + 1))];
        status($"cuda batched paged decode: {batch} sequences, {lengths.Sum()} keys");
        const int steps = 64;
        using DevicePagedCache<BFloat16> cache = DevicePagedCache<BFloat16>.Create(hkv, d, lengths.Sum() + (batch * 2 * (steps + 64)), batch);
        for (int i = 1; i < batch; i++) cache.AddSequence();
        TensorView<BFloat16> k = BenchCommand.RandomView<BFloat16>(6, 1, lengths.Max(), hkv, d), v = BenchCommand.RandomView<BFloat16>(7, 1, lengths.Max(), hkv, d);
        for (int at = 0; at < lengths.Max(); at += 1024)
            for (int i = 0; i < batch; i++)
                if (at < lengths[i]) cache.Append(k.Slice(1, at, Math.Min(1024, lengths[i] - at)), v.Slice(1, at, Math.Min(1024, lengths[i] - at)), i);
        TensorView<BFloat16> q = BenchCommand.RandomView<BFloat16>(8, batch, 1, hq, d);
        using DeviceTensor<BFloat16> qs = DeviceTensor<BFloat16>.FromHost(new TensorView<BFloat16>(q.ToArray(), batch, hq, d)), o = DeviceTensor<BFloat16>.Allocate(batch, hq, d);
        var single = new DeviceTensor<BFloat16>[batch];
        try
        {
            for (int i = 0; i < batch; i++) single[i] = DeviceTensor<BFloat16>.FromHost(new TensorView<BFloat16>(q.ToArray().AsSpan(i * hq * d, hq * d).ToArray(), 1, hq, d));
            using DeviceTensor<BFloat16> o1 = DeviceTensor<BFloat16>.Allocate(1, hq, d);
            long bytes = CudaDecode.BytesRead(1, lengths.Sum(), hkv, d);
            List<double> tb = CudaTimer.Measure(() => CudaPagedDecode.Forward(qs, cache, o), Math.Max(50, plan.Reps));
            List<double> ts = CudaTimer.Measure(() =>
            {
                for (int i = 0; i < batch; i++) CudaPagedDecode.Forward(single[i], cache, o1, sequences: [i]);
            }, Math.Max(50, plan.Reps));
            List<double> tq = CudaTimer.Measure(() => CudaPagedDecode.Forward(qs, cache, o, questTokenBudget: 2048), Math.Max(50, plan.Reps));
            double batchedMs = tb[tb.Count / 2], separateMs = ts[ts.Count / 2], questMs = tq[tq.Count / 2];
            // Generation: each step appends one token to each of the 8 sequences (one batched call, or one call per
            // sequence), then decodes the batch; host-timed over the loop (the appends' copies synchronize).
            TensorView<BFloat16> newK = BenchCommand.RandomView<BFloat16>(9, batch, steps, hkv, d), newV = BenchCommand.RandomView<BFloat16>(10, batch, steps, hkv, d);
            int[] ids = [.. Enumerable.Range(0, batch)];
            double StepMs(bool together, int count)
            {
                o.ToHost();
                var sw = System.Diagnostics.Stopwatch.StartNew();
                for (int t = 0; t < count; t++)
                {
                    if (together) cache.Append(newK.Slice(1, t, 1), newV.Slice(1, t, 1), ids);
                    else
                        for (int i = 0; i < batch; i++) cache.Append(newK.Slice(0, i, 1).Slice(1, t, 1), newV.Slice(0, i, 1).Slice(1, t, 1), i);
                    CudaPagedDecode.Forward(qs, cache, o);
                }
                o.ToHost();
                return sw.Elapsed.TotalMilliseconds / count;
            }
            StepMs(false, 8);   // warm-up: first launches load their kernels
            StepMs(true, 8);
            double separateStep = StepMs(false, steps), batchedStep = StepMs(true, steps);
            string shape = $"{batch} sequences of {lengths[0]}..{lengths[^1]} keys";
            return
            [
                new BenchCommand.BenchRow("gpu-decode", $"batched paged decode {hq}/{hkv} heads", DType.BFloat16, batch, hq, hkv, lengths.Sum(), d, false, 0, KernelPath.Auto,
                    batchedMs, tb[0], tb[^1], tb.Count, 4.0 * hq * lengths.Sum() * d, NominalPeakGflops)
                {
                    Backend = "cuda", Mask = "decode", SpeedupVsDense = separateMs / batchedMs,
                    Note = $"{shape} in one launch: {bytes / (batchedMs * 1e-3) / 1e12:F2} TB/s of K+V read; {separateMs / batchedMs:F2}x the same {batch} decoded one launch each ({separateMs:F3} ms)",
                },
                new BenchCommand.BenchRow("gpu-decode", $"batched paged quest 2048 tokens {hq}/{hkv} heads", DType.BFloat16, batch, hq, hkv, lengths.Sum(), d, false, 0, KernelPath.Auto,
                    questMs, tq[0], tq[^1], tq.Count, 4.0 * hq * batch * 2048 * d, NominalPeakGflops)
                { Backend = "cuda", Mask = "decode", SpeedupVsDense = batchedMs / questMs, Note = $"{shape}, Quest with a 2048-token budget per sequence: {batchedMs / questMs:F1}x the batched dense decode" },
                new BenchCommand.BenchRow("gpu-decode", $"batched append + decode {hq}/{hkv} heads", DType.BFloat16, batch, hq, hkv, lengths.Sum(), d, false, 0, KernelPath.Auto,
                    batchedStep, batchedStep, batchedStep, steps, 4.0 * hq * lengths.Sum() * d, NominalPeakGflops)
                {
                    Backend = "cuda", Mask = "decode", SpeedupVsDense = separateStep / batchedStep,
                    Note = $"{shape}: a generation step (one token appended to each in one call, then the batch decoded) {batchedStep:F3} ms = {batch / batchedStep * 1e3:F0} tokens/s; appending sequence by sequence {separateStep:F3} ms",
                },
            ];
        }
        finally
        {
            foreach (DeviceTensor<BFloat16>? t in single) t?.Dispose();
        }
    }

    /// <summary>
    /// <c>attend bench --suite linear --device cuda</c>: causal chunked linear attention (elu+1, f32) on the GPU at
    /// S = 16384 and 65536 (B = 1, H = 8, D = 64, as the CPU suite), and our dense causal bf16 kernel at 65536 for scale.
    /// </summary>
    public static List<BenchCommand.BenchRow> RunLinear(BenchCommand.BenchPlan plan, Action<string> status)
    {
        var rows = new List<BenchCommand.BenchRow>();
        int h = plan.Heads > 0 ? plan.Heads : 8;
        const int d = 64;
        var options = new Linear.LinearOptions { FeatureMap = Linear.FeatureMap.EluPlusOne, Causal = true };
        double t16 = 0, t64 = 0;
        foreach (int s in new[] { 16384, 65536 })
        {
            status($"cuda linear elu+1 causal S={s}");
            using DeviceTensor<float> q = DeviceTensor<float>.FromHost(BenchCommand.RandomView<float>(1, 1, s, h, d));
            using DeviceTensor<float> k = DeviceTensor<float>.FromHost(BenchCommand.RandomView<float>(2, 1, s, h, d));
            using DeviceTensor<float> v = DeviceTensor<float>.FromHost(BenchCommand.RandomView<float>(3, 1, s, h, d));
            using DeviceTensor<float> o = DeviceTensor<float>.Allocate(1, s, h, d);
            List<double> times = CudaTimer.Measure(() => CudaLinear.Forward(q, k, v, o, options), Math.Max(10, plan.Reps));
            double ms = times[times.Count / 2];
            if (s == 16384) t16 = ms; else t64 = ms;
            rows.Add(new BenchCommand.BenchRow("gpu-linear", "linear elu+1 causal", DType.Float32, 1, h, h, s, d, true, 0, KernelPath.Auto,
                ms, times[0], times[^1], times.Count, 2.0 * h * s * ((32.0 * (d + d)) + (2.0 * d * d)), NominalPeakGflops)
            { Backend = "cuda", Note = s == 65536 ? $"time(65536)/time(16384) = {t64 / t16:F2}" : null });
        }
        status("cuda dense causal S=65536 (bf16)");
        const int sl = 65536;
        using DeviceTensor<BFloat16> qd = DeviceTensor<BFloat16>.FromHost(BenchCommand.RandomView<BFloat16>(4, 1, sl, h, d));
        using DeviceTensor<BFloat16> kd = DeviceTensor<BFloat16>.FromHost(BenchCommand.RandomView<BFloat16>(5, 1, sl, h, d));
        using DeviceTensor<BFloat16> vd = DeviceTensor<BFloat16>.FromHost(BenchCommand.RandomView<BFloat16>(6, 1, sl, h, d));
        using DeviceTensor<BFloat16> od = DeviceTensor<BFloat16>.Allocate(1, sl, h, d);
        List<double> dense = CudaTimer.Measure(() => CudaAttention.Forward(qd, kd, vd, od, new AttentionOptions { Causal = true }), Math.Max(10, plan.Reps));
        var shape = new AttentionShape(1, sl, sl, h, h, d, d);
        rows.Add(new BenchCommand.BenchRow("gpu-linear", "dense causal softmax bf16", DType.BFloat16, 1, h, h, sl, d, true, 0, KernelPath.Auto,
            dense[dense.Count / 2], dense[0], dense[^1], dense.Count, shape.CausalFlops, NominalPeakGflops)
        { Backend = "cuda", Mask = "causal", Note = $"dense bf16 / linear f32 time at 65536: {dense[dense.Count / 2] / t64:F2}" });
        return rows;
    }

    /// <summary>
    /// <c>attend bench --suite sparse --device cuda</c>: dynamic sparse prefill on the GPU (issue 7's bar: S = 131072,
    /// H = 32, D = 128, causal, bf16, the structured generator's default mix). Our dense causal kernel is the baseline
    /// and the reference: its LSE gives each selector's <b>recall</b> as the mean over (query, head) of
    /// exp(LSE_plan − LSE_dense) — the share of the dense softmax mass inside the plan — and its output the relative L2
    /// error. Per selector (plans built on the device by <see cref="CudaSelectors"/>): selection alone, the plan's
    /// execution alone, and both end to end (the row's time), CUDA events. cuDNN runs in the peers script
    /// (<c>torch_attention.py time --shape 1,S,32,128 --mask causal</c>) in the same device call.
    /// </summary>
    public static List<BenchCommand.BenchRow> RunSparse(BenchCommand.BenchPlan plan, Action<string> status)
    {
        var rows = new List<BenchCommand.BenchRow>();
        int h = plan.Heads > 0 ? plan.Heads : 32, hkv = plan.KvHeads > 0 ? plan.KvHeads : h;
        const int d = 128;
        IReadOnlyList<Sparse.ISparsitySelector> selectors = plan.Selectors ??
            [.. new[] { "pooled", "pooled:budget=p0.9", "pooled:budget=top32", "pooled:budget=top16", "pooled:budget=top8", "vertical-slash", "vertical-slash:v=500,s=50", "xattention", "xattention:stride=16", "sale" }.Select(Sparse.Selectors.ParseAny)];
        foreach (int s in plan.Lengths)
        {
            status($"structured inputs S={s}, H={h}");
            (TensorView<float> qf, TensorView<float> kf, TensorView<float> vf, _) = Sparse.StructuredInputs.Generate(1, s, h, hkv, d);
            using DeviceTensor<BFloat16> q = DeviceTensor<BFloat16>.FromHost(ToBf16(qf)), k = DeviceTensor<BFloat16>.FromHost(ToBf16(kf)), v = DeviceTensor<BFloat16>.FromHost(ToBf16(vf));
            qf = kf = vf = default;
            using DeviceTensor<BFloat16> o = DeviceTensor<BFloat16>.Allocate(1, s, h, d);
            using DeviceTensor<float> lse = DeviceTensor<float>.Allocate(1, s, h);
            var causal = new AttentionOptions { Causal = true };
            var shape = new AttentionShape(1, s, s, h, hkv, d, d);
            int reps = Math.Max(5, plan.Reps);

            status($"cuda dense causal S={s}");
            CudaAttention.Forward(q, k, v, o, causal, lse);
            var denseOut = new TensorView<BFloat16>(o.ToHost(), 1, s, h, d);
            var denseLse = new TensorView<float>(lse.ToHost(), 1, s, h);
            List<double> td = CudaTimer.Measure(() => CudaAttention.Forward(q, k, v, o, causal), reps);
            double denseMs = td[td.Count / 2];
            rows.Add(new BenchCommand.BenchRow("gpu-sparse", "dense causal", DType.BFloat16, 1, h, hkv, s, d, true, 0, KernelPath.Auto,
                denseMs, td[0], td[^1], td.Count, shape.CausalFlops, NominalPeakGflops)
            { Backend = "cuda", Mask = "causal", Density = 0.5, SpeedupVsDense = 1, RelativeL2 = 0, Cosine = 1, Recall = 1, SelectionMs = 0, Note = "baseline and reference (its LSE gives the recall)" });

            foreach (Sparse.ISparsitySelector any in selectors)
            {
                Sparse.ISparsitySelector selector = any;
                status($"cuda {selector.Name} S={s}");
                List<double> ts = CudaTimer.Measure(() => { using DeviceBlockPlan p = CudaSelectors.Plan(selector, q, k, causal: true); }, reps);
                using DeviceBlockPlan built = CudaSelectors.Plan(selector, q, k, causal: true);
                List<double> tx = CudaTimer.Measure(() => CudaAttention.Forward(q, k, v, o, built), reps);
                List<double> te = CudaTimer.Measure(() =>
                {
                    using DeviceBlockPlan p = CudaSelectors.Plan(selector, q, k, causal: true);
                    CudaAttention.Forward(q, k, v, o, p);
                }, reps);
                CudaAttention.Forward(q, k, v, o, built, lse: lse);
                var sparseOut = new TensorView<BFloat16>(o.ToHost(), 1, s, h, d);
                double l2 = Metrics.RelativeL2(sparseOut, denseOut), cosine = Metrics.Cosine(sparseOut, denseOut);
                double recall = Metrics.AttentionRecall(new TensorView<float>(lse.ToHost(), 1, s, h), denseLse);
                double ms = te[te.Count / 2], selectMs = ts[ts.Count / 2], execMs = tx[tx.Count / 2];
                double pairs = built.Density;   // of all (query block, key block) pairs, as the dense row's 0.5 for causal
                rows.Add(new BenchCommand.BenchRow("gpu-sparse", selector.Name, DType.BFloat16, 1, h, hkv, s, d, true, 0, KernelPath.Auto,
                    ms, te[0], te[^1], te.Count, shape.DenseFlops * pairs, NominalPeakGflops)
                {
                    Backend = "cuda", Density = pairs, SpeedupVsDense = denseMs / ms, SelectionMs = selectMs, RelativeL2 = l2, Cosine = cosine, Recall = recall,
                    Note = string.Create(System.Globalization.CultureInfo.InvariantCulture,
                        $"selection {selectMs:F2} ms + execution {execMs:F2} ms; end to end {denseMs / ms:F1}x our dense causal (compare cuDNN in the peers rows: bar >= 10x with recall >= 0.95)"),
                });
            }
        }
        return rows;
    }

    /// <summary>A [B, S, H, D] float tensor rounded to bf16, rows converted in parallel.</summary>
    private static TensorView<BFloat16> ToBf16(TensorView<float> x)
    {
        int b = x.Dim(0), s = x.Dim(1), h = x.Dim(2), d = x.Dim(3);
        var dst = new BFloat16[(long)b * s * h * d];
        Parallel.For(0, b * s, () => new float[d], (row, _, buffer) =>
        {
            for (int hh = 0; hh < h; hh++)
            {
                x.CopyRow(row / s, row % s, hh, buffer);
                long at = (((long)row * h) + hh) * d;
                for (int c = 0; c < d; c++) dst[at + c] = (BFloat16)buffer[c];
            }
            return buffer;
        }, _ => { });
        return new TensorView<BFloat16>(dst, b, s, h, d);
    }
}
