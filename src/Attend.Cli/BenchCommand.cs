using System.CommandLine;
using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using System.Text.Json.Nodes;
using Attend.Diagnostics;
using Attend.Tensors;
using Spectre.Console;

namespace Attend.Cli;

/// <summary>
/// <c>attend bench</c>: the main job. Times kernels on random normal inputs and reports each against ceilings
/// measured in the same run (the FMA peak), per MEASURING.md. Suites: default, dense, peak.
/// </summary>
internal static class BenchCommand
{
    /// <summary>Version of the JSON layout written by <c>--json</c>; bump on incompatible changes.</summary>
    public const int SchemaVersion = 1;

    public static Command Create()
    {
        var suite = new Option<string>("--suite") { Description = "default | dense | peak", DefaultValueFactory = _ => "default" };
        var seq = new Option<int[]>("--seq") { Description = "sequence lengths (default 1024 4096 16384)", AllowMultipleArgumentsPerToken = true };
        var headDim = new Option<int[]>("--head-dim") { Description = "head dims (default 64 128)", AllowMultipleArgumentsPerToken = true };
        var heads = new Option<int>("--heads") { Description = "query heads (default 8; 2 at S > 8192 to keep the suite short)" };
        var kvHeads = new Option<int>("--kv-heads") { Description = "key/value heads (default = heads)" };
        var batch = new Option<int>("--batch") { Description = "batch size", DefaultValueFactory = _ => 1 };
        var causal = new Option<string>("--causal") { Description = "both | yes | no", DefaultValueFactory = _ => "both" };
        var dtype = new Option<string[]>("--dtype") { Description = "f32 | f16 | bf16 (default: f32 on cpu, bf16 on cuda); several make an axis of the dense rows", AllowMultipleArgumentsPerToken = true };
        var threads = new Option<int[]>("--threads") { Description = "worker threads (0: all cores); several make an axis of the dense rows, other suites use the first", AllowMultipleArgumentsPerToken = true };
        var path = new Option<KernelPath>("--path") { Description = "SIMD path (Auto, Scalar, Vector128, Vector256, Vector512)" };
        var blockQ = new Option<int>("--block-q") { Description = "CPU query rows per work item (KernelTuning.BlockQ)", DefaultValueFactory = _ => 128 };
        var csv = new Option<string?>("--csv") { Description = "also write the rows as CSV (the JSON row fields as columns)" };
        var peers = new Option<string?>("--peers") { Description = "merge rows of ../shared/peers/torch_attention.py (--json output) into the table, JSON and report, marked as peers" };
        var inputs = new Option<string?>("--inputs") { Description = "--suite sparse: folder with q.npy, k.npy, v.npy [needles.json] (from attend gen) instead of generated inputs" };
        var selectors = new Option<string[]>("--selector") { Description = "--suite sparse/sparse-real: selector spec(s), e.g. xattention:t=0.95 (default: all built-ins)", AllowMultipleArgumentsPerToken = true };
        var data = new Option<string>("--data") { Description = "folder of layer{1,6}_{q,k,v}.npy for --suite decode-real", DefaultValueFactory = _ => "../shared/data/gpt-bytes-8k" };
        var reps = new Option<int>("--reps") { Description = "timed repetitions per row (at least 5 are used)", DefaultValueFactory = _ => 5 };
        var device = new Option<string>("--device") { Description = "cpu or cuda", DefaultValueFactory = _ => "cpu" };
        var json = new Option<string?>("--json") { Description = "write results as JSON to this file ('-' for stdout)" };
        var command = new Command("bench", "benchmark attention kernels against ceilings measured in the same run");
        foreach (Option o in new Option[] { suite, seq, headDim, heads, kvHeads, batch, causal, dtype, threads, path, blockQ, data, inputs, selectors, reps, device, json, csv, peers }) command.Options.Add(o);
        command.SetAction(r =>
        {
            string deviceName = r.GetValue(device)!;
            if (deviceName is not ("cpu" or "cuda"))
            {
                throw new ArgumentException($"--device must be cpu or cuda; got '{deviceName}'");
            }
            bool cuda = deviceName == "cuda";
            if (cuda && !Cuda.CudaBackend.IsAvailable)
            {
                throw new NotSupportedException($"--device cuda: {Cuda.CudaBackend.UnavailableReason}");
            }
            string suiteName = r.GetValue(suite)!;
            if (suiteName is not ("default" or "dense" or "peak" or "gpu" or "masks" or "sparse" or "sparse-real" or "linear" or "decode" or "decode-real" or "decode-offload"))
            {
                throw new ArgumentException($"--suite must be one of default, dense, peak, gpu, masks, sparse, sparse-real, linear, decode, decode-real, decode-offload; got '{suiteName}'");
            }
            if (cuda && suiteName == "default") suiteName = "gpu";
            if (cuda && suiteName == "masks") suiteName = "gpu-masks";
            if (cuda && suiteName == "decode") suiteName = "gpu-decode";
            if (cuda && suiteName == "linear") suiteName = "gpu-linear";
            if (cuda && suiteName == "sparse") suiteName = "gpu-sparse";
            if (suiteName == "gpu" && !cuda) throw new ArgumentException("--suite gpu needs --device cuda");
            int[] threadCounts = r.GetValue(threads) is { Length: > 0 } ts ? [.. ts.Select(t => t > 0 ? t : Environment.ProcessorCount)] : [Environment.ProcessorCount];
            DType[] dtypes = r.GetValue(dtype) is { Length: > 0 } dts ? [.. dts.Select(DTypes.Parse)] : [cuda ? DType.BFloat16 : DType.Float32];
            if (dtypes.Contains(DType.Float64)) throw new ArgumentException("--dtype must be f32, f16 or bf16");
            var plan = new BenchPlan
            {
                Lengths = r.GetValue(seq) is { Length: > 0 } s ? s : suiteName == "gpu-sparse" ? [131072] : cuda ? [4096, 16384] : suiteName == "sparse" ? [32768] : [1024, 4096, 16384],
                HeadDims = r.GetValue(headDim) is { Length: > 0 } d ? d : cuda || suiteName == "sparse" ? [128] : [64, 128],
                Heads = r.GetValue(heads),
                KvHeads = r.GetValue(kvHeads),
                Batch = r.GetValue(batch),
                Causal = r.GetValue(causal) switch
                {
                    "both" => [false, true],
                    "yes" => [true],
                    "no" => [false],
                    var c => throw new ArgumentException($"--causal must be both, yes or no; got '{c}'"),
                },
                DTypes = dtypes,
                ThreadCounts = threadCounts,
                Path = r.GetValue(path),
                Reps = Math.Max(5, r.GetValue(reps)),
                BlockQ = r.GetValue(blockQ),
                DataDir = r.GetValue(data)!,
                Inputs = r.GetValue(inputs),
                Selectors = r.GetValue(selectors) is { Length: > 0 } sel ? [.. sel.Select(Sparse.Selectors.ParseAny)] : null,
            };
            string? jsonPath = r.GetValue(json);
            bool quiet = jsonPath == "-";
            BenchReport report = Run(suiteName, plan, quiet);
            if (r.GetValue(peers) is { } peersPath) report = report with { Rows = [.. report.Rows, .. Peers.Read(peersPath)] };
            if (!quiet) Print(report);
            JsonNode results = report.ToJson();
            JsonOutput.Write(jsonPath, results);
            if (r.GetValue(csv) is { } csvPath) File.WriteAllText(csvPath, Peers.ToCsv(results));
            if (jsonPath is null && suiteName == "default")
            {
                // The main job leaves its results and the HTML report in the working directory.
                JsonOutput.Write("attend-results.json", results);
                File.WriteAllText("attend-report.html", Report.Render(results));
                Console.WriteLine("wrote attend-results.json and attend-report.html");
            }
            return 0;
        });
        return command;
    }

