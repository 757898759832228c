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
    public const int Steps = 20;      // 10 timed rows, 10 structured-loop rows

    public static List<BenchCommand.BenchRow> Run(BenchCommand.BenchPlan plan, double copyGBps, Action<string> status, Action advance)
    {
        (int length, int heads, int kvHeads, int d) = Shape(plan);
        (KvCache cache, int seq) = Fill(length, kvHeads, d, status);
        var q = new TensorView<float>(BenchCommand.RandomView<float>(7, 1, 1, heads, d).ToArray(), 1, heads, d);
        var dense = new TensorView<float>(new float[heads * d], 1, heads, d);
        var tuning = new KernelTuning { Threads = plan.Threads };
        var rows = new List<BenchCommand.BenchRow>();
        (BenchCommand.BenchRow denseRow, double denseMs) = DenseStep(plan, copyGBps, cache, seq, q, dense, status);
        rows.Add(denseRow);
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
            Note = $"{denseMs / questMs:F1}x dense (bar >= 8x: {(denseMs / questMs >= 8 ? "met" : "MISSED")}); relative L2 error {err:F3} on random keys (recall: see the structured rows)",
        });
        advance();

        // Every other policy at the same 1/16 budget, timed on the same cache (stateful ones start fresh per row; a
        // step of theirs is timed after their first, full, step). Random keys: errors are a worst case.
        int budget = length / 16;
        foreach ((string name, Func<IKvSelectionPolicy> make) in OtherPolicies(budget))
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
        rows.AddRange(RunStructured(plan, length, status, advance));
        return rows;
    }

    /// <summary>
    /// The decode suite's structured half: q/k/v from <see cref="Sparse.StructuredInputs"/> (default mix: sinks, local
    /// band, vertical stripes, slashes, needles, clusters; 32/8 heads, D = 128) fill an f16 cache of
    /// <paramref name="length"/> − <see cref="GenerationSteps"/> tokens; then a generation loop appends token t and
    /// decodes its query, <see cref="GenerationSteps"/> times, for dense and every policy at a 1/16 budget. Per policy:
    /// mean and worst per-step attention-mass recall (share of the dense softmax mass on what the step read, mean over
    /// the query heads), mean relative L2 error against dense decoding, and time per step.
    /// </summary>
    public static List<BenchCommand.BenchRow> RunStructured(BenchCommand.BenchPlan plan, int length, Action<string> status, Action advance)
    {
        const int heads = 32, kvHeads = 8, d = 128, group = heads / kvHeads;
        status($"generating {length} structured tokens (32/8 heads, D = {d})");
        (TensorView<float> q, TensorView<float> k, TensorView<float> v, _) = Sparse.StructuredInputs.Generate(1, length, heads, kvHeads, d);
        float[] qa = q.ToArray(), ka = k.ToArray(), va = v.ToArray();
        // Keys as stored (f16-rounded) for the recall's dense softmax.
        float[] kStored = [.. ka.Select(x => (float)(Half)x)];
        int prefix = length - GenerationSteps, budget = length / 16;
        float scale = 1f / MathF.Sqrt(d);
        var tuning = new KernelTuning { Threads = plan.Threads };
        (string Name, Func<IKvSelectionPolicy?> Make)[] policies =
            [("dense", () => null), ("Quest 1/16", () => new QuestPolicy(budget)), .. OtherPolicies(budget).Select(p => (p.Name, (Func<IKvSelectionPolicy?>)p.Make))];
        // The dense softmax of every step's query heads (computed once, shared by the policies): p[step][head][token].
        status("dense softmax of the structured steps (for recall)");
        var probabilities = new float[GenerationSteps][][];
        for (int step = 0; step < GenerationSteps; step++)
        {
            int t = prefix + step;
            probabilities[step] = new float[heads][];
            Parallel.For(0, heads, head =>
            {
                ReadOnlySpan<float> qh = qa.AsSpan(((t * heads) + head) * d, d);
                var scores = new double[t + 1];
                double max = double.NegativeInfinity, total = 0;
                for (int j = 0; j <= t; j++) max = Math.Max(max, scores[j] = scale * Linear.Vectors.Dot(qh, kStored.AsSpan(((j * kvHeads) + (head / group)) * d, d)));
                for (int j = 0; j <= t; j++) total += scores[j] = Math.Exp(scores[j] - max);
                var p = new float[t + 1];
                for (int j = 0; j <= t; j++) p[j] = (float)(scores[j] / total);
                probabilities[step][head] = p;
            });
        }
        var rows = new List<BenchCommand.BenchRow>();
        // The best any page policy could do at the budget: per step and kv head, the pages holding the most dense mass
        // (summed over the group's query heads). Below 0.95 no page-level selection can meet the recall bar. Also for
        // Quest's own page size, 16 tokens (whose min/max summaries would cost 1/8 of the f16 data per step here).
        foreach (int pageSize in new[] { 64, 16 })
        {
            var oracle = new List<double>();
            int keep = budget / pageSize;
            for (int step = 0; step < GenerationSteps; step++)
            {
                double recall = 0;
                for (int hk = 0; hk < kvHeads; hk++)
                {
                    int tokens = probabilities[step][hk * group].Length, pageCount = (tokens + pageSize - 1) / pageSize;
                    var mass = new double[pageCount];
                    for (int g = 0; g < group; g++)
                    {
                        float[] p = probabilities[step][(hk * group) + g];
                        for (int j = 0; j < p.Length; j++) mass[j / pageSize] += p[j];
                    }
                    recall += mass.OrderDescending().Take(keep).Sum() / heads;
                }
                oracle.Add(recall);
            }
            rows.Add(new BenchCommand.BenchRow("decode", $"structured: oracle pages of {pageSize}, 1/16", DType.Float16, 1, heads, kvHeads, length, d, false, plan.Threads, KernelPath.Auto,
                0, 0, 0, GenerationSteps, 0, 0)
            {
                Density = 1.0 / 16,
                Recall = oracle.Average(),
                Note = $"upper bound of page selection at 1/16: the {keep} pages of {pageSize} tokens with the most dense mass per kv head; recall mean {oracle.Average():F3}, worst step {oracle.Min():F3}",
            });
        }
        var denseOut = new float[GenerationSteps][];
        double denseMs = 0;
        foreach ((string name, Func<IKvSelectionPolicy?> make) in policies)
        {
            status($"structured generation loop: {name}");
            var cache = new KvCache(1, kvHeads, d, storage: DType.Float16, pageSize: 64);
            int seq = cache.AddSequence();
            cache.Append(seq, 0, new TensorView<float>(ka[..(prefix * kvHeads * d)], prefix, kvHeads, d), new TensorView<float>(va[..(prefix * kvHeads * d)], prefix, kvHeads, d));
            IKvSelectionPolicy? policy = make();
            var tokenRead = new HashSet<int>[kvHeads];
            var pagesRead = new IReadOnlyList<int>[kvHeads];
            IKvSelectionPolicy? recorded = policy is ITokenSelectionPolicy tokens ? new RecordingTokens(tokens, tokenRead) : policy;
            var o = new TensorView<float>(new float[heads * d], 1, heads, d);
            var recalls = new List<double>();
            // The first step is timed apart: a stateful policy builds its state there (RetrievalAttention's k-means index:
            // ≈ 15 s at 131072 tokens), which averaged into the per-step time hid the steady step behind it.
            double error = 0, ms = 0, firstMs = 0;
            for (int step = 0; step < GenerationSteps; step++)
            {
                int t = prefix + step;
                cache.Append(seq, 0, new TensorView<float>(ka.AsSpan(t * kvHeads * d, kvHeads * d).ToArray(), 1, kvHeads, d),
                    new TensorView<float>(va.AsSpan(t * kvHeads * d, kvHeads * d).ToArray(), 1, kvHeads, d));
                var qt = new TensorView<float>(qa.AsSpan(t * heads * d, heads * d).ToArray(), 1, heads, d);
                var options = new DecodeOptions { Policy = recorded, OnPagesSelected = (hk, p) => pagesRead[hk] = p };
                var sw = System.Diagnostics.Stopwatch.StartNew();
                DecodeAttention.Forward(qt, cache, seq, 0, o, options, tuning: tuning);
                if (step == 0) firstMs = sw.Elapsed.TotalMilliseconds;
                else ms += sw.Elapsed.TotalMilliseconds / (GenerationSteps - 1);
                double recall = 0;
                for (int head = 0; head < heads; head++)
                {
                    int hk = head / group;
                    float[] p = probabilities[step][head];
                    double kept = 0;
                    if (policy is null) kept = 1;
                    else if (policy is ITokenSelectionPolicy) foreach (int token in tokenRead[hk]) kept += p[token];
                    else foreach (int page in pagesRead[hk]) for (int j = page * 64; j < Math.Min(p.Length, (page + 1) * 64); j++) kept += p[j];
                    recall += kept / heads;
                }
                recalls.Add(recall);
                float[] result = o.ToArray();
                if (policy is null) denseOut[step] = result;
                else
                {
                    double num = 0, den = 0;
                    for (int i = 0; i < result.Length; i++)
                    {
                        num += (result[i] - denseOut[step][i]) * (double)(result[i] - denseOut[step][i]);
                        den += denseOut[step][i] * (double)denseOut[step][i];
                    }
                    error += Math.Sqrt(num / den) / GenerationSteps;
                }
            }
            if (policy is null) denseMs = ms;
            double meanRecall = recalls.Average(), worst = recalls.Min();
            string bar = name.StartsWith("Quest", StringComparison.Ordinal) ? $"; bar recall >= 0.95: {(meanRecall >= 0.95 ? "met" : "MISSED")}" : "";
            rows.Add(new BenchCommand.BenchRow("decode", $"structured: {name}", DType.Float16, 1, heads, kvHeads, length, d, false, plan.Threads, KernelPath.Auto,
                ms, ms, ms, GenerationSteps - 1, 4.0 * heads * length * d, 0)
            {
                Density = policy is null ? 1 : 1.0 / 16,
                Recall = policy is null ? null : meanRecall,
                RelativeL2 = policy is null ? null : error,
                SpeedupVsDense = denseMs / ms,
                Note = (policy is null ? $"{GenerationSteps}-step generation loop on structured inputs (one call per step: timings noisy)"
                    : $"recall mean {meanRecall:F3}, worst step {worst:F3}; relative L2 {error:F4}; {denseMs / ms:F1}x dense per step{bar}")
                    + $"; time: mean of steps 2–{GenerationSteps}, first step {firstMs:F1} ms",
            });
            advance();
        }
        return rows;
    }

    /// <summary>Every policy besides dense and Quest at a budget of 1/16 of the cache (<paramref name="budget"/> tokens).</summary>
    private static (string Name, Func<IKvSelectionPolicy> Make)[] OtherPolicies(int budget) =>
    [
        ("StreamingLLM 1/16", () => new StreamingPolicy(64, budget - 64)),
        ("Landmark 1/16", () => new LandmarkPolicy(budget)),
        ("H2O 1/32 + 1/32", () => new HeavyHitterPolicy(budget / 2, budget / 2)),
        ("H2O 1/32 + 1/32, 1/4 of the kv heads pruned after 4 steps", () => new HeavyHitterPolicy(budget / 2, budget / 2, 0.25, 4)),
        ("Recycled every 8, 1/16", () => new RecycledPolicy(8, budget)),
        ("TokenSelect 1/16 of the tokens", () => new TokenSelectPolicy(budget)),
        ("Retrieval 1/16, scan 1/8", () => new RetrievalPolicy(budget, 2 * budget)),
        ("Retention 1/32 + chunks of 1/32", () => new RetentionPolicy(budget / 2, budget / 2)),
    ];

    /// <summary>Steps of the structured generation loop.</summary>
    public const int GenerationSteps = 16;

    /// <summary>Passes a token policy's choices through, keeping them per kv head for the recall measurement.</summary>
    internal sealed class RecordingTokens(ITokenSelectionPolicy inner, HashSet<int>[] record) : ITokenSelectionPolicy
    {
        public IReadOnlyList<int> SelectTokens(KvCache cache, int sequence, int layer, int kvHead, ReadOnlySpan<float> queries, int rows)
        {
            IReadOnlyList<int> tokens = inner.SelectTokens(cache, sequence, layer, kvHead, queries, rows);
            record[kvHead] = [.. tokens];
            return tokens;
        }

        public IReadOnlyList<int> SelectPages(KvCache cache, int sequence, int layer, int kvHead, ReadOnlySpan<float> queries, int rows) =>
            inner.SelectPages(cache, sequence, layer, kvHead, queries, rows);
    }

    /// <summary>
    /// The dense decode step of the decoding issue's bandwidth bar alone (<c>attend bench --suite peak</c> runs it after
    /// the FMA and copy probes): the same cache and measurement as the decode suite's first row.
    /// </summary>
    public static List<BenchCommand.BenchRow> RunPeak(BenchCommand.BenchPlan plan, double copyGBps, Action<string> status)
    {
        (int length, int heads, int kvHeads, int d) = Shape(plan);
        (KvCache cache, int seq) = Fill(length, kvHeads, d, status);
        var q = new TensorView<float>(BenchCommand.RandomView<float>(7, 1, 1, heads, d).ToArray(), 1, heads, d);
        return [DenseStep(plan, copyGBps, cache, seq, q, new TensorView<float>(new float[heads * d], 1, heads, d), status).Row];
    }

    private static (int Length, int Heads, int KvHeads, int D) Shape(BenchCommand.BenchPlan plan) =>
        (plan.Lengths.Length > 0 && plan.Lengths[0] != 1024 ? plan.Lengths[0] : 131072, plan.Heads > 0 ? plan.Heads : 32, plan.KvHeads > 0 ? plan.KvHeads : 8, 128);

    /// <summary>An f16 cache of <paramref name="length"/> random tokens (pages of 64).</summary>
    private static (KvCache Cache, int Sequence) Fill(int length, int kvHeads, int d, Action<string> status)
    {
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
        return (cache, seq);
    }

    /// <summary>The dense step's row (median time, K+V bandwidth against the copy, and 9 rounds pairing a copy with a step).</summary>
    private static (BenchCommand.BenchRow Row, double MedianMs) DenseStep(BenchCommand.BenchPlan plan, double copyGBps, KvCache cache, int seq,
        TensorView<float> q, TensorView<float> output, Action<string> status)
    {
        int length = cache.Length(seq, 0), kvHeads = cache.KvHeads, d = cache.HeadDim, heads = q.Dim(1);
        var tuning = new KernelTuning { Threads = plan.Threads };
        double bytes = 2.0 * length * kvHeads * d * DTypes.SizeOf(DType.Float16);
        status("dense decode step");
        BenchCommand.Timing t = BenchCommand.Measure(() => DecodeAttention.Forward(q, cache, seq, 0, output, tuning: tuning), plan.Reps);
        double denseMs = t.MedianMs;
        double gbps = bytes / (denseMs * 1e-3) / 1e9;
        // The machine's bandwidth drifts between runs (24–33 GB/s of copy on the 2-core EPYC within one hour), so the
        // bar is also judged on rounds that pair a copy with a decode step back to back: median of the per-round ratios.
        var ratios = new List<double>();
        for (int round = 0; round < 9; round++)
        {
            double copyNow = Diagnostics.PeakProbe.CopyGBps(plan.Threads > 0 ? plan.Threads : Environment.ProcessorCount);
            var sw = System.Diagnostics.Stopwatch.StartNew();
            DecodeAttention.Forward(q, cache, seq, 0, output, tuning: tuning);
            ratios.Add(bytes / sw.Elapsed.TotalSeconds / 1e9 / copyNow);
        }
        ratios.Sort();
        double paired = ratios[ratios.Count / 2];
        var row = new BenchCommand.BenchRow("decode", "dense decode f16", DType.Float16, 1, heads, kvHeads, length, d, false, plan.Threads, KernelPath.Auto,
            denseMs, t.MinMs, t.MaxMs, t.Count, 4.0 * heads * length * d, 0)
        {
            Memory = t.Memory,
            SpeedupVsDense = 1.0,
            Note = $"{gbps:F1} GB/s of K+V read = {100 * gbps / copyGBps:F0}% of the copy bandwidth measured at the start ({copyGBps:F1} GB/s); "
                + $"paired with a copy each: median {100 * paired:F0}% (range {100 * ratios[0]:F0}–{100 * ratios[^1]:F0}%); bar >= 70%: {(paired >= 0.7 ? "met" : "MISSED")}",
        };
        return (row, denseMs);
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
        // The budget covers resident pages and the tier's cache of loaded pages together. The cache must hold a step's
        // working set — Quest's pages of all 8 kv heads that live in the file, ≈ 1300 here — or LRU evicts each page
        // before the next step asks for it again: with 512 cached pages every step reloaded ≈ 1065 pages (session 5).
        const int cachedPages = 2048;
        long pageBytes = 64L * kvHeads * d * 2 * sizeof(short);
        string file = Path.Combine(Path.GetTempPath(), $"attend-offload-{Environment.ProcessId}.bin");
        var cache = new KvCache(1, kvHeads, d, storage: DType.Float16, pageSize: 64, offload: new KvOffload(file, budget - (cachedPages * pageBytes), CachedPages: cachedPages, IoThreads: 8));
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
        long offloaded = cache.OffloadStats.Offloaded;
        var tuning = new KernelTuning { Threads = plan.Threads };
        string Budget() => $"{cache.MemoryBytes / 1e9:F2} GB cache, {cache.ResidentBytes / 1e9:F2} GB resident + at most {cachedPages * pageBytes / 1e9:F2} GB of loaded pages (budget {budget / 1e9:F2}); {offloaded} pages in the file tier";
        // The bar's loop: one query for every step (Quest's choice then stays put: the working set loads once).
        float[] fixedQuery = BenchCommand.RandomView<float>(7, 1, 1, heads, d).ToArray();
        var rows = new List<BenchCommand.BenchRow> { Loop("Quest 1/64, file tier", 0.25, false, _ => fixedQuery, prefetch: true, note: $"{Budget()}; fill {fillSeconds:F0} s") };
        // A query that drifts (q ← √(1−ε²)·q + ε·noise, ε 0.3: cosine ≈ 0.95 between steps) changes a few pages each
        // step — what ahead-of-step prefetching is for. Each loop starts from its own query, so neither finds the other's pages.
        // Warm: the file's bytes sit in the OS page cache (it fits in this machine's memory), so a load is a copy.
        // Cold: the file is dropped from the OS page cache before each step (untimed), so every load waits on the disk —
        // the tier's intended case, a cache larger than memory.
        // ε 0.1 (cosine ≈ 0.995) changes fewer pages a step: the next-best pages then have more to predict.
        bool? canDrop = null;
        foreach ((bool cold, float eps, bool prefetch, double share) in new[]
        {
            (false, 0.3f, false, 0.0), (false, 0.3f, true, 0.0), (false, 0.3f, true, 0.25),
            (true, 0.3f, false, 0.0), (true, 0.3f, true, 0.0), (true, 0.3f, true, 0.25), (true, 0.1f, false, 0.0), (true, 0.1f, true, 0.0), (true, 0.1f, true, 0.25),
        })
        {
            if (cold && (canDrop ??= DropFromOsCache(file)) == false) continue;
            var rng = new Random((cold ? 30 : 20) + (eps < 0.2f ? 10 : 0) + (prefetch ? 1 + (int)(share * 4) : 0));
            var query = new float[heads * d];
            for (int i = 0; i < query.Length; i++) query[i] = Gaussian(rng);
            rows.Add(Loop($"Quest 1/64, {(cold ? "cold" : "warm")} file tier, query drift {eps:0.#}, prefetch {(!prefetch ? "off" : share == 0 ? "of the step's pages" : $"+ next best {share:0.##}")}", share, cold, _ =>
            {
                for (int i = 0; i < query.Length; i++) query[i] = (MathF.Sqrt(1 - (eps * eps)) * query[i]) + (eps * Gaussian(rng));
                return query;
            }, prefetch, Budget()));
        }
        return rows;

        BenchCommand.BenchRow Loop(string name, double share, bool cold, Func<int, float[]> queryOf, bool prefetch, string note)
        {
            var o = new TensorView<float>(new float[heads * d], 1, heads, d);
            var times = new List<double>();
            long pagesRead = 0, newReads = 0;
            HashSet<(int, int)> previous = [], current = [];
            var options = new DecodeOptions { Policy = new QuestPolicy(length / 64), Prefetch = prefetch, PrefetchShare = share, OnPagesSelected = (h, pages) => current.UnionWith(pages.Select(p => (h, p))) };
            // The previous loop's prefetches finish first (its counters settle), so they count there.
            for (long settled = -1; settled != cache.OffloadStats.Loads; Thread.Sleep(200)) settled = cache.OffloadStats.Loads;
            long firstLoads = 0;
            OffloadCounters before = cache.OffloadStats;
            int gen2 = GC.CollectionCount(2);
            TimeSpan paused = GC.GetTotalPauseDuration();
            for (int step = 0; step < steps; step++)
            {
                status($"{name}: step {step + 1}/{steps}");
                cache.Append(seq, 0, new TensorView<float>(keys[..(kvHeads * d)], 1, kvHeads, d), new TensorView<float>(values[..(kvHeads * d)], 1, kvHeads, d));
                var q = new TensorView<float>(queryOf(step), 1, heads, d);
                if (cold) DropFromOsCache(file);
                current.Clear();
                var sw = System.Diagnostics.Stopwatch.StartNew();
                pagesRead += DecodeAttention.Forward(q, cache, seq, 0, o, options, tuning: tuning);
                times.Add(sw.Elapsed.TotalMilliseconds);
                if (step == 0) firstLoads = cache.OffloadStats.Loads - cache.OffloadStats.Prefetched - (before.Loads - before.Prefetched);
                else newReads += current.Count(x => !previous.Contains(x));
                (previous, current) = (current, previous);
            }
            OffloadCounters after = cache.OffloadStats;
            string gc = $"GC: {GC.CollectionCount(2) - gen2} full collections, {(GC.GetTotalPauseDuration() - paused).TotalMilliseconds:F0} ms paused over the {steps} steps";
            double first = times[0];
            var later = times.Skip(1).Order().ToList();
            long loads = after.Loads - before.Loads, prefetched = after.Prefetched - before.Prefetched;
            return new BenchCommand.BenchRow("decode-offload", name, DType.Float16, 1, heads, kvHeads, length, d, false, plan.Threads, KernelPath.Auto,
                later[later.Count / 2], later[0], later[^1], later.Count, 4.0 * heads * (length / 64.0) * d, 0)
            {
                Density = 1.0 / 64,
                Note = $"{note}; {steps} steps (time: median of steps 2..{steps}; first step {first:F0} ms, {firstLoads} pages loaded on its critical path): "
                    + $"{loads} pages loaded from the file ({prefetched} by the prefetch threads, {loads - prefetched} by the step itself; {after.Waited - before.Waited} reads waited for a prefetch in progress), "
                    + $"{after.CacheHits - before.CacheHits} served by its page cache, {pagesRead / (double)steps:F0} page reads per step (all kv heads), "
                    + $"{newReads / (double)(steps - 1):F1} of them not read by the step before; {gc}",
            };
        }
    }

    /// <summary>
    /// Writes the file's dirty pages and drops it from the OS page cache (GNU dd's nocache flag: fdatasync, then
    /// posix_fadvise DONTNEED), so the next reads come from the disk. False when dd is not there or fails.
    /// </summary>
    private static bool DropFromOsCache(string file)
    {
        try
        {
            var info = new System.Diagnostics.ProcessStartInfo("dd", ["of=" + file, "oflag=nocache", "conv=notrunc,fdatasync", "count=0", "status=none"]) { RedirectStandardError = true };
            using var dd = System.Diagnostics.Process.Start(info)!;
            dd.WaitForExit();
            return dd.ExitCode == 0;
        }
        catch (System.ComponentModel.Win32Exception)
        {
            return false;
        }
    }

    private static float Gaussian(Random rng) => (float)(Math.Sqrt(-2 * Math.Log(1 - rng.NextDouble())) * Math.Cos(2 * Math.PI * rng.NextDouble()));
}
