using Attend.Decode;
using Attend.Diagnostics;
using Attend.Tensors;

namespace Attend.Cli;

/// <summary>
/// <c>attend bench --suite decode</c>: one decode step (1 query token, 32 query heads / 8 kv heads, D = 128, f16 cache
/// of 131072 tokens by default) dense and with Quest at a 1/16 budget, against the stream-copy bandwidth measured in
/// the same run: the decoding issue's bars. Relative error of Quest vs dense is reported (random keys: a worst case).
/// </summary>
internal static class DecodeBench
{
    public const int Steps = 2;

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
        return rows;
    }
}