    internal sealed record BenchPlan
    {
        public required int[] Lengths { get; init; }
        public required int[] HeadDims { get; init; }
        public int Heads { get; init; }
        public int KvHeads { get; init; }
        public int Batch { get; init; } = 1;
        public required bool[] Causal { get; init; }
        /// <summary>Element types of the dense rows (an axis); other suites use the first.</summary>
        public DType[] DTypes { get; init; } = [DType.Float32];

        /// <summary>Worker thread counts of the dense rows (an axis); other suites use the first.</summary>
        public int[] ThreadCounts { get; init; } = [Environment.ProcessorCount];

        public DType DType => DTypes[0];
        public int Threads => ThreadCounts[0];
        public KernelPath Path { get; init; }
        public int Reps { get; init; } = 5;
        public int BlockQ { get; init; } = 128;
        public string DataDir { get; init; } = "../shared/data/gpt-bytes-8k";

        /// <summary>--suite sparse: a folder with q.npy, k.npy, v.npy (and needles.json) instead of generated inputs.</summary>
        public string? Inputs { get; init; }

        /// <summary>--suite sparse / sparse-real: selectors to run (default: every built-in at its defaults).</summary>
        public IReadOnlyList<Sparse.ISparsitySelector>? Selectors { get; init; }
    }

