using Attend.Linear;
using Attend.Tensors;

namespace Attend.Cli;

/// <summary>
/// <c>attend bench --suite linear</c>: causal chunked linear attention (elu+1) at S = 16384 and 65536 against dense
/// causal softmax attention at 65536, same run (B=1, H=8, D=64 by default): the linear issue's bars. Then every
/// feature map and hybrid at S = 4096 against dense softmax attention of the same causality, with the distance of
/// each output from softmax attention (relative L2, cosine) — for maps that estimate exp (Taylor, random and wavelet
/// features, BASED) an approximation error, for the others the difference of a different model.
/// </summary>
internal static class LinearBench
{
    private const int TableLength = 4096;

    /// <summary>(name, causal, run) of the per-method table.</summary>
    private static IEnumerable<(string Name, bool Causal, Action<TensorView<float>, TensorView<float>, TensorView<float>, TensorView<float>, KernelTuning> Run)> Methods()
    {
        static Action<TensorView<float>, TensorView<float>, TensorView<float>, TensorView<float>, KernelTuning> Map(FeatureMap map, bool causal, DepthwiseConv? conv = null) =>
            (q, k, v, o, t) => LinearAttention.Forward(q, k, v, o, new LinearOptions { FeatureMap = map, Causal = causal, ValueConv = conv }, t);
        float[] slabWeights = Enumerable.Range(0, 64 * 3).Select(i => (i % 3) == 2 ? 0.1f : 0.02f).ToArray();
        foreach (bool causal in new[] { true, false })
        {
            string c = causal ? " causal" : "";
            yield return ($"linear elu+1{c}", causal, Map(FeatureMap.EluPlusOne, causal));
            yield return ($"linear relu{c}", causal, Map(FeatureMap.Relu, causal));
            yield return ($"linear relu + value conv k3{c} (SLAB)", causal, Map(FeatureMap.Relu, causal, new DepthwiseConv(slabWeights, 3)));
            yield return ($"linear taylor{c} (BASED map)", causal, Map(FeatureMap.Taylor, causal));
            yield return ($"linear random:256{c} (Performer)", causal, Map(FeatureMap.RandomFeatures(256), causal));
            yield return ($"linear wavelet:256{c} (WERSA-style)", causal, Map(FeatureMap.WaveletRandomFeatures(256), causal));
            yield return ($"linear hashing:64{c} (EcoFormer)", causal, Map(FeatureMap.Hashing(64), causal));
            yield return ($"mossformer chunk 256{c}", causal, (q, k, v, o, t) => Hybrids.MossFormer(q, k, v, o, 256, causal, tuning: t));
        }
        yield return ("based window 64 causal", true, (q, k, v, o, t) => Hybrids.Based(q, k, v, o, 64, t));
        yield return ("scout window 256 segment 64 causal", true, (q, k, v, o, t) => Hybrids.Scout(q, k, v, o, 256, 64, tuning: t));
        yield return ("agent attention 64 agents", false, (q, k, v, o, t) => Hybrids.AgentAttention(q, k, v, o, 64, t));
        yield return ("linear-infsa", false, (q, k, v, o, t) => Hybrids.LinearInfSA(q, k, v, o, tuning: t));
    }

    public static readonly int Steps = 3 + 2 + Methods().Count();

