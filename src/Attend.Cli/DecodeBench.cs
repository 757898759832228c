using Attend.Decode;
using Attend.Diagnostics;
using Attend.Tensors;

namespace Attend.Cli;

/// <summary>
/// <c>attend bench --suite decode</c>: one decode step (1 query token, 32 query heads / 8 kv heads, D = 128, f16 cache
/// of 131072 tokens by default) dense and with Quest at a 1/16 budget, against the stream-copy bandwidth measured in
/// the same run: the decoding issue's bars; then every other policy at the same budget. Relative errors vs dense are
/// reported (random keys: a worst case).
/// </summary>
internal static class DecodeBench
{
    public const int Steps = 9;

    public static List<BenchCommand.BenchRow> Run(BenchCommand.BenchPlan plan, double copyGBps, Action<string> status, Action advance)
    {
        int length = plan.Lengths.Length > 0 && plan.Lengths[0] != 1024 ? plan.Lengths[0] : 131072;
        int heads = plan.Heads > 0 ? plan.Heads : 32, kvHeads = plan.KvHeads > 0 ? plan.KvHeads : 8, d = 128;
        status($"filling a {length}-token f16 cache");
        var cache = new KvCache(1, kvHeads, d, storage: DType.Float16, pageSize: 64);
        int seq = cache.AddSequence();
        const int piece = 4096;
        for (int t0 = 0; t0 < length; t0 += piece)
        {
            int n = Math.Min(piece, length - t0);
            cache.Append(seq, 0, new TensorView<float>(BenchCommand.RandomView<float>(t0 + 1, 1, n, kvHeads, d).ToArray(), n, kvHeads, d),
                new TensorView<float>(BenchCommand.RandomView<float>(t0 + 2, 1, n, kvHeads, d).ToArray(), n, kvHeads, d));
        }
        var q = new TensorView<float>(BenchCommand.RandomView<float>(7, 1, 1, heads, d).ToArray(), 1, heads, d);
        var dense = new TensorView<float>(new float[heads * d], 1, heads, d);
        var tuning = new KernelTuning { Threads = plan.Threads };
        double bytes = 2.0 * length * kvHeads * d * DTypes.SizeOf(DType.Float16);
        var rows = new List<BenchCommand.BenchRow>();

        status("dense decode step");
        BenchCommand.Timing t = BenchCommand.Measure(() => DecodeAttention.Forward(q, cache, seq, 0, dense, tuning: tuning), plan.Reps);
        double denseMs = t.MedianMs;
        double gbps = bytes / (denseMs * 1e-3) / 1e9;
        rows.Add(new BenchCommand.BenchRow("decode", "dense decode f16", DType.Float16, 1, heads, kvHeads, length, d, false, plan.Threads, KernelPath.Auto,
            denseMs, t.MinMs, t.MaxMs, t.Count, 4.0 * heads * length * d, 0)
        {
            Memory = t.Memory,
            SpeedupVsDense = 1.0,
            Note = $"{gbps:F1} GB/s of K+V read = {100 * gbps / copyGBps:F0}% of the copy bandwidth measured now ({copyGBps:F1} GB/s); bar >= 70%: {(gbps >= 0.7 * copyGBps ? "met" : "MISSED")}",
        });
        advance();

        status("Quest 1/16 decode step");
        var quest = new DecodeOptions { Policy = new QuestPolicy(length / 16) };
        var sparse = new TensorView<float>(new float[heads * d], 1, heads, d);
        BenchCommand.Timing tq = BenchCommand.Measure(() => DecodeAttention.Forward(q, cache, seq, 0, sparse, quest, tuning: tuning), plan.Reps);
        double questMs = tq.MedianMs;
        float[] a = dense.ToArray(), b = sparse.ToArray();
        double err = Math.Sqrt(a.Zip(b).Sum(p => (double)(p.First - p.Second) * (p.First - p.Second)) / a.Sum(x => (double)x * x));
        rows.Add(new BenchCommand.BenchRow("decode", "Quest 1/16", DType.Float16, 1, heads, kvHeads, length, d, false, plan.Threads, KernelPath.Auto,
            questMs, tq.MinMs, tq.MaxMs, tq.Count, 4.0 * heads * length / 16 * d, 0)
        {
            Memory = tq.Memory,
            Density = 1.0 / 16,
            SpeedupVsDense = denseMs / questMs,
            Note = $"{denseMs / questMs:F1}x dense (bar >= 8x: {(denseMs / questMs >= 8 ? "met" : "MISSED")}); relative L2 error {err:F3} on random keys (recall bar needs structured inputs: not measured yet)",
        });
        advance();

        // Every other policy at the same 1/16 budget, timed on the same cache (stateful ones start fresh per row; a
        // step of theirs is timed after their first, full, step). Random keys: errors are a worst case.
        int budget = length / 16;
        foreach ((string name, Func<IKvSelectionPolicy> make) in new (string, Func<IKvSelectionPolicy>)[]
        {
            ("StreamingLLM 1/16", () => new StreamingPolicy(64, budget - 64)),
            ("Landmark 1/16", () => new LandmarkPolicy(budget)),
            ("H2O 1/32 + 1/32", () => new HeavyHitterPolicy(budget / 2, budget / 2)),
            ("Recycled every 8, 1/16", () => new RecycledPolicy(8, budget)),
            ("TokenSelect 1/16 of the tokens", () => new TokenSelectPolicy(budget)),
            ("Retrieval 1/16, scan 1/8", () => new RetrievalPolicy(budget, 2 * budget)),
            ("Retention 1/32 + chunks of 1/32", () => new RetentionPolicy(budget / 2, budget / 2)),
        })
        {
            status($"{name} decode step");
            var options = new DecodeOptions { Policy = make() };
            DecodeAttention.Forward(q, cache, seq, 0, sparse, options, tuning: tuning);     // first step: indexes, full reads
            BenchCommand.Timing tp = BenchCommand.Measure(() => DecodeAttention.Forward(q, cache, seq, 0, sparse, options, tuning: tuning), plan.Reps);
            float[] c = sparse.ToArray();
            double e = Math.Sqrt(a.Zip(c).Sum(p => (double)(p.First - p.Second) * (p.First - p.Second)) / a.Sum(x => (double)x * x));
            rows.Add(new BenchCommand.BenchRow("decode", name, DType.Float16, 1, heads, kvHeads, length, d, false, plan.Threads, KernelPath.Auto,
                tp.MedianMs, tp.MinMs, tp.MaxMs, tp.Count, 4.0 * heads * budget * d, 0)
            {
                Memory = tp.Memory,
                Density = 1.0 / 16,
                SpeedupVsDense = denseMs / tp.MedianMs,
                Note = $"{denseMs / tp.MedianMs:F1}x dense; relative L2 error {e:F3} on random keys",
            });
            advance();
        }
        return rows;
    }

