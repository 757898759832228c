using Attend.Reference;
using Attend.Tensors;

namespace Attend.Tests.Shared;

/// <summary>Seeded random inputs and error measures shared by the suites.</summary>
public static class TestData
{
    public static bool Extended => Environment.GetEnvironmentVariable("ATTEND_EXTENDED_TESTS") == "1";

    public static float[] Normal(long count, int seed, float std = 1f)
    {
        var rng = new Random(seed);
        var data = new float[count];
        for (long i = 0; i < count; i += 2)
        {
            double u1 = 1.0 - rng.NextDouble(), u2 = rng.NextDouble();
            double r = Math.Sqrt(-2 * Math.Log(u1));
            data[i] = (float)(r * Math.Cos(2 * Math.PI * u2) * std);
            if (i + 1 < count) data[i + 1] = (float)(r * Math.Sin(2 * Math.PI * u2) * std);
        }
        return data;
    }

    public static T[] Convert<T>(float[] data) where T : unmanaged
    {
        var result = new T[data.Length];
        for (int i = 0; i < data.Length; i++) result[i] = ElementConvert.FromSingle<T>(data[i]);
        return result;
    }

    public static TensorView<T> Random<T>(int seed, int b, int s, int h, int d, float std = 1f) where T : unmanaged =>
        new(Convert<T>(Normal((long)b * s * h * d, seed, std)), b, s, h, d);

    /// <summary>Max absolute difference between a view and the float64 reference output (NaN-aware: NaN must match NaN).</summary>
    public static double MaxError<T>(TensorView<T> actual, ReferenceResult expected) where T : unmanaged
    {
        AttentionShape s = expected.Shape;
        double max = 0;
        for (int b = 0; b < s.Batch; b++)
            for (int i = 0; i < s.QueryLength; i++)
                for (int h = 0; h < s.Heads; h++)
                    for (int d = 0; d < s.ValueDim; d++)
                    {
                        double a = ElementConvert.ToDouble(actual[b, i, h, d]), e = expected.At(b, i, h, d);
                        if (double.IsNaN(a) != double.IsNaN(e)) return double.PositiveInfinity;
                        if (!double.IsNaN(a)) max = Math.Max(max, Math.Abs(a - e));
                    }
        return max;
    }

    public static double MaxLseError(TensorView<float> actual, ReferenceResult expected)
    {
        AttentionShape s = expected.Shape;
        double max = 0;
        for (int b = 0; b < s.Batch; b++)
            for (int i = 0; i < s.QueryLength; i++)
                for (int h = 0; h < s.Heads; h++)
                {
                    double a = actual[b, i, h], e = expected.LseAt(b, i, h);
                    if (double.IsNegativeInfinity(e) || double.IsNegativeInfinity(a))
                    {
                        if (a != e) return double.PositiveInfinity;
                        continue;
                    }
                    max = Math.Max(max, Math.Abs(a - e));
                }
        return max;
    }
}
