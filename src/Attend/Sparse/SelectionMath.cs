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
        float max = Max(x);
        if (float.IsNegativeInfinity(max))
        {
            x.Clear();
            return;
        }
        ExpShifted(x, max);
        double sum = 0;
        foreach (float e in x) sum += e;
        Linear.Vectors.Scale(x, (float)(1.0 / sum));
    }

    /// <summary>The largest entry (NaN if any is NaN, as Math.Max folds).</summary>
    public static float Max(ReadOnlySpan<float> x)
    {
        int i = 0;
        float max = float.NegativeInfinity;
        if (Vector256.IsHardwareAccelerated && x.Length >= Vector256<float>.Count)
        {
            Vector256<float> m = Vector256.Create(float.NegativeInfinity);
            Vector256<float> nan = Vector256<float>.Zero;
            for (; i <= x.Length - Vector256<float>.Count; i += Vector256<float>.Count)
            {
                Vector256<float> v = Vector256.Create(x.Slice(i, Vector256<float>.Count));
                m = Vector256.Max(m, v);
                nan |= ~Vector256.Equals(v, v);
            }
            if (nan != Vector256<float>.Zero) return float.NaN;
            for (int l = 0; l < Vector256<float>.Count; l++) max = Math.Max(max, m[l]);
        }
        for (; i < x.Length; i++) max = Math.Max(max, x[i]);
        return max;
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
        double total = 0;
        foreach (float s in scores) total += s;
        double target = fraction * total;
        if (fraction < 1 && scores.Length >= 4096 && double.IsFinite(total) && Candidates(scores, target, min) is { } candidates)
        {
            // Only the entries that can be taken are sorted (FlexPrefill's query-aware heads cover 512 × 512 block
            // scores: sorting all of them was ≈ 15 ms a head at S = 32768). Same sums in the same order as below.
            int[] order = Descending(scores, candidates);
            int taken = Take(scores, order, target, min, max);
            if (taken < order.Length || taken >= max || (taken >= min && Sum(scores, order, taken) >= target)) return order[..taken];
        }
        int[] all = Descending(scores);
        if (fraction >= 1) return all[..Math.Min(all.Length, Math.Max(max, 0))];   // everything: no rounding can drop a tiny entry
        return all[..Take(scores, all, target, min, max)];
    }

    private static int Take(ReadOnlySpan<float> scores, int[] order, double target, int min, int max)
    {
        double sum = 0;
        int taken = 0;
        while (taken < order.Length && (taken < min || sum < target) && taken < max)
        {
            sum += scores[order[taken]];
            taken++;
        }
        return taken;
    }

    private static double Sum(ReadOnlySpan<float> scores, int[] order, int count)
    {
        double sum = 0;
        for (int i = 0; i < count; i++) sum += scores[order[i]];
        return sum;
    }

    /// <summary>
    /// A superset of what <see cref="CoverMass"/> takes, as every entry at or above a value: one pass builds a
    /// histogram of the values' float bits (8 exponent and 3 mantissa bits: buckets 1/8 wide relative), the buckets
    /// are walked from the top until they hold the target mass (with a margin for summation order) and
    /// <paramref name="min"/> entries. Null when no such value exists below the top (then sort everything).
    /// </summary>
    private static List<int>? Candidates(ReadOnlySpan<float> scores, double target, int min)
    {
        const int shift = 20, buckets = (0x7F800000 >> shift) + 1;    // the last bucket: +∞ and NaN
        var mass = new double[buckets];
        var count = new int[buckets];
        foreach (float s in scores)
        {
            int b = Bucket(s);
            mass[b] += s > 0 ? s : 0;
            count[b]++;
        }
        double covered = 0, wanted = target * (1 + 1e-9);
        int taken = 0, edge = buckets - 1;
        for (; edge >= 0; edge--)
        {
            covered += mass[edge];
            taken += count[edge];
            if (covered >= wanted && taken >= min) break;
        }
        if (edge <= 0) return null;
        var result = new List<int>(taken);
        for (int i = 0; i < scores.Length; i++)
            if (Bucket(scores[i]) >= edge) result.Add(i);
        return result;

        static int Bucket(float s)
        {
            int bits = BitConverter.SingleToInt32Bits(s);
            return bits < 0 ? 0 : Math.Min(bits, 0x7F800000) >> shift;   // negatives (−0) with zero; NaN with +∞
        }
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

    private static int[] Descending(ReadOnlySpan<float> scores, List<int>? subset = null)
    {
        int n = subset?.Count ?? scores.Length;
        var keys = new float[n];
        var order = new int[n];
        for (int i = 0; i < n; i++)
        {
            int index = subset is null ? i : subset[i];
            keys[i] = float.IsNaN(scores[index]) ? float.PositiveInfinity : -scores[index];
            order[i] = index;
        }
        Array.Sort(keys, order);
        return order;
    }
}
