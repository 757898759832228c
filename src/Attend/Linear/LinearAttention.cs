using System.Numerics;
using Attend.Tensors;

namespace Attend.Linear;

/// <summary>What linear attention computes: o_i = Σ_{j} w_ij v_j (/ Σ_j w_ij when normalized), w_ij = γ^(i−j)·φ(q_i)·φ(k_j).</summary>
public sealed record LinearOptions
{
    /// <summary>The feature map φ (default elu+1).</summary>
    public FeatureMap FeatureMap { get; init; } = FeatureMap.EluPlusOne;

    /// <summary>Only keys j ≤ i (Sq = Skv required).</summary>
    public bool Causal { get; init; }

    /// <summary>Divide by Σ_j w_ij (default). A row whose normalizer is exactly 0 gives 0.</summary>
    public bool Normalize { get; init; } = true;

    /// <summary>Per-head decay γ ∈ (0, 1] (RetNet, arXiv:2307.08621), causal only; null: no decay.</summary>
    public IReadOnlyList<float>? Decay { get; init; }

    /// <summary>
    /// SLAB's depthwise-convolution term (Guo et al., arXiv:2405.11582, after FLatten Transformer): a depthwise
    /// convolution of the values along the sequence, added to the attention output; Sq = Skv. Null: none.
    /// </summary>
    public DepthwiseConv? ValueConv { get; init; }
}

/// <summary>
/// A depthwise 1-D convolution over the sequence, shared by all heads: per value channel c,
/// conv_t[c] = bias[c] + Σᵢ W[c, i]·v_{t − a + i}[c] with zero padding, where a = K − 1 for causal attention (taps
/// end at the current token) and a = (K − 1)/2 otherwise (centred; K odd).
/// </summary>
/// <param name="Weights">W, [Dv, K] row-major.</param>
/// <param name="Kernel">K ≥ 1.</param>
/// <param name="Bias">[Dv] or null.</param>
public sealed record DepthwiseConv(float[] Weights, int Kernel, float[]? Bias = null)
{
    /// <summary>Offset a of the first tap relative to the current token.</summary>
    internal int Anchor(bool causal) => causal ? Kernel - 1 : (Kernel - 1) / 2;

    internal void Validate(int valueDim, bool causal)
    {
        if (Kernel < 1) throw new ArgumentException($"ValueConv.Kernel must be ≥ 1; got {Kernel}", "options");
        if (!causal && Kernel % 2 == 0) throw new ArgumentException($"a centred (non-causal) ValueConv needs an odd kernel; got {Kernel}", "options");
        if (Weights is null || Weights.Length != valueDim * Kernel)
        {
            throw new ArgumentException($"ValueConv.Weights must be [Dv={valueDim}, K={Kernel}] = {valueDim * Kernel} values; got {Weights?.Length ?? 0}", "options");
        }
        if (Bias is not null && Bias.Length != valueDim) throw new ArgumentException($"ValueConv.Bias must hold Dv={valueDim} values; got {Bias.Length}", "options");
    }
}

