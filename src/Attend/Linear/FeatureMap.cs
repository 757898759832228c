using System.Numerics;

namespace Attend.Linear;

/// <summary>
/// A feature map φ of linear attention: softmax(q·k) is replaced by φ(q)·φ(k) (Katharopoulos et al.,
/// arXiv:2006.16236), so attention costs O(S·F·Dv) instead of O(S²·D). Written once over the floating-point type so
/// the float64 reference and the float kernels apply exactly the same map.
/// </summary>
public abstract class FeatureMap
{
    /// <summary>Feature dimension F for head dimension <paramref name="headDim"/>.</summary>
    public abstract int FeatureDim(int headDim);

    /// <summary>Writes φ(x) (length <see cref="FeatureDim"/>) for one query or key vector x (length D).</summary>
    public abstract void Apply<T>(ReadOnlySpan<T> x, Span<T> phi, bool isQuery) where T : IFloatingPointIeee754<T>;

    /// <summary>φ(x) = elu(x) + 1 (Katharopoulos et al., arXiv:2006.16236): positive, F = D.</summary>
    public static FeatureMap EluPlusOne { get; } = new EluMap();

    /// <summary>φ(x) = relu(x) (SLAB's simplified linear attention, arXiv:2405.11582): F = D.</summary>
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
    /// Binary hashing codes with a Hamming kernel (EcoFormer-style, arXiv:2209.09004): bᵢ = sign(rᵢ·x) for m random
    /// projections; φ(q)·φ(k) = share of agreeing bits ∈ [0, 1]. F = m + 1.
    /// </summary>
    public static FeatureMap Hashing(int bits, int seed = 0) => new HashingMap(bits, seed);
}

internal sealed class EluMap : FeatureMap
{
    public override int FeatureDim(int headDim) => headDim;

    public override void Apply<T>(ReadOnlySpan<T> x, Span<T> phi, bool isQuery)
    {
        for (int i = 0; i < x.Length; i++) phi[i] = x[i] > T.Zero ? x[i] + T.One : T.Exp(x[i]);
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

    public override string ToString() => "taylor";
}

internal sealed class RandomFeatureMap : FeatureMap
{
    private readonly int _features, _seed;
    private double[]? _w;
    private int _wDim;

    public RandomFeatureMap(int features, int seed)
    {
        if (features < 1) throw new ArgumentOutOfRangeException(nameof(features), features, "feature dimension must be ≥ 1");
        _features = features;
        _seed = seed;
    }

    public override int FeatureDim(int headDim) => _features;

    private double[] Projections(int d)
    {
        double[]? w = _w;
        if (w is not null && _wDim == d) return w;
        var rng = new Random(_seed);
        w = new double[_features * d];
        for (int i = 0; i < w.Length; i++) w[i] = Gaussian.Next(rng);
        _wDim = d;
        _w = w;
        return w;
    }

    public override void Apply<T>(ReadOnlySpan<T> x, Span<T> phi, bool isQuery)
    {
        int d = x.Length;
        double[] w = Projections(d);
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

    public override string ToString() => $"random_features({_features})";
}

internal sealed class HashingMap : FeatureMap
{
    private readonly int _bits, _seed;

    public HashingMap(int bits, int seed)
    {
        if (bits < 1) throw new ArgumentOutOfRangeException(nameof(bits), bits, "code length must be ≥ 1");
        _bits = bits;
        _seed = seed;
    }

    public override int FeatureDim(int headDim) => _bits + 1;

    public override void Apply<T>(ReadOnlySpan<T> x, Span<T> phi, bool isQuery)
    {
        int d = x.Length;
        var rng = new Random(_seed);
        T half = T.One / T.CreateChecked(2);
        T bitScale = T.One / T.Sqrt(T.CreateChecked(2 * _bits));
        phi[0] = T.Sqrt(half);
        for (int f = 0; f < _bits; f++)
        {
            double dot = 0;
            for (int i = 0; i < d; i++) dot += (rng.NextDouble() * 2 - 1) * double.CreateChecked(x[i]);
            phi[1 + f] = dot >= 0 ? bitScale : -bitScale;
        }
    }

    public override string ToString() => $"hashing({_bits})";
}
