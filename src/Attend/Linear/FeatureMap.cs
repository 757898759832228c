using System.Numerics;

namespace Attend.Linear;

/// <summary>
/// A feature map φ of linear attention: softmax(q·k) is replaced by φ(q)·φ(k) (Katharopoulos et al.,
/// arXiv:2006.16236), so attention costs O(S·F·Dv) instead of O(S²·D). The generic <see cref="Apply{T}"/> is the
/// specification (the float64 reference runs it); the kernels call the vectorized float overload, which computes the
/// same map.
/// </summary>
public abstract class FeatureMap
{
    /// <summary>Feature dimension F for head dimension <paramref name="headDim"/>.</summary>
    /// <exception cref="ArgumentException">when the map cannot take vectors of this dimension (given projections).</exception>
    public abstract int FeatureDim(int headDim);

    /// <summary>Writes φ(x) (length <see cref="FeatureDim"/>) for one query or key vector x (length D).</summary>
    public abstract void Apply<T>(ReadOnlySpan<T> x, Span<T> phi, bool isQuery) where T : IFloatingPointIeee754<T>;

    /// <summary>The float kernels' φ: vectorized where the map allows; the same values as <see cref="Apply{T}"/>.</summary>
    public virtual void Apply(ReadOnlySpan<float> x, Span<float> phi, bool isQuery) => Apply<float>(x, phi, isQuery);

    /// <summary>φ(x) = elu(x) + 1 (Katharopoulos et al., arXiv:2006.16236): positive, F = D.</summary>
    public static FeatureMap EluPlusOne { get; } = new EluMap();

    /// <summary>
    /// φ(x) = relu(x) (SLAB's simplified linear attention, arXiv:2405.11582): F = D. SLAB adds a depthwise convolution
    /// of the values to the output: <see cref="LinearOptions.ValueConv"/>.
    /// </summary>
    public static FeatureMap Relu { get; } = new ReluMap();

    /// <summary>φ(x) = x: plain (unnormalized) linear attention, F = D.</summary>
    public static FeatureMap Identity { get; } = new IdentityMap();

    /// <summary>
    /// Second-order Taylor expansion of exp(q·k/√D) (BASED, arXiv:2402.18668):
    /// φ(x) = [1, x/D^¼, (x⊗x)/(√2·√D)], so φ(q)·φ(k) = 1 + s + s²/2 with s = q·k/√D. F = 1 + D + D².
    /// </summary>
    public static FeatureMap Taylor { get; } = new TaylorMap();

    /// <summary>
    /// Positive random features for softmax (Performer FAVOR+, arXiv:2009.14794): φ(x) = exp(wᵢ·x' − |x'|²/2)/√m with
    /// x' = x/D^¼ and m Gaussian wᵢ drawn from <paramref name="seed"/>, so E[φ(q)·φ(k)] = exp(q·k/√D).
    /// </summary>
    public static FeatureMap RandomFeatures(int features, int seed = 0) => new RandomFeatureMap(features, seed);

    /// <summary>
    /// Random spectral features of a multi-resolution view, in the spirit of WERSA (Dentamaro, arXiv:2507.08637):
    /// x is taken to its orthonormal Haar wavelet coefficients along the head dimension, each scale is multiplied by
    /// its weight (<paramref name="scaleWeights"/>: detail levels finest first, then the final approximation; default
    /// all 1), and the result goes through positive random features. With unit weights the Haar transform is a
    /// rotation, so E[φ(q)·φ(k)] = exp(q·k/√D) as for <see cref="RandomFeatures"/>; other weights give
    /// exp(q̃·k̃/√D) with the scales re-weighted (WERSA learns them as scale gates; here they are given).
    /// </summary>
    public static FeatureMap WaveletRandomFeatures(int features, IReadOnlyList<double>? scaleWeights = null, int seed = 0) =>
        new WaveletFeatureMap(features, scaleWeights, seed);

    /// <summary>
    /// Binary hashing codes with a Hamming kernel (EcoFormer-style, arXiv:2209.09004): bᵢ = sign(rᵢ·x) for m random
    /// projections; φ(q)·φ(k) = share of agreeing bits ∈ [0, 1]. F = m + 1.
    /// </summary>
    public static FeatureMap Hashing(int bits, int seed = 0) => new HashingMap(bits, seed, null);