/// <summary>
/// Linear attention on the CPU: non-causal (φ(K)ᵀV once, then per query) and causal chunked as Lightning Attention
/// (Qin et al., arXiv:2401.04658): within a chunk a masked quadratic product, across chunks a running state — no
/// cumulative sum over the sequence, O(S·(C·(F + Dv) + F·Dv)) time and O(F·Dv) state per head.
/// </summary>
public static class LinearAttention
{
    /// <summary>Computes linear attention: q [B, S, H, D], k [B, S, Hkv, D], v [B, S, Hkv, Dv] → output [B, S, H, Dv].</summary>
    public static void Forward(TensorView<float> q, TensorView<float> k, TensorView<float> v, TensorView<float> output,
        LinearOptions? options = null, KernelTuning? tuning = null)
    {
        options ??= new LinearOptions();
        tuning ??= KernelTuning.Default;
        AttentionShape s = AttentionShape.Of(q, k, v);
        s.RequireOutput(output, nameof(output));
        Validate(s, options, tuning);
        if (output.Overlaps(q) || output.Overlaps(k) || output.Overlaps(v))
        {
            throw new ArgumentException("output must not overlap q, k or v", nameof(output));
        }
        int f = options.FeatureMap.FeatureDim(s.HeadDim);
        int chunk = tuning.ChunkSize;
        TensorView<float> qv = q, kv = k, vv = v, ov = output;
        Cpu.WorkQueue.Run(s.Batch * s.Heads, tuning.EffectiveThreads, () => new Workspace(chunk, s.HeadDim, f, s.ValueDim), (i, w) =>
        {
            int b = i / s.Heads, h = i % s.Heads;
            float decay = options.Decay?[h] ?? 1f;
            if (options.Causal) CausalHead(qv, kv, vv, ov, b, h, h / s.GroupSize, s, options, decay, chunk, w);
            else NonCausalHead(qv, kv, vv, ov, b, h, h / s.GroupSize, s, options, w);
            if (options.ValueConv is { } conv) AddValueConv(vv, ov, b, h, h / s.GroupSize, s.QueryLength, conv, conv.Anchor(options.Causal), w.Out, w.V.AsSpan(0, s.ValueDim));
        });
    }

    /// <summary>o_t += conv_t of the value sequence of kv head <paramref name="hk"/> (SLAB's term), row by row.</summary>
    private static void AddValueConv(TensorView<float> v, TensorView<float> o, int b, int h, int hk, int n, DepthwiseConv conv, int anchor,
        Span<float> acc, Span<float> value)
    {
        int dv = acc.Length, kernel = conv.Kernel;
        for (int t = 0; t < n; t++)
        {
            o.CopyRow(b, t, h, acc);
            if (conv.Bias is { } bias) Vectors.Axpy(1f, bias, acc);
            for (int i = 0; i < kernel; i++)
            {
                int j = t - anchor + i;
                if (j < 0 || j >= n) continue;
                v.CopyRow(b, j, hk, value);
                for (int c = 0; c < dv; c++) acc[c] += conv.Weights[(c * kernel) + i] * value[c];
            }
            o.WriteRow(b, t, h, acc, 1f);
        }
    }

    /// <summary>
    /// Causal linear attention over keys at least <paramref name="lag"/> positions older than the query (j ≤ i − lag),
    /// unnormalized: <paramref name="numerators"/> [B, S, H, Dv] gets Σ w_ij v_j and <paramref name="denominators"/>
    /// [B, S, H] gets Σ w_ij — the linear half of BASED, whose exact window covers the younger keys.
    /// </summary>
    internal static void ForwardLagged(TensorView<float> q, TensorView<float> k, TensorView<float> v, TensorView<float> numerators,
        TensorView<float> denominators, FeatureMap map, int lag, KernelTuning tuning)
    {
        AttentionShape s = AttentionShape.Of(q, k, v);
        var options = new LinearOptions { FeatureMap = map, Causal = true, Normalize = false };
        Validate(s, options, tuning);
        int f = map.FeatureDim(s.HeadDim), chunk = tuning.ChunkSize;
        Cpu.WorkQueue.Run(s.Batch * s.Heads, tuning.EffectiveThreads, () => new Workspace(chunk, s.HeadDim, f, s.ValueDim), (i, w) =>
            CausalHead(q, k, v, numerators, i / s.Heads, i % s.Heads, (i % s.Heads) / s.GroupSize, s, options, 1f, chunk, w, lag, denominators));
    }