    internal sealed record BenchRow(
        string Suite, string Method, DType DType, int Batch, int Heads, int KvHeads, int Length, int HeadDim, bool Causal,
        int Threads, KernelPath Path, double MedianMs, double MinMs, double MaxMs, int Reps, double UsefulFlops, double PeakGflops)
    {
        public string Backend { get; init; } = "cpu";

        /// <summary>Visited fraction of the pairs (1 for dense; 0.5 for causal counts as its own method).</summary>
        public double? Density { get; init; }

        /// <summary>Time of the same run's dense baseline divided by this row's time.</summary>
        public double? SpeedupVsDense { get; init; }

        /// <summary>
        /// The row's mask in the peers script's vocabulary (full, causal, window:W, blocks:D, decode), so the report can
        /// set Attend and peer rows of the same mask and shape side by side; null for masks the peers do not run.
        /// </summary>
        public string? Mask { get; init; }

        /// <summary>Memory of one call (CPU rows): managed bytes allocated and peak resident growth.</summary>
        public MemoryUse? Memory { get; init; }

        /// <summary>A one-line note (the baseline, the bar).</summary>
        public string? Note { get; init; }

        /// <summary>Selection (plan building) share of <see cref="MedianMs"/>, for content-based sparse methods.</summary>
        public double? SelectionMs { get; init; }

        /// <summary>Approximate methods: ‖o − o_dense‖ / ‖o_dense‖ on the same inputs.</summary>
        public double? RelativeL2 { get; init; }

        /// <summary>Approximate methods: cosine similarity of the output with the dense output.</summary>
        public double? Cosine { get; init; }

        /// <summary>Approximate methods: mean share of the dense softmax mass the method computed.</summary>
        public double? Recall { get; init; }

        /// <summary>Structured inputs with needles: share of needle pairs the plan computes.</summary>
        public double? NeedleHitRate { get; init; }

        /// <summary>A block plan picture ('#' full, '+' partial, '.' skipped; at most 48×48 cells), for the report.</summary>
        public string[]? PlanPicture { get; init; }

        /// <summary>Rows that carry accuracy metrics (approximate methods).</summary>
        public bool IsApproximate => RelativeL2 is not null;

        public double Gflops => UsefulFlops / (MedianMs * 1e-3) / 1e9;

        /// <summary>
        /// Effective rate: the FLOPs of unmasked dense attention of the row's shape (4·B·H·Sq·Skv·D; Sq = 1 for decode
        /// rows) over this row's time — what dense attention would need to run as fast. Null for rows without a shape.
        /// </summary>
        public double? EffectiveGflops
        {
            get
            {
                if (MedianMs <= 0 || Length <= 0 || HeadDim <= 0 || Heads <= 0) return null;
                bool decode = Suite.Contains("decode", StringComparison.Ordinal) || Mask == "decode";
                double flops = 4.0 * Batch * Heads * (decode ? 1.0 : Length) * Length * HeadDim;
                return flops / (MedianMs * 1e-3) / 1e9;
            }
        }
        public double PeakFraction => Gflops / PeakGflops;
    }