    /// <summary>
    /// EcoFormer's hashing with given (e.g. learned) hash functions: <paramref name="projections"/> holds
    /// <paramref name="bits"/> rows of D values; bᵢ = sign(rᵢ·x), φ(q)·φ(k) = share of agreeing bits. F = bits + 1.
    /// </summary>
    public static FeatureMap Hashing(ReadOnlySpan<float> projections, int bits)
    {
        if (bits < 1) throw new ArgumentOutOfRangeException(nameof(bits), bits, "code length must be ≥ 1");
        if (projections.Length == 0 || projections.Length % bits != 0)
        {
            throw new ArgumentException($"projections must hold bits × D values (bits = {bits}); got {projections.Length}", nameof(projections));
        }
        return new HashingMap(bits, 0, projections.ToArray());
    }
}

internal sealed class EluMap : FeatureMap
{
    public override int FeatureDim(int headDim) => headDim;

    public override void Apply<T>(ReadOnlySpan<T> x, Span<T> phi, bool isQuery)
    {
        for (int i = 0; i < x.Length; i++) phi[i] = x[i] > T.Zero ? x[i] + T.One : T.Exp(x[i]);
    }

    public override void Apply(ReadOnlySpan<float> x, Span<float> phi, bool isQuery)
    {
        // elu(x) + 1 = e^min(x, 0) + max(x, 0).
        int i = 0;
        for (; i <= x.Length - Vector<float>.Count; i += Vector<float>.Count)
        {
            var v = new Vector<float>(x[i..]);
            (Vector.Exp(Vector.Min(v, Vector<float>.Zero)) + Vector.Max(v, Vector<float>.Zero)).CopyTo(phi[i..]);
        }
        for (; i < x.Length; i++) phi[i] = x[i] > 0f ? x[i] + 1f : MathF.Exp(x[i]);
    }

    public override string ToString() => "elu+1";
}

internal sealed class ReluMap : FeatureMap
{
    public override int FeatureDim(int headDim) => headDim;

    public override void Apply<T>(ReadOnlySpan<T> x, Span<T> phi, bool isQuery)
    {
        for (int i = 0; i < x.Length; i++) phi[i] = T.Max(x[i], T.Zero);
    }

    public override void Apply(ReadOnlySpan<float> x, Span<float> phi, bool isQuery) => Vectors.Relu(x, phi);

    public override string ToString() => "relu";
}

internal sealed class IdentityMap : FeatureMap
{
    public override int FeatureDim(int headDim) => headDim;

    public override void Apply<T>(ReadOnlySpan<T> x, Span<T> phi, bool isQuery) => x.CopyTo(phi);

    public override string ToString() => "identity";
}

internal sealed class TaylorMap : FeatureMap
{
    public override int FeatureDim(int headDim) => 1 + headDim + (headDim * headDim);

    public override void Apply<T>(ReadOnlySpan<T> x, Span<T> phi, bool isQuery)
    {
        int d = x.Length;
        T rd = T.Sqrt(T.CreateChecked(d));
        T first = T.One / T.Sqrt(rd);                      // 1 / D^¼
        T second = T.One / (T.Sqrt(T.CreateChecked(2)) * rd);
        phi[0] = T.One;
        for (int i = 0; i < d; i++) phi[1 + i] = x[i] * first;
        int o = 1 + d;
        for (int i = 0; i < d; i++)
            for (int j = 0; j < d; j++) phi[o++] = x[i] * x[j] * second;
    }

    public override void Apply(ReadOnlySpan<float> x, Span<float> phi, bool isQuery)
    {
        int d = x.Length;
        float rd = MathF.Sqrt(d), first = 1f / MathF.Sqrt(rd), second = 1f / (MathF.Sqrt(2f) * rd);
        phi[0] = 1f;
        Vectors.Multiply(x, first, phi.Slice(1, d));
        // Row i of x⊗x is x scaled by x_i·second (the product order differs from the spec only by rounding).
        for (int i = 0; i < d; i++) Vectors.Multiply(x, x[i] * second, phi.Slice(1 + d + (i * d), d));
    }

    public override string ToString() => "taylor";
}

/// <summary>Gaussian projections drawn once per head dimension: float64 for the specification, scaled floats for the kernels.</summary>
internal sealed class GaussianProjections(int rows, int seed)
{
    private sealed record Drawn(int Dim, double[] W, float[] ScaledW);