    internal static void Validate(AttentionShape s, LinearOptions options, KernelTuning tuning)
    {
        ArgumentNullException.ThrowIfNull(options.FeatureMap, nameof(options));
        if (options.FeatureMap.FeatureDim(s.HeadDim) < 1)
        {
            throw new ArgumentException($"the feature map gives feature dimension {options.FeatureMap.FeatureDim(s.HeadDim)}; it must be ≥ 1", nameof(options));
        }
        if (options.Causal && s.QueryLength != s.KeyLength)
        {
            throw new ArgumentException($"causal linear attention needs Sq = Skv; got Sq={s.QueryLength}, Skv={s.KeyLength}", nameof(options));
        }
        if (options.Decay is { } decay)
        {
            if (decay.Count != s.Heads) throw new ArgumentException($"Decay needs one γ per head (H={s.Heads}); got {decay.Count}", nameof(options));
            if (decay.Any(g => !(g > 0 && g <= 1))) throw new ArgumentException("Decay γ must be in (0, 1] (NaN is not)", nameof(options));
            if (!options.Causal) throw new ArgumentException("Decay applies to causal linear attention only", nameof(options));
        }
        if (tuning.ChunkSize < 1) throw new ArgumentException($"ChunkSize must be ≥ 1; got {tuning.ChunkSize}", nameof(tuning));
        if (options.ValueConv is { } conv)
        {
            conv.Validate(s.ValueDim, options.Causal);
            if (s.QueryLength != s.KeyLength) throw new ArgumentException($"ValueConv needs Sq = Skv; got Sq={s.QueryLength}, Skv={s.KeyLength}", nameof(options));
        }
    }

    /// <summary>Per-worker buffers for one chunk.</summary>
    private sealed class Workspace(int chunk, int d, int f, int dv)
    {
        public readonly float[] X = new float[d];
        public readonly float[] PhiQ = new float[chunk * f];     // [C, F]
        public readonly float[] PhiKT = new float[f * chunk];    // [F, C]: φ(K)ᵀ of the chunk
        public readonly float[] PhiK = new float[f];
        public readonly float[] V = new float[chunk * dv];       // [C, Dv]
        public readonly float[] A = new float[chunk * chunk];    // [C, C] masked, decayed φ(Q)φ(K)ᵀ
        public readonly float[] O = new float[chunk * dv];       // [C, Dv]
        public readonly float[] Den = new float[chunk];
        public readonly float[] State = new float[f * dv];       // Σ γ^(…) φ(k_j) v_jᵀ, [F, Dv]
        public readonly float[] Z = new float[f];                // Σ γ^(…) φ(k_j)
        public readonly float[] Out = new float[dv];
    }

    private static unsafe void NonCausalHead(TensorView<float> q, TensorView<float> k, TensorView<float> v, TensorView<float> o,
        int b, int h, int hk, AttentionShape s, LinearOptions options, Workspace w)
    {
        int f = w.Z.Length, dv = w.Out.Length, chunk = w.Den.Length;
        Array.Clear(w.State);
        Array.Clear(w.Z);
        fixed (float* phiQ = w.PhiQ, phiKT = w.PhiKT, vals = w.V, outp = w.O, state = w.State)
        {
            // State = Σ φ(k_j) v_jᵀ, a chunk of keys per product.
            for (int c0 = 0; c0 < s.KeyLength; c0 += chunk)
            {
                int len = Math.Min(chunk, s.KeyLength - c0);
                for (int t = 0; t < len; t++)
                {
                    k.CopyRow(b, c0 + t, hk, w.X);
                    options.FeatureMap.Apply(w.X, w.PhiK, isQuery: false);
                    for (int r = 0; r < f; r++)
                    {
                        phiKT[r * chunk + t] = w.PhiK[r];
                        w.Z[r] += w.PhiK[r];
                    }
                    v.CopyRow(b, c0 + t, hk, w.V.AsSpan(t * dv, dv));
                }
                MatMulAdd(phiKT, chunk, vals, dv, state, dv, f, len, dv);
            }
            // O = φQ·State, a chunk of queries per product.
            for (int c0 = 0; c0 < s.QueryLength; c0 += chunk)
            {
                int len = Math.Min(chunk, s.QueryLength - c0);
                for (int t = 0; t < len; t++)
                {
                    q.CopyRow(b, c0 + t, h, w.X);
                    options.FeatureMap.Apply(w.X, w.PhiQ.AsSpan(t * f, f), isQuery: true);
                }
                new Span<float>(outp, len * dv).Clear();
                MatMulAdd(phiQ, f, state, dv, outp, dv, len, f, dv);
                for (int t = 0; t < len; t++)
                {
                    float den = options.Normalize ? Vectors.Dot(w.PhiQ.AsSpan(t * f, f), w.Z) : 1f;
                    o.WriteRow(b, c0 + t, h, new ReadOnlySpan<float>(outp + t * dv, dv), den == 0f ? 0f : 1f / den);
                }
            }
        }
    }

