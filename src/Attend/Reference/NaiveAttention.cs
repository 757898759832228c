using Attend.Tensors;

namespace Attend.Reference;

/// <summary>
/// The "naive implementation in the same precision" of Attend's tolerance rule (a kernel's max error versus
/// float64 is at most 2× this one's, plus 1e-6): scores, softmax and P·V in float with every intermediate
/// (scores, probabilities, output) rounded to the element type, as an unfused PyTorch math implementation in that
/// dtype would. Single-threaded and O(Skv) memory per row; for tests and <c>attend verify</c>.
/// </summary>
public static class NaiveAttention
{
    /// <summary>Returns the output [B, Sq, H, Dv] in C order.</summary>
    public static T[] Forward<T>(TensorView<T> q, TensorView<T> k, TensorView<T> v, AttentionOptions? options = null) where T : unmanaged
    {
        options ??= AttentionOptions.Default;
        AttentionShape s = AttentionShape.Of(q, k, v);
        float scale = options.Scale ?? 1f / MathF.Sqrt(s.HeadDim);
        var o = new T[(long)s.Batch * s.QueryLength * s.Heads * s.ValueDim];
        long offset = (long)s.KeyLength - s.QueryLength;
        var scores = new float[s.KeyLength];
        for (int b = 0; b < s.Batch; b++)
            for (int h = 0; h < s.Heads; h++)
            {
                int hk = h / s.GroupSize;
                float slope = s.AlibiSlope(options, b, h);
                for (int i = 0; i < s.QueryLength; i++)
                {
                    float max = float.NegativeInfinity;
                    for (int j = 0; j < s.KeyLength; j++)
                    {
                        bool allowed = s.Allows(options, b, h, i, j);
                        if (!allowed) { scores[j] = float.NegativeInfinity; continue; }
                        float dot = 0;
                        for (int d = 0; d < s.HeadDim; d++) dot += ElementConvert.ToSingle(q[b, i, h, d]) * ElementConvert.ToSingle(k[b, j, hk, d]);
                        float x = Round<T>(dot * scale);
                        if (options.Softcap > 0) x = Round<T>(options.Softcap * MathF.Tanh(x / options.Softcap));
                        if (slope != 0) x -= slope * MathF.Abs(i + offset - j);
                        if (!options.Bias.IsDefault) x += options.Bias[b, h, i, j];
                        scores[j] = Round<T>(x);
                        max = MathF.Max(max, scores[j]);
                    }
                    if (float.IsNegativeInfinity(max)) continue;
                    float sum = 0;
                    for (int j = 0; j < s.KeyLength; j++) { scores[j] = MathF.Exp(scores[j] - max); sum += scores[j]; }
                    for (int j = 0; j < s.KeyLength; j++) scores[j] = Round<T>(scores[j] / sum);
                    for (int d = 0; d < s.ValueDim; d++)
                    {
                        float acc = 0;
                        for (int j = 0; j < s.KeyLength; j++) if (scores[j] != 0) acc += scores[j] * ElementConvert.ToSingle(v[b, j, hk, d]);
                        o[((((long)b * s.QueryLength + i) * s.Heads) + h) * s.ValueDim + d] = ElementConvert.FromSingle<T>(acc);
                    }
                }
            }
        return o;
    }

    private static float Round<T>(float x) where T : unmanaged => ElementConvert.ToSingle(ElementConvert.FromSingle<T>(x));
}
