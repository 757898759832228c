using Attend.Tensors;

namespace Attend.Reference;

/// <summary>The float64 result of <see cref="AttentionReference.Forward{T}"/>.</summary>
/// <param name="Shape">The problem's sizes.</param>
/// <param name="Output">[B, Sq, H, Dv] in C order.</param>
/// <param name="Lse">[B, Sq, H] natural-log log-sum-exp of the scores; −∞ for fully masked rows.</param>
public sealed record ReferenceResult(AttentionShape Shape, double[] Output, double[] Lse)
{
    /// <summary>Output element (b, i, h, d).</summary>
    public double At(int b, int i, int h, int d) =>
        Output[((((long)b * Shape.QueryLength + i) * Shape.Heads) + h) * Shape.ValueDim + d];

    /// <summary>LSE of row (b, i, h).</summary>
    public double LseAt(int b, int i, int h) => Lse[(((long)b * Shape.QueryLength) + i) * Shape.Heads + h];
}

/// <summary>
/// The executable specification of attention: a plain float64 implementation of every feature of
/// <see cref="AttentionOptions"/>, O(Sq·Skv) time per head and O(Skv) memory per row. Every kernel is tested
/// against it. Semantics are documented on <see cref="AttentionOptions"/>.
/// </summary>
public static class AttentionReference
{
    /// <summary>Computes attention in float64 from inputs of any supported element type.</summary>
    public static ReferenceResult Forward<T>(TensorView<T> q, TensorView<T> k, TensorView<T> v, AttentionOptions? options = null)
        where T : unmanaged
    {
        options ??= AttentionOptions.Default;
        AttentionShape s = AttentionShape.Of(q, k, v);
        double scale = s.Validate(options);
        var output = new double[(long)s.Batch * s.QueryLength * s.Heads * s.ValueDim];
        var lse = new double[(long)s.Batch * s.QueryLength * s.Heads];
        long offset = (long)s.KeyLength - s.QueryLength;
        Parallel.For(0, s.Batch * s.Heads, bh =>
        {
            int b = bh / s.Heads, h = bh % s.Heads, hk = h / s.GroupSize;
            double slope = s.AlibiSlope(options, b, h);
            var scores = new double[s.KeyLength];
            var allowed = new bool[s.KeyLength];
            for (int i = 0; i < s.QueryLength; i++)
            {
                double max = double.NegativeInfinity;
                bool any = false, nan = false;
                for (int j = 0; j < s.KeyLength; j++)
                {
                    allowed[j] = s.Allows(options, b, h, i, j);
                    if (!allowed[j]) continue;
                    double dot = 0;
                    for (int d = 0; d < s.HeadDim; d++)
                    {
                        dot += ElementConvert.ToDouble(q[b, i, h, d]) * ElementConvert.ToDouble(k[b, j, hk, d]);
                    }
                    double score = scale * dot;
                    if (options.Softcap > 0) score = options.Softcap * Math.Tanh(score / options.Softcap);
                    if (slope != 0) score -= slope * Math.Abs(i + offset - j);
                    if (!options.Bias.IsDefault) score += options.Bias[b, h, i, j];
                    scores[j] = score;
                    if (double.IsNaN(score)) nan = true;
                    else if (score > max) max = score;
                    any = true;
                }
                long row = (((long)b * s.QueryLength) + i) * s.Heads + h;
                if (!any || (max == double.NegativeInfinity && !nan))
                {
                    lse[row] = double.NegativeInfinity; // no key allowed: output stays 0
                    continue;
                }
                double sum = 0;
                var acc = new double[s.ValueDim];
                for (int j = 0; j < s.KeyLength; j++)
                {
                    if (!allowed[j]) continue;
                    double p = Math.Exp(scores[j] - max);
                    sum += p;
                    for (int d = 0; d < s.ValueDim; d++) acc[d] += p * ElementConvert.ToDouble(v[b, j, hk, d]);
                }
                for (int d = 0; d < s.ValueDim; d++) output[row * s.ValueDim + d] = acc[d] / sum;
                lse[row] = max + Math.Log(sum);
            }
        });
        return new ReferenceResult(s, output, lse);
    }
}