    /// <summary>
    /// One head, chunk by chunk, as small matrix products: O = (φQ·State)·γ^(t+1) + (A ⊙ decay mask)·V with
    /// A = φQ·φKᵀ, then State ← γ^C·State + φKᵀ·(decayed V).
    /// </summary>
    private static unsafe void CausalHead(TensorView<float> q, TensorView<float> k, TensorView<float> v, TensorView<float> o,
        int b, int h, int hk, AttentionShape s, LinearOptions options, float decay, int chunk, Workspace w,
        int lag = 0, TensorView<float> denominators = default)
    {
        int f = w.Z.Length, dv = w.Out.Length, n = s.QueryLength;
        Array.Clear(w.State);
        Array.Clear(w.Z);
        fixed (float* phiQ = w.PhiQ, phiKT = w.PhiKT, vals = w.V, a = w.A, outp = w.O, state = w.State)
        {
            for (int c0 = 0; c0 < n; c0 += chunk)
            {
                int len = Math.Min(chunk, n - c0);
                for (int t = 0; t < len; t++)
                {
                    q.CopyRow(b, c0 + t, h, w.X);
                    options.FeatureMap.Apply(w.X, w.PhiQ.AsSpan(t * f, f), isQuery: true);
                    // Lagged (BASED): position t of the chunk holds key c0 + t − lag; keys before the sequence add nothing.
                    int j = c0 + t - lag;
                    if (j < 0)
                    {
                        for (int r = 0; r < f; r++) phiKT[r * chunk + t] = 0f;
                        w.V.AsSpan(t * dv, dv).Clear();
                        continue;
                    }
                    k.CopyRow(b, j, hk, w.X);
                    options.FeatureMap.Apply(w.X, w.PhiK, isQuery: false);
                    for (int r = 0; r < f; r++) phiKT[r * chunk + t] = w.PhiK[r];
                    v.CopyRow(b, j, hk, w.V.AsSpan(t * dv, dv));
                }
                // Inter-chunk: O = φQ·State scaled by γ^(t+1) per row; normalizer γ^(t+1)·φ(q_t)·z.
                new Span<float>(outp, len * dv).Clear();
                MatMulAdd(phiQ, f, state, dv, outp, dv, len, f, dv);
                for (int t = 0; t < len; t++)
                {
                    float carry = decay == 1f ? 1f : MathF.Pow(decay, t + 1);
                    if (carry != 1f) Vectors.Scale(new Span<float>(outp + t * dv, dv), carry);
                    w.Den[t] = carry * Vectors.Dot(w.PhiQ.AsSpan(t * f, f), w.Z);
                }
                // Intra-chunk: A = φQ·φKᵀ, masked to u ≤ t and decayed by γ^(t−u); O += A·V.
                new Span<float>(a, len * chunk).Clear();
                MatMulAdd(phiQ, f, phiKT, chunk, a, chunk, len, f, len);
                for (int t = 0; t < len; t++)
                {
                    float* row = a + t * chunk;
                    float g = 1f, sum = 0f;
                    for (int u = t; u >= 0; u--)
                    {
                        row[u] *= g;
                        sum += row[u];
                        g *= decay;
                    }
                    new Span<float>(row + t + 1, len - t - 1).Clear();
                    w.Den[t] += sum;
                }
                MatMulAdd(a, chunk, vals, dv, outp, dv, len, len, dv);
                for (int t = 0; t < len; t++)
                {
                    float den = options.Normalize ? w.Den[t] : 1f;
                    o.WriteRow(b, c0 + t, h, new ReadOnlySpan<float>(outp + t * dv, dv), den == 0f ? 0f : 1f / den);
                    if (!denominators.IsDefault) denominators[b, c0 + t, h] = w.Den[t];
                }
                // State ← γ^len·State + φKᵀ·(γ^(len−1−u)·v_u); z likewise.
                if (decay != 1f)
                {
                    Vectors.Scale(w.State, MathF.Pow(decay, len));
                    Vectors.Scale(w.Z, MathF.Pow(decay, len));
                    for (int u = 0; u < len; u++) Vectors.Scale(w.V.AsSpan(u * dv, dv), MathF.Pow(decay, len - 1 - u));
                }
                MatMulAdd(phiKT, chunk, vals, dv, state, dv, f, len, dv);
                for (int r = 0; r < f; r++)
                {
                    float zr = 0f;
                    for (int u = 0; u < len; u++) zr += phiKT[r * chunk + u] * (decay == 1f ? 1f : MathF.Pow(decay, len - 1 - u));
                    w.Z[r] += zr;
                }
            }
        }
    }