    public static List<BenchCommand.BenchRow> Run(BenchCommand.BenchPlan plan, double peak, Action<string> status, Action advance)
    {
        var rows = new List<BenchCommand.BenchRow>();
        int h = plan.Heads > 0 ? plan.Heads : 8, d = 64;
        var tuning = new KernelTuning { Threads = plan.Threads, Path = plan.Path };
        var options = new LinearOptions { FeatureMap = FeatureMap.EluPlusOne, Causal = true };
        double t16 = 0, t64 = 0;
        foreach (int s in new[] { 16384, 65536 })
        {
            status($"linear elu+1 causal S={s}");
            TensorView<float> q = BenchCommand.RandomView<float>(1, 1, s, h, d), k = BenchCommand.RandomView<float>(2, 1, s, h, d), v = BenchCommand.RandomView<float>(3, 1, s, h, d);
            var o = new TensorView<float>(new float[q.ElementCount], 1, s, h, d);
            BenchCommand.Timing times = BenchCommand.Measure(() => LinearAttention.Forward(q, k, v, o, options, tuning), plan.Reps);
            double ms = times.MedianMs;
            if (s == 16384) t16 = ms; else t64 = ms;
            // Useful FLOPs of the chunked form per token: intra (C·F + C·Dv), inter and update (2·F·Dv), twice for FMA.
            double flops = 2.0 * h * s * ((64.0 * (d + d)) + 2.0 * d * d);
            rows.Add(new BenchCommand.BenchRow("linear", "linear elu+1 causal", DType.Float32, 1, h, h, s, d, true, plan.Threads, plan.Path,
                ms, times.MinMs, times.MaxMs, times.Count, flops, peak)
            {
                Memory = times.Memory,
                Note = s == 65536 ? $"time(65536)/time(16384) = {t64 / t16:F2}; bar <= 4.4: {(t64 / t16 <= 4.4 ? "met" : "MISSED")}" : null,
            });
            advance();
        }
        status("dense causal S=65536");
        int sl = 65536;
        TensorView<float> qd = BenchCommand.RandomView<float>(4, 1, sl, h, d), kd = BenchCommand.RandomView<float>(5, 1, sl, h, d), vd = BenchCommand.RandomView<float>(6, 1, sl, h, d);
        var od = new TensorView<float>(new float[qd.ElementCount], 1, sl, h, d);
        BenchCommand.Timing dense = BenchCommand.Measure(() => Attention.Forward(qd, kd, vd, od, new AttentionOptions { Causal = true }, tuning: tuning), Math.Min(plan.Reps, 3));
        double dms = dense.MedianMs;
        var shape = AttentionShape.Of(qd, kd, vd);
        rows.Add(new BenchCommand.BenchRow("linear", "dense causal softmax", DType.Float32, 1, h, h, sl, d, true, plan.Threads, plan.Path,
            dms, dense.MinMs, dense.MaxMs, dense.Count, shape.CausalFlops, peak)
        {
            Memory = dense.Memory,
            SpeedupVsDense = 1.0,
            Note = $"linear is {dms / t64:F1}x faster at S=65536; bar >= 20x: {(dms / t64 >= 20 ? "met" : "MISSED")}",
        });
        advance();
        rows.AddRange(Table(plan, peak, h, d, tuning, status, advance));
        return rows;
    }

    /// <summary>Every map and hybrid at S = 4096 against dense softmax attention of the same causality.</summary>
    private static List<BenchCommand.BenchRow> Table(BenchCommand.BenchPlan plan, double peak, int h, int d, KernelTuning tuning, Action<string> status, Action advance)
    {
        var rows = new List<BenchCommand.BenchRow>();
        int s = TableLength;
        // Scaled inputs keep q·k/√D in the range where exp's Taylor and random-feature estimates are meant to work.
        TensorView<float> q = Scaled(BenchCommand.RandomView<float>(7, 1, s, h, d), 0.5f), k = Scaled(BenchCommand.RandomView<float>(8, 1, s, h, d), 0.5f);
        TensorView<float> v = BenchCommand.RandomView<float>(9, 1, s, h, d);
        var dense = new Dictionary<bool, (TensorView<float> Output, double Ms)>();
        foreach (bool causal in new[] { true, false })
        {
            status($"dense softmax S={s}{(causal ? " causal" : "")}");
            var o = new TensorView<float>(new float[q.ElementCount], 1, s, h, d);
            BenchCommand.Timing t = BenchCommand.Measure(() => Attention.Forward(q, k, v, o, new AttentionOptions { Causal = causal }, tuning: tuning), plan.Reps);
            dense[causal] = (o, t.MedianMs);
            var shape = AttentionShape.Of(q, k, v);
            rows.Add(new BenchCommand.BenchRow("linear", $"dense softmax{(causal ? " causal" : "")}", DType.Float32, 1, h, h, s, d, causal, plan.Threads, plan.Path,
                t.MedianMs, t.MinMs, t.MaxMs, t.Count, causal ? shape.CausalFlops : shape.DenseFlops, peak) { Memory = t.Memory, SpeedupVsDense = 1.0 });
            advance();
        }
        foreach (var (name, causal, run) in Methods())
        {
            status($"{name} S={s}");
            var o = new TensorView<float>(new float[q.ElementCount], 1, s, h, d);
            BenchCommand.Timing t = BenchCommand.Measure(() => run(q, k, v, o, tuning), plan.Reps);
            (TensorView<float> reference, double denseMs) = dense[causal];
            rows.Add(new BenchCommand.BenchRow("linear", name, DType.Float32, 1, h, h, s, d, causal, plan.Threads, plan.Path,
                t.MedianMs, t.MinMs, t.MaxMs, t.Count, 0, peak)
            {
                Memory = t.Memory,
                SpeedupVsDense = denseMs / t.MedianMs,
                RelativeL2 = Metrics.RelativeL2(o, reference),
                Cosine = Metrics.Cosine(o, reference),
                Note = "error = distance from softmax attention of the same causality",
            });
            advance();
        }
        return rows;
    }

    private static TensorView<float> Scaled(TensorView<float> x, float a)
    {
        float[] data = x.ToArray();
        for (int i = 0; i < data.Length; i++) data[i] *= a;
        return new TensorView<float>(data, [.. x.Shape]);
    }
}