    private Drawn? _drawn;

    /// <summary>rows × d Gaussian values (row-major), and the same multiplied by d^−¼ as floats.</summary>
    public (double[] W, float[] ScaledW) For(int d)
    {
        Drawn? drawn = _drawn;
        if (drawn is null || drawn.Dim != d)
        {
            var rng = new Random(seed);
            var w = new double[rows * d];
            for (int i = 0; i < w.Length; i++) w[i] = Gaussian.Next(rng);
            float scale = (float)Math.Pow(d, -0.25);
            drawn = new Drawn(d, w, w.Select(x => (float)x * scale).ToArray());
            _drawn = drawn;                                 // one reference write: readers see a whole Drawn
        }
        return (drawn.W, drawn.ScaledW);
    }
}

internal sealed class RandomFeatureMap : FeatureMap
{
    private readonly int _features;
    private readonly GaussianProjections _projections;

    public RandomFeatureMap(int features, int seed)
    {
        if (features < 1) throw new ArgumentOutOfRangeException(nameof(features), features, "feature dimension must be ≥ 1");
        _features = features;
        _projections = new GaussianProjections(features, seed);
    }

    public override int FeatureDim(int headDim) => _features;

    public override void Apply<T>(ReadOnlySpan<T> x, Span<T> phi, bool isQuery)
    {
        int d = x.Length;
        double[] w = _projections.For(d).W;
        double scale = Math.Pow(d, -0.25), norm = 0;
        for (int i = 0; i < d; i++) norm += double.CreateChecked(x[i]) * double.CreateChecked(x[i]) * scale * scale;
        double inv = 1 / Math.Sqrt(_features);
        for (int f = 0; f < _features; f++)
        {
            double dot = 0;
            for (int i = 0; i < d; i++) dot += w[f * d + i] * double.CreateChecked(x[i]) * scale;
            phi[f] = T.CreateChecked(Math.Exp(dot - norm / 2) * inv);
        }
    }

    public override void Apply(ReadOnlySpan<float> x, Span<float> phi, bool isQuery)
    {
        int d = x.Length;
        float[] w = _projections.For(d).ScaledW;
        float halfNorm = Vectors.Dot(x, x) / MathF.Sqrt(d) / 2;
        for (int f = 0; f < _features; f++) phi[f] = Vectors.Dot(w.AsSpan(f * d, d), x) - halfNorm;
        Vectors.ExpScaled(phi[.._features], 1f / MathF.Sqrt(_features));
    }

    public override string ToString() => $"random_features({_features})";
}

internal sealed class WaveletFeatureMap : FeatureMap
{
    private readonly RandomFeatureMap _features;
    private readonly double[]? _weights;
    private readonly int _count;

    public WaveletFeatureMap(int features, IReadOnlyList<double>? scaleWeights, int seed)
    {
        _features = new RandomFeatureMap(features, seed);
        _count = features;
        if (scaleWeights is not null)
        {
            if (scaleWeights.Count == 0 || scaleWeights.Any(x => !double.IsFinite(x)))
            {
                throw new ArgumentException("scale weights must be finite, one per Haar level and one for the approximation", nameof(scaleWeights));
            }
            _weights = [.. scaleWeights];
        }
    }

    /// <summary>Haar levels of a vector of length d: halve (rounding up) until one coefficient is left.</summary>
    internal static int Levels(int d)
    {
        int levels = 0;
        for (int n = d; n > 1; n = (n + 1) / 2) levels++;
        return levels;
    }

    public override int FeatureDim(int headDim)
    {
        if (_weights is not null && _weights.Length != Levels(headDim) + 1)
        {
            throw new ArgumentException($"scale weights: head dim {headDim} has {Levels(headDim)} Haar levels, so {Levels(headDim) + 1} weights are needed; got {_weights.Length}");
        }
        return _features.FeatureDim(headDim);
    }