    /// <summary>
    /// <c>attend bench --suite decode-offload</c>: the decoding issue's offload bar — a 1,048,576-token f16 cache (8 kv
    /// heads, D = 128, pages of 64: 4.3 GB of keys and values) under a 2 GiB resident budget, the rest in a file tier
    /// (in the temp folder, deleted after), then a 64-step decode loop (32 query heads, one appended token per step) with
    /// Quest reading 1/64 of the cache; time per step and pages read from the file tier.
    /// </summary>
    public static List<BenchCommand.BenchRow> RunOffload(BenchCommand.BenchPlan plan, Action<string> status)
    {
        int length = plan.Lengths.Length > 0 && plan.Lengths[0] != 1024 ? plan.Lengths[0] : 1 << 20;
        const int heads = 32, kvHeads = 8, d = 128, steps = 64;
        const long budget = 2L << 30;
        string file = Path.Combine(Path.GetTempPath(), $"attend-offload-{Environment.ProcessId}.bin");
        var cache = new KvCache(1, kvHeads, d, storage: DType.Float16, pageSize: 64, offload: new KvOffload(file, budget, CachedPages: 512));
        int seq = cache.AddSequence();
        var fill = System.Diagnostics.Stopwatch.StartNew();
        const int piece = 4096;
        float[] keys = BenchCommand.RandomView<float>(11, 1, piece, kvHeads, d).ToArray(), values = BenchCommand.RandomView<float>(12, 1, piece, kvHeads, d).ToArray();
        for (int t0 = 0; t0 < length; t0 += piece)
        {
            if (t0 % (64 * piece) == 0) status($"filling the cache: {t0} of {length} tokens ({cache.OffloadStats.Offloaded} pages in the file tier)");
            int n = Math.Min(piece, length - t0);
            // Rotate the random rows so pages differ without drawing 2G fresh numbers.
            int shift = (t0 / piece) % piece;
            float[] k = [.. keys.AsSpan(shift * kvHeads * d), .. keys.AsSpan(0, shift * kvHeads * d)];
            cache.Append(seq, 0, new TensorView<float>(k[..(n * kvHeads * d)], n, kvHeads, d), new TensorView<float>(values[..(n * kvHeads * d)], n, kvHeads, d));
        }
        double fillSeconds = fill.Elapsed.TotalSeconds;
        (long offloaded, long loads0, long hits0) = cache.OffloadStats;
        var q = new TensorView<float>(BenchCommand.RandomView<float>(7, 1, 1, heads, d).ToArray(), 1, heads, d);
        var o = new TensorView<float>(new float[heads * d], 1, heads, d);
        var options = new DecodeOptions { Policy = new QuestPolicy(length / 64) };
        var tuning = new KernelTuning { Threads = plan.Threads };
        var times = new List<double>();
        long pagesRead = 0;
        for (int step = 0; step < steps; step++)
        {
            status($"offloaded decode step {step + 1}/{steps}");
            cache.Append(seq, 0, new TensorView<float>(keys[..(kvHeads * d)], 1, kvHeads, d), new TensorView<float>(values[..(kvHeads * d)], 1, kvHeads, d));
            var sw = System.Diagnostics.Stopwatch.StartNew();
            pagesRead += DecodeAttention.Forward(q, cache, seq, 0, o, options, tuning: tuning);
            times.Add(sw.Elapsed.TotalMilliseconds);
        }
        (_, long loads, long hits) = cache.OffloadStats;
        times.Sort();
        return
        [
            new BenchCommand.BenchRow("decode-offload", "Quest 1/64, file tier", DType.Float16, 1, heads, kvHeads, length, d, false, plan.Threads, KernelPath.Auto,
                times[times.Count / 2], times[0], times[^1], times.Count, 4.0 * heads * (length / 64.0) * d, 0)
            {
                Density = 1.0 / 64,
                Note = $"{cache.MemoryBytes / 1e9:F2} GB cache, {cache.ResidentBytes / 1e9:F2} GB resident (budget {budget / 1e9:F2}); {offloaded} pages in the file tier; "
                    + $"{steps} steps: {loads - loads0} pages loaded from the file, {hits - hits0} served by its page cache, {pagesRead / (double)steps:F0} page reads per step (all kv heads); fill {fillSeconds:F0} s",
            },
        ];
    }
}
