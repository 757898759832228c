using Attend.Tensors;

namespace Attend.Linear;

/// <summary>
/// Float64 specification of linear attention: the quadratic masked form o_i = Σ_j w_ij v_j (/ Σ_j w_ij) with
/// w_ij = γ^(i−j)·φ(q_i)·φ(k_j) over all j (non-causal) or j ≤ i (causal), φ applied in float64, plus the value
/// convolution when the options carry one.
/// </summary>
public static class LinearReference
{
    /// <summary>Output [B, S, H, Dv] in C order.</summary>
    public static double[] Forward(TensorView<float> q, TensorView<float> k, TensorView<float> v, LinearOptions? options = null)
    {
        options ??= new LinearOptions();
        AttentionShape s = AttentionShape.Of(q, k, v);
        LinearAttention.Validate(s, options, KernelTuning.Default);
        int f = options.FeatureMap.FeatureDim(s.HeadDim);
        var output = new double[(long)s.Batch * s.QueryLength * s.Heads * s.ValueDim];
        Parallel.For(0, s.Batch * s.Heads, bh =>
        {
            int b = bh / s.Heads, h = bh % s.Heads, hk = h / s.GroupSize;
            double decay = options.Decay?[h] ?? 1.0;
            var phiK = new double[s.KeyLength * f];
            var x = new double[s.HeadDim];
            for (int j = 0; j < s.KeyLength; j++)
            {
                for (int c = 0; c < s.HeadDim; c++) x[c] = k[b, j, hk, c];
                options.FeatureMap.Apply<double>(x, phiK.AsSpan(j * f, f), isQuery: false);
            }
            var phiQ = new double[f];
            var acc = new double[s.ValueDim];
            for (int i = 0; i < s.QueryLength; i++)
            {
                for (int c = 0; c < s.HeadDim; c++) x[c] = q[b, i, h, c];
                options.FeatureMap.Apply<double>(x, phiQ, isQuery: true);
                Array.Clear(acc);
                double den = 0;
                int last = options.Causal ? i : s.KeyLength - 1;
                for (int j = 0; j <= last; j++)
                {
                    double wgt = 0;
                    for (int r = 0; r < f; r++) wgt += phiQ[r] * phiK[j * f + r];
                    if (decay != 1.0) wgt *= Math.Pow(decay, i - j);
                    den += wgt;
                    for (int c = 0; c < s.ValueDim; c++) acc[c] += wgt * v[b, j, hk, c];
                }
                double inv = !options.Normalize ? 1 : den == 0 ? 0 : 1 / den;
                long row = (((long)b * s.QueryLength) + i) * s.Heads + h;
                for (int c = 0; c < s.ValueDim; c++) output[row * s.ValueDim + c] = acc[c] * inv;
                if (options.ValueConv is { } conv)
                {
                    int anchor = conv.Anchor(options.Causal);
                    for (int c = 0; c < s.ValueDim; c++)
                    {
                        double sum = conv.Bias?[c] ?? 0;
                        for (int t = 0; t < conv.Kernel; t++)
                        {
                            int j = i - anchor + t;
                            if (j >= 0 && j < s.KeyLength) sum += (double)conv.Weights[(c * conv.Kernel) + t] * v[b, j, hk, c];
                        }
                        output[row * s.ValueDim + c] += sum;
                    }
                }
            }
        });
        return output;
    }
}
