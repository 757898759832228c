using Attend.Reference;
using Attend.Tensors;

namespace Attend.Tests.Shared;

/// <summary>Runs attention on some backend: (q, k, v, output, lse, options).</summary>
public delegate void AttentionRunner<T>(TensorView<T> q, TensorView<T> k, TensorView<T> v, TensorView<T> output, TensorView<float> lse, AttentionOptions options)
    where T : unmanaged;

/// <summary>
/// The backend-agnostic dense-attention suite: one table of cases and one check (error vs float64 ≤ 2 × the
/// naive same-precision error + 1e-6, LSE within 1e-4), linked into every backend's test project.
/// </summary>
public static class AttentionConformance
{
    /// <summary>(B, Sq, Skv, H, Hkv, D, causal): awkward sizes, GQA/MQA, Sq ≠ Skv both ways.</summary>
    public static TheoryData<int, int, int, int, int, int, bool> Shapes(int maxHeadDim = 256)
    {
        var data = new TheoryData<int, int, int, int, int, int, bool>();
        var rows = new List<(int, int, int, int, int, int)>
        {
            (1, 1, 1, 1, 1, 40), (1, 7, 7, 2, 1, 64), (2, 97, 97, 4, 2, 80), (1, 97, 257, 2, 2, 256),
            (1, 257, 97, 4, 1, 128), (1, 257, 257, 2, 2, 128), (1, 1, 1025, 2, 1, 64), (1, 65, 130, 3, 3, 7),
        };
        foreach (bool causal in new[] { false, true })
            foreach ((int b, int sq, int skv, int h, int hkv, int d) in rows)
                if (d <= maxHeadDim) data.Add(b, sq, skv, h, hkv, d, causal);
        data.Add(1, 1025, 1025, 1, 1, 64, true);
        if (TestData.Extended)
        {
            data.Add(2, 1025, 1025, 2, 1, 128, false);
            data.Add(1, 1025, 1025, 2, 2, 256, true);
        }
        return data;
    }

    /// <summary>
    /// Checks one case. <paramref name="computePrecision"/> is the element type the backend computes in when it
    /// differs from <typeparamref name="T"/> (the GPU rounds f32 inputs to bf16): the reference then sees the
    /// rounded inputs and the naive bound is that precision's.
    /// </summary>
    public static void Check<T>(int b, int sq, int skv, int h, int hkv, int d, AttentionOptions options, string label,
        AttentionRunner<T> run, DType? computePrecision = null) where T : unmanaged =>
        Check(b, sq, skv, h, hkv, d, options, [(label, run)], computePrecision);

    /// <summary>Checks one case on several runners (paths) against one reference.</summary>
    public static void Check<T>(int b, int sq, int skv, int h, int hkv, int d, AttentionOptions options,
        IReadOnlyList<(string Label, AttentionRunner<T> Run)> runners, DType? computePrecision = null) where T : unmanaged
    {
        int seed = HashCode.Combine(b, sq, skv, h, hkv, d, options.Causal) & 0xFFFF;
        TensorView<T> q = TestData.Random<T>(seed, b, sq, h, d);
        TensorView<T> k = TestData.Random<T>(seed + 1, b, skv, hkv, d);
        TensorView<T> v = TestData.Random<T>(seed + 2, b, skv, hkv, d);
        double naiveError;
        ReferenceResult expected;
        if (computePrecision == DType.BFloat16 && typeof(T) != typeof(BFloat16))
        {
            TensorView<BFloat16> qr = Round<T, BFloat16>(q), kr = Round<T, BFloat16>(k), vr = Round<T, BFloat16>(v);
            expected = AttentionReference.Forward(qr, kr, vr, options);
            naiveError = TestData.MaxError(new TensorView<BFloat16>(NaiveAttention.Forward(qr, kr, vr, options), b, sq, h, d), expected);
        }
        else
        {
            expected = AttentionReference.Forward(q, k, v, options);
            naiveError = TestData.MaxError(new TensorView<T>(NaiveAttention.Forward(q, k, v, options), b, sq, h, d), expected);
        }
        double bound = 2 * naiveError + 1e-6;
        foreach ((string label, AttentionRunner<T> run) in runners)
        {
            var o = new TensorView<T>(new T[(long)b * sq * h * d], b, sq, h, d);
            var lse = new TensorView<float>(new float[(long)b * sq * h], b, sq, h);
            run(q, k, v, o, lse, options);
            double error = TestData.MaxError(o, expected);
            string where = $"{label} {typeof(T).Name} seed={seed} B={b} Sq={sq} Skv={skv} H={h} Hkv={hkv} D={d} causal={options.Causal} softcap={options.Softcap}";
            Assert.True(error <= bound, $"{where}: max error {error:E3} > 2×naive {naiveError:E3} + 1e-6");
            double lseError = TestData.MaxLseError(lse, expected);
            Assert.True(lseError <= 1e-4 + 4 * naiveError, $"{where}: LSE error {lseError:E3}");
        }
    }

    private static TensorView<TOut> Round<TIn, TOut>(TensorView<TIn> x) where TIn : unmanaged where TOut : unmanaged =>
        new(x.ToArray().Select(e => ElementConvert.FromSingle<TOut>(ElementConvert.ToSingle(e))).ToArray(), x.Shape.ToArray());
}
