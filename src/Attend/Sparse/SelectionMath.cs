using System.Runtime.Intrinsics;
using Attend.Cpu;

namespace Attend.Sparse;

/// <summary>Small numeric helpers the selectors share: softmax, budgets (top-k, cumulative mass), divergence.</summary>
internal static class SelectionMath
{
    /// <summary>In-place softmax of natural-log scores; −∞ entries get 0; an all −∞ row becomes all 0.</summary>
    public static void Softmax(Span<float> x)
    {
        if (x.IsEmpty) return;
        float max = float.NegativeInfinity;
        foreach (float s in x) max = Math.Max(max, s);
        if (float.IsNegativeInfinity(max))
        {
            x.Clear();
            return;
        }
        ExpShifted(x, max);
        double sum = 0;
        foreach (float e in x) sum += e;
        float inv = (float)(1.0 / sum);
        for (int i = 0; i < x.Length; i++) x[i] *= inv;
    }

    /// <summary>x ← exp(x − shift), vectorized (the executor's exp2 polynomial).</summary>
    public static unsafe void ExpShifted(Span<float> x, float shift)
    {
        const float log2e = 1.4426950408889634f;
        fixed (float* p = x)
        {
            if (Vector512.IsHardwareAccelerated) Exp<Vector512<float>, V512Ops>(p, x.Length, shift, log2e);
            else if (Vector256.IsHardwareAccelerated) Exp<Vector256<float>, V256Ops>(p, x.Length, shift, log2e);
            else Exp<float, ScalarOps>(p, x.Length, shift, log2e);
        }
    }

    private static unsafe void Exp<TV, TOps>(float* p, int n, float shift, float log2e) where TV : unmanaged where TOps : ISimd<TV>
    {
        int w = TOps.Count, i = 0;
        TV m = TOps.Broadcast(-shift * log2e), l = TOps.Broadcast(log2e);
        for (; i + w <= n; i += w) TOps.Store(p + i, TOps.Exp2(TOps.Fma(TOps.Load(p + i), l, m)));
        for (; i < n; i++) p[i] = MathF.Exp(p[i] - shift);
    }

    /// <summary>Indices of the <paramref name="count"/> largest entries, in descending score order (NaN last).</summary>
    public static int[] TopK(ReadOnlySpan<float> scores, int count)
    {
        count = Math.Clamp(count, 0, scores.Length);
        int[] order = Descending(scores);
        return order[..count];
    }

    /// <summary>
    /// The fewest entries, largest first, whose sum reaches <paramref name="fraction"/> of the total (SVG2's top-p,
    /// XAttention's and FlexPrefill's cumulative threshold), at least <paramref name="min"/> and at most
    /// <paramref name="max"/>. Entries must be ≥ 0.
    /// </summary>
    public static int[] CoverMass(ReadOnlySpan<float> scores, double fraction, int min = 1, int max = int.MaxValue)
    {
        int[] order = Descending(scores);
        if (fraction >= 1) return order[..Math.Min(order.Length, Math.Max(max, 0))];   // everything: no rounding can drop a tiny entry
        double total = 0;
        foreach (float s in scores) total += s;
        double target = fraction * total, sum = 0;
        int taken = 0;
        while (taken < order.Length && (taken < min || sum < target) && taken < max)
        {
            sum += scores[order[taken]];
            taken++;
        }
        return order[..taken];
    }

    /// <summary>Square-root Jensen–Shannon divergence of two distributions (natural log), FlexPrefill's pattern test.</summary>
    public static double SqrtJensenShannon(ReadOnlySpan<float> p, ReadOnlySpan<float> q)
    {
        double js = 0;
        for (int i = 0; i < p.Length; i++)
        {
            double a = Math.Max(p[i], 1e-12), b = Math.Max(q[i], 1e-12), m = (a + b) / 2;
            js += (0.5 * a * Math.Log(a / m)) + (0.5 * b * Math.Log(b / m));
        }
        return Math.Sqrt(Math.Max(js, 0));
    }

    private static int[] Descending(ReadOnlySpan<float> scores)
    {
        var keys = new float[scores.Length];
        var order = new int[scores.Length];
        for (int i = 0; i < scores.Length; i++)
        {
            keys[i] = float.IsNaN(scores[i]) ? float.PositiveInfinity : -scores[i];
            order[i] = i;
        }
        Array.Sort(keys, order);
        return order;
    }
}