    internal sealed record BenchReport(string Suite, double PeakGflops, double PeakGflopsOneThread, double CopyGBps, int Threads, IReadOnlyList<BenchRow> Rows)
    {
        public JsonObject ToJson()
        {
            var rows = new JsonArray();
            foreach (BenchRow row in Rows)
            {
                rows.Add((JsonNode)new JsonObject
                {
                    ["suite"] = row.Suite, ["method"] = row.Method, ["dtype"] = DTypes.Name(row.DType), ["backend"] = row.Backend,
                    ["batch"] = row.Batch, ["heads"] = row.Heads, ["kvHeads"] = row.KvHeads, ["seqLen"] = row.Length,
                    ["headDim"] = row.HeadDim, ["causal"] = row.Causal, ["threads"] = row.Threads, ["path"] = row.Path.ToString(),
                    ["medianMs"] = JsonOutput.Number(row.MedianMs), ["minMs"] = JsonOutput.Number(row.MinMs), ["maxMs"] = JsonOutput.Number(row.MaxMs), ["reps"] = row.Reps,
                    ["usefulGflop"] = row.UsefulFlops / 1e9, ["gflops"] = JsonOutput.Number(row.Gflops), ["effectiveGflops"] = JsonOutput.Number(row.EffectiveGflops), ["peakFraction"] = JsonOutput.Number(row.PeakFraction),
                    ["mask"] = row.Mask, ["density"] = row.Density, ["speedupVsDense"] = row.SpeedupVsDense, ["note"] = row.Note,
                    ["allocatedBytes"] = row.Memory?.AllocatedBytes, ["peakRssGrowthBytes"] = row.Memory?.PeakResidentGrowthBytes,
                    ["selectionMs"] = JsonOutput.Number(row.SelectionMs), ["relativeL2"] = JsonOutput.Number(row.RelativeL2),
                    ["cosine"] = JsonOutput.Number(row.Cosine), ["recall"] = JsonOutput.Number(row.Recall), ["needleHitRate"] = JsonOutput.Number(row.NeedleHitRate),
                    ["planPicture"] = row.PlanPicture is { } pic ? new JsonArray([.. pic.Select(l => (JsonNode)l)]) : null,
                });
            }
            return new JsonObject
            {
                ["schema"] = "attend.bench", ["schemaVersion"] = SchemaVersion,
                ["suite"] = Suite, ["date"] = DateTime.UtcNow.ToString("O"),
                ["machine"] = Machine(),
                ["peak"] = new JsonObject
                {
                    ["fmaGflops"] = PeakGflops, ["fmaGflopsOneThread"] = PeakGflopsOneThread, ["copyGBps"] = CopyGBps, ["threads"] = Threads,
                },
                ["rows"] = rows,
                ["kernels"] = Kernels(),
            };
        }
    }

    private static JsonArray Kernels()
    {
        var list = new JsonArray();
        if (!Cuda.CudaBackend.IsAvailable) return list;
        foreach ((string name, Cuda.CudaKernel k) in Cuda.CudaBackend.Device.Kernels)
        {
            list.Add((JsonNode)new JsonObject { ["name"] = name, ["compileMs"] = k.CompileMilliseconds, ["registers"] = k.Registers, ["localBytes"] = k.LocalBytes });
        }
        return list;
    }