    /// <summary>
    /// In-place orthonormal Haar transform, level by level: pairs (a, b) of the current approximation become
    /// ((a+b)/√2, (a−b)/√2); an odd last element passes to the next level unchanged. Coefficients of each level are
    /// multiplied by that level's weight.
    /// </summary>
    private void Transform<T>(Span<T> x, Span<T> scratch) where T : IFloatingPointIeee754<T>
    {
        T r = T.One / T.Sqrt(T.CreateChecked(2));
        int n = x.Length, level = 0, detailEnd = x.Length;
        while (n > 1)
        {
            int pairs = n / 2, next = (n + 1) / 2;
            for (int p = 0; p < pairs; p++)
            {
                scratch[p] = (x[2 * p] + x[(2 * p) + 1]) * r;
                scratch[next + p] = (x[2 * p] - x[(2 * p) + 1]) * r;
            }
            if ((n & 1) == 1) scratch[pairs] = x[n - 1];
            // Layout: [approximation (next) | details of this level (pairs) | coarser-to-finer details already written].
            int detailStart = detailEnd - pairs;
            T weight = _weights is null ? T.One : T.CreateChecked(_weights[level]);
            for (int p = 0; p < pairs; p++) x[detailStart + p] = scratch[next + p] * weight;
            scratch[..next].CopyTo(x);
            detailEnd = detailStart;
            n = next;
            level++;
        }
        if (_weights is not null) x[0] *= T.CreateChecked(_weights[level]);
    }

    public override void Apply<T>(ReadOnlySpan<T> x, Span<T> phi, bool isQuery)
    {
        FeatureDim(x.Length);
        var y = new T[x.Length];
        x.CopyTo(y);
        Transform<T>(y, new T[x.Length]);
        _features.Apply<T>(y, phi, isQuery);
    }

    public override void Apply(ReadOnlySpan<float> x, Span<float> phi, bool isQuery)
    {
        Span<float> y = x.Length <= 512 ? stackalloc float[2 * x.Length] : new float[2 * x.Length];
        x.CopyTo(y);
        Transform(y[..x.Length], y[x.Length..]);
        _features.Apply(y[..x.Length], phi, isQuery);
    }

    public override string ToString() => _weights is null ? $"wavelet_features({_count})" : $"wavelet_features({_count}, weights=[{string.Join(",", _weights)}])";
}

internal sealed class HashingMap : FeatureMap
{
    private sealed record Drawn(int Dim, double[] R);

    private readonly int _bits;
    private readonly int _seed;
    private readonly double[]? _given;
    private Drawn? _random;

    public HashingMap(int bits, int seed, float[]? given)
    {
        if (bits < 1) throw new ArgumentOutOfRangeException(nameof(bits), bits, "code length must be ≥ 1");
        _bits = bits;
        _seed = seed;
        _given = given is null ? null : Array.ConvertAll(given, x => (double)x);
    }

    public override int FeatureDim(int headDim)
    {
        if (_given is not null && _given.Length != _bits * headDim)
        {
            throw new ArgumentException($"the hash projections are {_bits} × {_given.Length / _bits}; head dim is {headDim}");
        }
        return _bits + 1;
    }

    /// <summary>The projections rᵢ (bits × d): given, or uniform in [−1, 1) from the seed, drawn once per d.</summary>
    private double[] Projections(int d)
    {
        if (_given is not null) return _given;
        Drawn? drawn = _random;
        if (drawn is null || drawn.Dim != d)
        {
            var rng = new Random(_seed);
            var r = new double[_bits * d];
            for (int i = 0; i < r.Length; i++) r[i] = (rng.NextDouble() * 2) - 1;
            drawn = new Drawn(d, r);
            _random = drawn;
        }
        return drawn.R;
    }

    public override void Apply<T>(ReadOnlySpan<T> x, Span<T> phi, bool isQuery)
    {
        int d = x.Length;
        FeatureDim(d);
        double[] r = Projections(d);
        T bitScale = T.One / T.Sqrt(T.CreateChecked(2 * _bits));
        phi[0] = T.Sqrt(T.One / T.CreateChecked(2));
        for (int f = 0; f < _bits; f++)
        {
            // The sign is taken in float64 whatever T is, so the float kernels and the reference agree bit for bit.
            double dot = 0;
            for (int i = 0; i < d; i++) dot += r[(f * d) + i] * double.CreateChecked(x[i]);
            phi[1 + f] = dot >= 0 ? bitScale : -bitScale;
        }
    }

    public override string ToString() => _given is null ? $"hashing({_bits})" : $"hashing({_bits}, given projections)";
}
