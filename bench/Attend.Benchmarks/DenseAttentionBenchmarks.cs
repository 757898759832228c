using Attend.Tensors;
using BenchmarkDotNet.Attributes;

namespace Attend.Benchmarks;

/// <summary>
/// Dense forward attention on the CPU per SIMD path. The user-facing numbers (with the FMA peak of the same run)
/// come from <c>attend bench</c>; this is for focused micro-benchmarking of the executor.
/// Run: <c>dotnet run -c Release --project bench/Attend.Benchmarks -- --filter *Dense*</c>.
/// </summary>
[MemoryDiagnoser]
public class DenseAttentionBenchmarks
{
    private TensorView<float> _q, _k, _v, _o;
    private AttentionOptions _options = AttentionOptions.Default;
    private KernelTuning _tuning = KernelTuning.Default;

    [Params(1024, 4096)]
    public int SeqLen { get; set; }

    [Params(64, 128)]
    public int HeadDim { get; set; }

    [Params(false, true)]
    public bool Causal { get; set; }

    [Params(KernelPath.Vector256, KernelPath.Vector512)]
    public KernelPath Path { get; set; }

    public int Heads { get; set; } = 8;

    [GlobalSetup]
    public void Setup()
    {
        _q = Random(1);
        _k = Random(2);
        _v = Random(3);
        _o = new TensorView<float>(new float[_q.ElementCount], 1, SeqLen, Heads, HeadDim);
        _options = new AttentionOptions { Causal = Causal };
        _tuning = new KernelTuning { Path = Path };
    }

    private TensorView<float> Random(int seed)
    {
        var rng = new Random(seed);
        var data = new float[SeqLen * Heads * HeadDim];
        for (int i = 0; i < data.Length; i++) data[i] = (float)(rng.NextDouble() * 2 - 1);
        return new TensorView<float>(data, 1, SeqLen, Heads, HeadDim);
    }

    [Benchmark]
    public void Forward() => Attention.Forward(_q, _k, _v, _o, _options, tuning: _tuning);
}
