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
        });
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
    }

    /// <summary>Per-worker buffers for one chunk.</summary>
    private sealed class Workspace(int chunk, int d, int f, int dv)
    {
        public readonly float[] X = new float[d];
        public readonly float[] PhiQ = new float[chunk * f];
        public readonly float[] PhiK = new float[chunk * f];
        public readonly float[] V = new float[chunk * dv];
        public readonly float[] A = new float[chunk * chunk];
        public readonly float[] State = new float[f * dv];     // Σ γ^(…) φ(k_j) v_jᵀ, [F, Dv]
        public readonly float[] Z = new float[f];              // Σ γ^(…) φ(k_j)
        public readonly float[] Out = new float[dv];
    }

    private static void LoadPhi(TensorView<float> t, int b, int pos, int head, FeatureMap map, float[] x, Span<float> phi, bool isQuery)
    {
        for (int c = 0; c < x.Length; c++) x[c] = t[b, pos, head, c];
        map.Apply<float>(x, phi, isQuery);
    }

    private static void NonCausalHead(TensorView<float> q, TensorView<float> k, TensorView<float> v, TensorView<float> o,
        int b, int h, int hk, AttentionShape s, LinearOptions options, Workspace w)
    {
        int f = w.Z.Length, dv = w.Out.Length;
        Array.Clear(w.State);
        Array.Clear(w.Z);
        Span<float> phi = w.PhiK.AsSpan(0, f);
        Span<float> value = w.V.AsSpan(0, dv);
        for (int j = 0; j < s.KeyLength; j++)
        {
            LoadPhi(k, b, j, hk, options.FeatureMap, w.X, phi, isQuery: false);
            for (int c = 0; c < dv; c++) value[c] = v[b, j, hk, c];
            for (int r = 0; r < f; r++)
            {
                Vectors.Axpy(phi[r], value, w.State.AsSpan(r * dv, dv));
                w.Z[r] += phi[r];
            }
        }
        Span<float> phiQ = w.PhiQ.AsSpan(0, f);
        for (int i = 0; i < s.QueryLength; i++)
        {
            LoadPhi(q, b, i, h, options.FeatureMap, w.X, phiQ, isQuery: true);
            Array.Clear(w.Out);
            for (int r = 0; r < f; r++) Vectors.Axpy(phiQ[r], w.State.AsSpan(r * dv, dv), w.Out);
            float den = options.Normalize ? Vectors.Dot(phiQ, w.Z) : 1f;
            Store(o, b, i, h, w.Out, den);
        }
    }

    private static void CausalHead(TensorView<float> q, TensorView<float> k, TensorView<float> v, TensorView<float> o,
        int b, int h, int hk, AttentionShape s, LinearOptions options, float decay, int chunk, Workspace w)
    {
        int f = w.Z.Length, dv = w.Out.Length, n = s.QueryLength;
        Array.Clear(w.State);
        Array.Clear(w.Z);
        Span<float> den = stackalloc float[1];
        for (int c0 = 0; c0 < n; c0 += chunk)
        {
            int len = Math.Min(chunk, n - c0);
            for (int t = 0; t < len; t++)
            {
                LoadPhi(q, b, c0 + t, h, options.FeatureMap, w.X, w.PhiQ.AsSpan(t * f, f), isQuery: true);
                LoadPhi(k, b, c0 + t, hk, options.FeatureMap, w.X, w.PhiK.AsSpan(t * f, f), isQuery: false);
                for (int c = 0; c < dv; c++) w.V[t * dv + c] = v[b, c0 + t, hk, c];
            }
            // Intra-chunk: A_tu = γ^(t−u) φ(q_t)·φ(k_u) for u ≤ t.
            for (int t = 0; t < len; t++)
            {
                ReadOnlySpan<float> pq = w.PhiQ.AsSpan(t * f, f);
                float g = 1f;
                for (int u = t; u >= 0; u--)
                {
                    w.A[t * chunk + u] = g * Vectors.Dot(pq, w.PhiK.AsSpan(u * f, f));
                    g *= decay;
                }
            }
            for (int t = 0; t < len; t++)
            {
                ReadOnlySpan<float> pq = w.PhiQ.AsSpan(t * f, f);
                Array.Clear(w.Out);
                // Inter-chunk: γ^(t+1) φ(q_t)ᵀ State, normalizer γ^(t+1) φ(q_t)·Z.
                float carry = MathF.Pow(decay, t + 1);
                for (int r = 0; r < f; r++) Vectors.Axpy(pq[r] * carry, w.State.AsSpan(r * dv, dv), w.Out);
                float normalizer = carry * Vectors.Dot(pq, w.Z);
                for (int u = 0; u <= t; u++)
                {
                    float a = w.A[t * chunk + u];
                    Vectors.Axpy(a, w.V.AsSpan(u * dv, dv), w.Out);
                    normalizer += a;
                }
                Store(o, b, c0 + t, h, w.Out, options.Normalize ? normalizer : 1f);
            }
            // State update: State ← γ^len State + Σ_u γ^(len−1−u) φ(k_u) v_uᵀ.
            float chunkDecay = MathF.Pow(decay, len);
            if (chunkDecay != 1f)
            {
                Vectors.Scale(w.State, chunkDecay);
                Vectors.Scale(w.Z, chunkDecay);
            }
            for (int u = 0; u < len; u++)
            {
                float g = MathF.Pow(decay, len - 1 - u);
                ReadOnlySpan<float> pk = w.PhiK.AsSpan(u * f, f);
                ReadOnlySpan<float> vu = w.V.AsSpan(u * dv, dv);
                for (int r = 0; r < f; r++)
                {
                    float coef = g * pk[r];
                    if (coef != 0f) Vectors.Axpy(coef, vu, w.State.AsSpan(r * dv, dv));
                    w.Z[r] += coef;
                }
            }
        }
    }

    private static void Store(TensorView<float> o, int b, int i, int h, float[] acc, float den)
    {
        float inv = den == 0f ? 0f : 1f / den;
        for (int c = 0; c < acc.Length; c++) o[b, i, h, c] = acc[c] * inv;
    }
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

    public static void Scale(Span<float> y, float a)
    {
        for (int i = 0; i < y.Length; i++) y[i] *= a;
    }
}