    internal static JsonObject Machine() => new()
    {
        ["cpu"] = CpuModel(),
        ["cores"] = Environment.ProcessorCount,
        ["simdBits"] = Vector512.IsHardwareAccelerated ? 512 : Vector256.IsHardwareAccelerated ? 256 : Vector128.IsHardwareAccelerated ? 128 : 32,
        ["os"] = RuntimeInformation.OSDescription,
        ["runtime"] = RuntimeInformation.FrameworkDescription,
        ["attend"] = typeof(Attention).Assembly.GetName().Version?.ToString(),
        ["gpu"] = Cuda.CudaBackend.IsAvailable ? Cuda.CudaBackend.Device.Name : null,
        ["gpuArch"] = Cuda.CudaBackend.IsAvailable ? Cuda.CudaBackend.Device.Architecture : null,
        ["cudaDriver"] = Cuda.CudaBackend.IsAvailable ? Cuda.CudaBackend.Device.DriverVersion : null,
        ["nvrtc"] = Cuda.KernelCompiler.NvrtcAvailable ? $"{Cuda.KernelCompiler.NvrtcVersion.Major}.{Cuda.KernelCompiler.NvrtcVersion.Minor}" : null,
        ["gpuUnavailable"] = Cuda.CudaBackend.IsAvailable ? null : Cuda.CudaBackend.UnavailableReason,
    };

    internal static string CpuModel()
    {
        try
        {
            if (File.Exists("/proc/cpuinfo"))
            {
                string? line = File.ReadLines("/proc/cpuinfo").FirstOrDefault(l => l.StartsWith("model name", StringComparison.Ordinal));
                if (line is not null) return line[(line.IndexOf(':') + 1)..].Trim();
            }
        }
        catch (IOException)
        {
        }
        return RuntimeInformation.ProcessArchitecture.ToString();
    }

