using Attend.Cuda;
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
        { Backend = "cuda" };
    }
}
