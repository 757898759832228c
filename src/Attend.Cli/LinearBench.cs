using Attend.Linear;
using Attend.Tensors;

namespace Attend.Cli;

/// <summary>
/// <c>attend bench --suite linear</c>: causal chunked linear attention (elu+1) at S = 16384 and 65536 against dense
/// causal softmax attention at 65536, same run (B=1, H=8, D=64 by default): the linear issue's bars.
/// </summary>
internal static class LinearBench
{
    public const int Steps = 3;

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
        return rows;
    }
}