    internal static BenchReport Run(string suite, BenchPlan plan, bool quiet)
    {
        var rows = new List<BenchRow>();
        double peak = 0, peakOne = 0, copy = 0;
        var peaks = new Dictionary<int, double>();   // FMA peak per thread count of the threads axis
        var cases = suite is "peak" or "gpu" or "gpu-masks" or "gpu-decode" or "gpu-linear" or "gpu-sparse" or "masks" or "sparse" or "sparse-real" or "linear" or "decode" or "decode-real" or "decode-offload" ? [] : DenseCases(plan).ToList();
        int gpuCases = suite == "gpu" ? plan.Lengths.Length * plan.HeadDims.Length * plan.Causal.Length : 0;
        gpuCases += suite == "masks" ? MaskBench.Steps : suite == "linear" ? LinearBench.Steps : suite == "decode" ? DecodeBench.Steps : 0;
        void Body(Action<string> status, Action advance)
        {
            if (suite is not ("gpu" or "gpu-masks" or "gpu-decode" or "gpu-linear" or "gpu-sparse"))
            {
                status("measuring the FMA peak");
                peak = PeakProbe.FmaGflops(plan.Threads);
                peakOne = PeakProbe.FmaGflops(1);
                peaks[plan.Threads] = peak;
                peaks[1] = peakOne;
                foreach (int t in plan.ThreadCounts) if (!peaks.ContainsKey(t)) peaks[t] = PeakProbe.FmaGflops(t);
                copy = PeakProbe.CopyGBps(plan.Threads);
            }
            advance();
            foreach (DenseCase c in cases)
            {
                status(c.Describe());
                rows.Add(TimeDense(c, plan, peaks.GetValueOrDefault(c.Threads, peak)));
                advance();
            }
            if (suite == "gpu") rows.AddRange(GpuBench.Run(plan, status, advance));
            if (suite == "gpu-masks") rows.AddRange(GpuBench.RunMasks(plan, status));
            if (suite == "gpu-decode") rows.AddRange(GpuBench.RunDecode(plan, status));
            if (suite == "gpu-linear") rows.AddRange(GpuBench.RunLinear(plan, status));
            if (suite == "gpu-sparse") rows.AddRange(GpuBench.RunSparse(plan, status));
            if (suite == "masks") rows.AddRange(MaskBench.Run(plan, peak, status, advance));
            if (suite == "sparse") rows.AddRange(SparseBench.Run(plan, peak, status));
            if (suite == "default") rows.AddRange(SparseBench.RunDefault(plan, peak, status));
            if (suite == "sparse-real") rows.AddRange(SparseBench.RunReal(plan, peak, status));
            if (suite == "linear") rows.AddRange(LinearBench.Run(plan, peak, status, advance));
            if (suite == "decode") rows.AddRange(DecodeBench.Run(plan, copy, status, advance));
            if (suite == "peak") rows.AddRange(DecodeBench.RunPeak(plan, copy, status));
            if (suite == "decode-real") rows.AddRange(DecodeRealBench.Run(plan.DataDir, status));
            if (suite == "decode-offload") rows.AddRange(DecodeBench.RunOffload(plan, status));
        }
        if (quiet || Console.IsOutputRedirected)
        {
            Body(s => { if (!quiet) Console.Error.WriteLine($"  {s}"); }, () => { });
        }
        else
        {
            AnsiConsole.Progress()
                .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new ElapsedTimeColumn())
                .Start(ctx =>
                {
                    ProgressTask task = ctx.AddTask("bench", maxValue: cases.Count + gpuCases + 1);
                    Body(s => task.Description = s.Length > 40 ? s[..40] : s, () => task.Increment(1));
                });
        }
        return new BenchReport(suite, peak, peakOne, copy, plan.Threads, rows);
    }

    internal sealed record DenseCase(int Batch, int Heads, int KvHeads, int Length, int HeadDim, bool Causal, DType DType, int Threads)
    {
        public string Describe() => $"dense S={Length} D={HeadDim}{(Causal ? " causal" : "")} {Attend.Tensors.DTypes.Name(DType)} {Threads}t";
    }

    private static IEnumerable<DenseCase> DenseCases(BenchPlan plan)
    {
        foreach (int s in plan.Lengths)
            foreach (int d in plan.HeadDims)
                foreach (bool c in plan.Causal)
                    foreach (DType dtype in plan.DTypes)
                        foreach (int threads in plan.ThreadCounts)
                        {
                            int h = plan.Heads > 0 ? plan.Heads : s > 8192 ? 2 : 8;
                            yield return new DenseCase(plan.Batch, h, plan.KvHeads > 0 ? plan.KvHeads : h, s, d, c, dtype, threads);
                        }
    }

    private static BenchRow TimeDense(DenseCase c, BenchPlan plan, double peak) => c.DType switch
    {
        DType.Float16 => TimeDense<Half>(c, plan, peak),
        DType.BFloat16 => TimeDense<BFloat16>(c, plan, peak),
        _ => TimeDense<float>(c, plan, peak),
    };

    private static BenchRow TimeDense<T>(DenseCase c, BenchPlan plan, double peak) where T : unmanaged
    {
        TensorView<T> q = RandomView<T>(1, c.Batch, c.Length, c.Heads, c.HeadDim);
        TensorView<T> k = RandomView<T>(2, c.Batch, c.Length, c.KvHeads, c.HeadDim);
        TensorView<T> v = RandomView<T>(3, c.Batch, c.Length, c.KvHeads, c.HeadDim);
        var o = new TensorView<T>(new T[q.ElementCount], c.Batch, c.Length, c.Heads, c.HeadDim);
        var options = new AttentionOptions { Causal = c.Causal };
        var tuning = new KernelTuning { Threads = c.Threads, Path = plan.Path, BlockQ = plan.BlockQ };
        Timing t = Measure(() => Attention.Forward(q, k, v, o, options, tuning: tuning), plan.Reps);
        AttentionShape shape = AttentionShape.Of(q, k, v);
        // % of peak is against the FMA peak measured with the row's own thread count.
        return new BenchRow("dense", c.Causal ? "dense-causal" : "dense", c.DType, c.Batch, c.Heads, c.KvHeads, c.Length, c.HeadDim, c.Causal,
            c.Threads, tuning.EffectivePath, t.MedianMs, t.MinMs, t.MaxMs, t.Count, c.Causal ? shape.CausalFlops : shape.DenseFlops, peak) { Memory = t.Memory, Mask = c.Causal ? "causal" : "full" };
    }

    /// <summary>Sorted times of the timed calls and the memory of one more call.</summary>
    internal sealed record Timing(IReadOnlyList<double> SortedMs, MemoryUse Memory)
    {
        public double MedianMs => SortedMs[SortedMs.Count / 2];
        public double MinMs => SortedMs[0];
        public double MaxMs => SortedMs[^1];
        public int Count => SortedMs.Count;
    }

    /// <summary>
    /// Warm-up (at least 2 calls and 0.2 s, so tiered JIT and caches settle), then at least <paramref name="reps"/>
    /// timed calls and at least half a second, then one untimed call observed by <see cref="MemoryProbe"/>.
    /// </summary>
    internal static Timing Measure(Action action, int reps)
    {
        // Warm-up long enough for the JIT to reach its optimized tier: new code runs instrumented first and is
        // recompiled after ~30 calls plus a 100 ms quiet period, so 0.2 s of warm-up measured half-optimized kernels
        // (a Quest selection ran 6× slower than at steady state; docs/perf/decode.md). Slow rows (≥ 1 s a call) get one call.
        var warm = Stopwatch.StartNew();
        for (int i = 0; (i < 2 && warm.Elapsed.TotalSeconds < 1) || (warm.Elapsed.TotalSeconds < 1.0 && i < 50); i++) action();
        var times = new List<double>();
        var total = Stopwatch.StartNew();
        while (times.Count < reps || (total.Elapsed.TotalSeconds < 0.5 && times.Count < 100))
        {
            var sw = Stopwatch.StartNew();
            action();
            times.Add(sw.Elapsed.TotalMilliseconds);
        }
        times.Sort();
        return new Timing(times, MemoryProbe.Observe(action));
    }

    internal static TensorView<T> RandomView<T>(int seed, int b, int s, int h, int d) where T : unmanaged
    {
        var rng = new Random(seed);
        var data = new T[(long)b * s * h * d];
        for (long i = 0; i < data.LongLength; i++)
        {
            // Box–Muller normal samples: random normal inputs, never zeros (MEASURING.md).
            double u1 = 1.0 - rng.NextDouble(), u2 = rng.NextDouble();
            data[i] = ElementConvert.FromSingle<T>((float)(Math.Sqrt(-2 * Math.Log(u1)) * Math.Cos(2 * Math.PI * u2)));
        }
        return new TensorView<T>(data, b, s, h, d);
    }

    private static void Print(BenchReport report)
    {
        if (Console.IsOutputRedirected) AnsiConsole.Profile.Width = 160;   // logs and CI: do not wrap the table at 80
        AnsiConsole.MarkupLine($"[bold]attend bench[/] suite [green]{report.Suite}[/] on {Markup.Escape(CpuModel())}, {report.Threads} threads");
        if (report.PeakGflops > 0)
            AnsiConsole.MarkupLine($"FMA peak measured now: [bold]{report.PeakGflops:F1}[/] GFLOPS ({report.PeakGflopsOneThread:F1} on one thread); copy {report.CopyGBps:F1} GB/s");
        if (Cuda.CudaBackend.IsAvailable && report.Suite is "gpu" or "gpu-masks" or "gpu-decode" or "gpu-linear" or "gpu-sparse")
            AnsiConsole.MarkupLine($"GPU: {Markup.Escape(Cuda.CudaBackend.Device.Name)} ({Cuda.CudaBackend.Device.Architecture}, driver {Cuda.CudaBackend.Device.DriverVersion})");
        if (report.Rows.Count == 0) return;
        // Speed rows in the standard table; sparse-method blocks (approximate rows and their dense baselines) in an
        // accuracy table of their own.
        List<BenchRow> accuracyRows = [.. report.Rows.Where(r => r.Suite is "sparse" or "gpu-sparse")];
        List<BenchRow> speedRows = [.. report.Rows.Where(r => r.Suite is not ("sparse" or "gpu-sparse"))];
        if (speedRows.Count > 0)
        {
            var table = new Table().AddColumns("method", "backend", "dtype", "B", "H", "S", "D", "path", "thr", "median ms", "min..max ms", "GFLOPS", "% peak", "density", "vs dense", "alloc MiB", "peak+ MiB");
            foreach (BenchRow r in speedRows)
            {
                table.AddRow(Markup.Escape(r.Method), r.Backend, DTypes.Name(r.DType), r.Batch.ToString(), r.Heads == r.KvHeads ? r.Heads.ToString() : $"{r.Heads}/{r.KvHeads}",
                    r.Length.ToString(), r.HeadDim.ToString(), r.Path.ToString(), r.Threads > 0 ? r.Threads.ToString() : "", $"{r.MedianMs:F2}", $"{r.MinMs:F2}..{r.MaxMs:F2}",
                    r.UsefulFlops > 0 ? $"{r.Gflops:F1}" : "-", r.UsefulFlops > 0 && r.PeakGflops > 0 ? $"{100 * r.PeakFraction:F1}%" : "-",
                    r.Density is { } dn ? $"{dn:F3}" : "", r.SpeedupVsDense is { } sp ? $"{sp:F2}x" : "",
                    r.Memory is { } m ? $"{m.AllocatedBytes / 1048576.0:F2}" : "", r.Memory?.PeakResidentGrowthBytes is { } g ? $"{g / 1048576.0:F1}" : "");
            }
            AnsiConsole.Write(table);
        }
        if (accuracyRows.Count > 0)
        {
            // Accuracy tables are wide: backend, dtype, batch and path are in the JSON.
            var table = new Table().AddColumns("method", "H", "S", "D", "median ms", "min..max", "density", "vs dense", "select ms", "rel L2", "cosine", "recall", "needles");
            foreach (BenchRow r in accuracyRows)
            {
                table.AddRow(Markup.Escape(r.Method), r.Heads == r.KvHeads ? r.Heads.ToString() : $"{r.Heads}/{r.KvHeads}", r.Length.ToString(), r.HeadDim.ToString(),
                    r.MedianMs > 0 ? $"{r.MedianMs:F1}" : "", r.MedianMs > 0 ? $"{r.MinMs:F0}..{r.MaxMs:F0}" : "",
                    r.Density is { } dn2 ? $"{dn2:F3}" : "", r.SpeedupVsDense is { } sp2 ? $"{sp2:F2}x" : "",
                    r.SelectionMs is { } sel ? $"{sel:F1}" : "", r.RelativeL2 is { } e ? $"{e:F4}" : "", r.Cosine is { } cs ? $"{cs:F4}" : "",
                    r.Recall is { } rc ? $"{rc:F3}" : "", r.NeedleHitRate is { } nh ? $"{nh:F2}" : "");
            }
            AnsiConsole.Write(table);
        }
        foreach (BenchRow r in report.Rows.Where(r => r.Note is not null))
            AnsiConsole.MarkupLine($"[grey]{Markup.Escape(r.Method)}: {Markup.Escape(r.Note!)}[/]");
        AnsiConsole.MarkupLine("[grey]GFLOPS count useful FLOPs: 4·B·H·S²·D, halved (exactly) for causal. GPU rows: CUDA events; % of a nominal 800 TFLOPS.[/]");
        AnsiConsole.MarkupLine("[grey]alloc MiB: managed bytes one call allocates; peak+ MiB: growth of the process's peak resident memory during one call (managed + native).[/]");
        if (Cuda.CudaBackend.IsAvailable && report.Rows.Any(r => r.Backend == "cuda"))
        {
            foreach ((string kernel, Cuda.CudaKernel k) in Cuda.CudaBackend.Device.Kernels)
                AnsiConsole.MarkupLine($"[grey]kernel {Markup.Escape(kernel)}: compiled in {k.CompileMilliseconds:F0} ms (0: disk cache), {k.Registers} registers, {k.LocalBytes} B local[/]");
        }
    }
}