    /// <summary>C[m×n] += A[m×kk]·B[kk×n] (row-major, leading dimensions given).</summary>
    private static unsafe void MatMulAdd(float* aM, int lda, float* bM, int ldb, float* cM, int ldc, int m, int kk, int n) =>
        Sparse.SmallGemm.MultiplyAdd(aM, lda, bM, ldb, cM, ldc, m, kk, n);
}

/// <summary>Small vectorized span kernels for the linear-attention loops.</summary>
internal static class Vectors
{
    public static float Dot(ReadOnlySpan<float> x, ReadOnlySpan<float> y)
    {
        int i = 0;
        var acc = Vector<float>.Zero;
        for (; i <= x.Length - Vector<float>.Count; i += Vector<float>.Count)
        {
            acc += new Vector<float>(x[i..]) * new Vector<float>(y[i..]);
        }
        float sum = Vector.Sum(acc);
        for (; i < x.Length; i++) sum += x[i] * y[i];
        return sum;
    }

    /// <summary>y += a·x.</summary>
    public static void Axpy(float a, ReadOnlySpan<float> x, Span<float> y)
    {
        int i = 0;
        var va = new Vector<float>(a);
        for (; i <= x.Length - Vector<float>.Count; i += Vector<float>.Count)
        {
            (new Vector<float>(y[i..]) + va * new Vector<float>(x[i..])).CopyTo(y[i..]);
        }
        for (; i < x.Length; i++) y[i] += a * x[i];
    }

    public static void Scale(Span<float> y, float a) => Multiply(y, a, y);

    /// <summary>y = a·x (y may be x).</summary>
    public static void Multiply(ReadOnlySpan<float> x, float a, Span<float> y)
    {
        int i = 0;
        var va = new Vector<float>(a);
        for (; i <= x.Length - Vector<float>.Count; i += Vector<float>.Count) (new Vector<float>(x[i..]) * va).CopyTo(y[i..]);
        for (; i < x.Length; i++) y[i] = x[i] * a;
    }

    /// <summary>y = max(x, 0).</summary>
    public static void Relu(ReadOnlySpan<float> x, Span<float> y)
    {
        int i = 0;
        for (; i <= x.Length - Vector<float>.Count; i += Vector<float>.Count) Vector.Max(new Vector<float>(x[i..]), Vector<float>.Zero).CopyTo(y[i..]);
        for (; i < x.Length; i++) y[i] = MathF.Max(x[i], 0f);
    }

    /// <summary>y = a·e^y in place.</summary>
    public static void ExpScaled(Span<float> y, float a)
    {
        int i = 0;
        var va = new Vector<float>(a);
        for (; i <= y.Length - Vector<float>.Count; i += Vector<float>.Count) (Vector.Exp(new Vector<float>(y[i..])) * va).CopyTo(y[i..]);
        for (; i < y.Length; i++) y[i] = MathF.Exp(y[i]) * a;
    }
}
