using Attend.Tensors;

namespace Attend.Sparse;

/// <summary>A planted (query, key) pair whose attention should be found: the query's answer is that one key.</summary>
public readonly record struct Needle(int Batch, int Head, int Query, int Key);

/// <summary>
/// What <see cref="StructuredInputs.Generate"/> plants, each as a target contribution to the scaled score (logit)
/// q·k/√D; 0 disables a component. Positions are random per (batch, kv head) from <see cref="Seed"/>, and each
/// head's strengths are scaled by a random factor in [0.8, 1.2] so heads differ as they do in trained models.
/// </summary>
public sealed record StructureOptions
{
    /// <summary>The default mix: every component on.</summary>
    public static StructureOptions Default { get; } = new();

    /// <summary>Random seed; the same seed gives the same tensors.</summary>
    public int Seed { get; init; } = 1;

    /// <summary>Std of the unstructured logit noise (default 1).</summary>
    public double Noise { get; init; } = 1;

    /// <summary>Logit of the attention sinks (the first <see cref="SinkCount"/> keys) for every query (default 8).</summary>
    public double Sinks { get; init; } = 8;

    /// <summary>Number of sink keys (default 4).</summary>
    public int SinkCount { get; init; } = 4;

    /// <summary>Peak logit of the local band around the diagonal (default 10).</summary>
    public double Local { get; init; } = 10;

    /// <summary>Approximate half-width of the local band in tokens (default 64).</summary>
    public int LocalWidth { get; init; } = 64;

    /// <summary>Logit of the vertical stripes (globally important keys) for every query (default 5).</summary>
    public double Verticals { get; init; } = 5;

    /// <summary>Vertical keys per 1024 tokens (default 2).</summary>
    public double VerticalsPer1024 { get; init; } = 2;

    /// <summary>Peak logit of a slash diagonal at a random offset per head (default 7).</summary>
    public double Slashes { get; init; } = 7;

    /// <summary>Logit of a retrieval needle: a short span of queries attends one distant key (default 12).</summary>
    public double Needles { get; init; } = 12;

    /// <summary>Needles per head (default 8).</summary>
    public int NeedleCount { get; init; } = 8;

    /// <summary>Consecutive queries that ask for one needle — the question attending its answer (default 64).</summary>
    public int NeedleQuerySpan { get; init; } = 64;

    /// <summary>Logit shared by tokens of the same cluster: segments of <see cref="ClusterSegment"/> tokens drawn from <see cref="ClusterCount"/> clusters (video-like blocks; default 3).</summary>
    public double Clusters { get; init; } = 3;

    /// <summary>Tokens per cluster segment (default 256).</summary>
    public int ClusterSegment { get; init; } = 256;

    /// <summary>Number of clusters (default 16).</summary>
    public int ClusterCount { get; init; } = 16;

    /// <summary>
    /// Parses a structure spec: <c>default</c>, or comma-separated components to keep on (others off):
    /// <c>sinks, local, verticals, slashes, needles, clusters</c>, optionally with a strength (<c>local=10</c>).
    /// </summary>
    public static StructureOptions Parse(string spec, int seed = 1)
    {
        ArgumentNullException.ThrowIfNull(spec);
        if (spec.Trim() is "default" or "") return Default with { Seed = seed };
        var o = new StructureOptions { Seed = seed, Sinks = 0, Local = 0, Verticals = 0, Slashes = 0, Needles = 0, Clusters = 0 };
        foreach (string part in spec.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
        {
            string[] kv = part.Split('=', 2);
            double? value = kv.Length == 2
                ? double.TryParse(kv[1], System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture, out double v) && double.IsFinite(v) && v >= 0 ? v
                    : throw new ArgumentException($"structure component '{part}': strength must be a finite number ≥ 0", nameof(spec))
                : null;
            o = kv[0] switch
            {
                "sinks" => o with { Sinks = value ?? Default.Sinks },
                "local" => o with { Local = value ?? Default.Local },
                "verticals" => o with { Verticals = value ?? Default.Verticals },
                "slashes" => o with { Slashes = value ?? Default.Slashes },
                "needles" => o with { Needles = value ?? Default.Needles },
                "clusters" => o with { Clusters = value ?? Default.Clusters },
                "noise" => o with { Noise = value ?? Default.Noise },
                _ => throw new ArgumentException($"unknown structure component '{kv[0]}'; expected default or any of sinks, local, verticals, slashes, needles, clusters, noise", nameof(spec)),
            };
        }
        return o;
    }
}

/// <summary>
/// Synthetic q/k/v with controllable, realistic attention structure, for judging sparse methods: random Gaussian
/// inputs give near-uniform attention on which every sparse method looks bad. Each component owns a few coordinates
/// of the head dimension (so components do not interfere): sinks and verticals one each, the local band and the
/// slash rotary-style sinusoid pairs (a sum of cosines of the position difference peaks at offset 0 or at the
/// slash offset), needles and clusters small random subspaces; the remaining coordinates carry Gaussian noise.
/// </summary>
public static class StructuredInputs
{
    /// <summary>Smallest head dimension the generator can lay its components out in.</summary>
    public const int MinHeadDim = 32;

    /// <summary>Generates q [B, S, H, D], k and v [B, S, Hkv, D] (float32) and the planted needles.</summary>
    public static (TensorView<float> Q, TensorView<float> K, TensorView<float> V, IReadOnlyList<Needle> Needles) Generate(
        int batch, int length, int heads, int kvHeads, int headDim, StructureOptions? options = null)
    {
        options ??= StructureOptions.Default;
        if (batch < 1 || length < 1 || heads < 1 || kvHeads < 1 || heads % kvHeads != 0)
        {
            throw new ArgumentException($"need B, S, H, Hkv ≥ 1 with Hkv dividing H; got B={batch}, S={length}, H={heads}, Hkv={kvHeads}");
        }
        if (headDim < MinHeadDim) throw new ArgumentException($"the structured generator needs D ≥ {MinHeadDim}; got {headDim}", nameof(headDim));
        if (options.SinkCount < 0 || options.LocalWidth < 1 || options.VerticalsPer1024 < 0 || options.NeedleCount < 0 || options.ClusterSegment < 1 || options.ClusterCount < 1)
        {
            throw new ArgumentException("structure counts must be ≥ 0 and LocalWidth, ClusterSegment, ClusterCount ≥ 1", nameof(options));
        }
        var q = new float[(long)batch * length * heads * headDim];
        var k = new float[(long)batch * length * kvHeads * headDim];
        var v = new float[k.Length];
        var layout = new Layout(headDim);
        int group = heads / kvHeads;
        // Each (batch, kv head) draws from its own seeded generator and writes its own rows, so they run in parallel
        // with the same result (at S = 131072, H = 32 the tensors hold 1.6 billion draws).
        var needlesOf = new List<Needle>[batch * kvHeads];
        Parallel.For(0, batch * kvHeads, index =>
        {
            int b = index / kvHeads, g = index % kvHeads;
            var rng = new Random(unchecked((options.Seed * 1_000_003) + (b * 7919) + g)); // not HashCode.Combine: it is seeded per process
            var plan = new HeadPlan(rng, length, layout, options);
            var found = new List<Needle>();
            for (int j = 0; j < length; j++)
            {
                plan.Key(j, rng, Row(k, b, j, g, length, kvHeads, headDim));
                Span<float> vr = Row(v, b, j, g, length, kvHeads, headDim);
                for (int c = 0; c < headDim; c++) vr[c] = (float)Gaussian.Next(rng);
            }
            for (int hq = 0; hq < group; hq++)
            {
                int h = (g * group) + hq;
                for (int i = 0; i < length; i++) plan.Query(i, rng, Row(q, b, i, h, length, heads, headDim));
                foreach ((int qi, int kj) in plan.Needles) found.Add(new Needle(b, h, qi, kj));
            }
            needlesOf[index] = found;
        });
        return (new TensorView<float>(q, batch, length, heads, headDim), new TensorView<float>(k, batch, length, kvHeads, headDim),
            new TensorView<float>(v, batch, length, kvHeads, headDim), [.. needlesOf.SelectMany(n => n)]);
    }

    private static Span<float> Row(float[] x, int b, int s, int h, int length, int heads, int d) =>
        x.AsSpan((int)((((long)b * length + s) * heads + h) * d), d);

    /// <summary>Which coordinates each component owns.</summary>
    private sealed class Layout
    {
        public Layout(int d)
        {
            D = d;
            LocalPairs = d / 8;
            SlashPairs = d / 16;
            NeedleDims = d / 8;
            ClusterDims = d / 16;
            LocalStart = 2;
            SlashStart = LocalStart + 2 * LocalPairs;
            NeedleStart = SlashStart + 2 * SlashPairs;
            ClusterStart = NeedleStart + NeedleDims;
            NoiseStart = ClusterStart + ClusterDims;
        }

        public int D { get; }
        public int LocalPairs { get; }
        public int SlashPairs { get; }
        public int NeedleDims { get; }
        public int ClusterDims { get; }
        public int LocalStart { get; }
        public int SlashStart { get; }
        public int NeedleStart { get; }
        public int ClusterStart { get; }
        public int NoiseStart { get; }
    }

    /// <summary>One kv head's positions, directions and amplitudes.</summary>
    private sealed class HeadPlan
    {
        private readonly Layout _l;
        private readonly double _root; // D^(1/4): a·a/√D = logit ⇒ a = √logit · D^(1/4)
        private readonly double _sink, _vertical, _local, _slash, _needle, _cluster, _noise;
        private readonly int _sinkCount, _slashOffset;
        private readonly HashSet<int> _verticals = [];
        private readonly double[] _localFreq, _slashFreq;
        private readonly Dictionary<int, float[]> _needleKeys = [], _needleQueries = [];
        private readonly int[] _segmentCluster;
        private readonly float[][] _centroids;
        private readonly int _segment;

        public HeadPlan(Random rng, int length, Layout layout, StructureOptions o)
        {
            _l = layout;
            _root = Math.Pow(layout.D, 0.25);
            double F() => 0.8 + (0.4 * rng.NextDouble());
            _sink = Amp(o.Sinks * F());
            _vertical = Amp(o.Verticals * F());
            _local = Amp(o.Local * F() / layout.LocalPairs);
            _slash = Amp(o.Slashes * F() / layout.SlashPairs);
            _needle = Amp(o.Needles);
            _cluster = Amp(o.Clusters * F());
            int noiseDims = layout.D - layout.NoiseStart;
            _noise = noiseDims > 0 ? Math.Sqrt(o.Noise * Math.Sqrt((double)layout.D / noiseDims)) : 0;
            _sinkCount = o.SinkCount;
            int verticals = (int)Math.Round(o.VerticalsPer1024 * length / 1024.0);
            for (int i = 0; i < verticals; i++) _verticals.Add(rng.Next(length));
            // Frequencies spread over (0, π/width]: Σ cos(ω·Δ) is a band of about that half-width.
            _localFreq = Frequencies(rng, layout.LocalPairs, o.LocalWidth);
            _slashFreq = Frequencies(rng, layout.SlashPairs, 16);
            _slashOffset = length > 64 ? 32 + rng.Next(Math.Max(1, Math.Min(length / 2, 4096))) : 0;
            // A needle is a retrieval: a span of NeedleQuerySpan consecutive queries (the question) attends one distant
            // key (the answer), as the queries of a question do in long-context retrieval tasks.
            int span = Math.Max(1, o.NeedleQuerySpan);
            if (o.Needles > 0 && length >= 512 + span)
            {
                for (int n = 0; n < o.NeedleCount; n++)
                {
                    int qi = (length / 2) + rng.Next(length - (length / 2) - span + 1);
                    int kj = rng.Next(Math.Max(1, qi - 256));
                    bool taken = _needleKeys.ContainsKey(kj);
                    for (int t = qi; t < qi + span; t++) taken |= _needleQueries.ContainsKey(t);
                    if (taken) continue;
                    float[] dir = UnitVector(rng, layout.NeedleDims);
                    _needleKeys[kj] = dir;
                    for (int t = qi; t < qi + span; t++)
                    {
                        _needleQueries[t] = dir;
                        Needles.Add((t, kj));
                    }
                }
            }
            _segment = o.ClusterSegment;
            _segmentCluster = new int[(length + _segment - 1) / _segment];
            for (int s = 0; s < _segmentCluster.Length; s++) _segmentCluster[s] = rng.Next(o.ClusterCount);
            _centroids = new float[o.ClusterCount][];
            for (int c = 0; c < o.ClusterCount; c++) _centroids[c] = UnitVector(rng, layout.ClusterDims);
        }

        public List<(int Query, int Key)> Needles { get; } = [];

        public void Key(int j, Random rng, Span<float> row) => Fill(j, rng, row, isQuery: false);

        public void Query(int i, Random rng, Span<float> row) => Fill(i, rng, row, isQuery: true);

        private void Fill(int t, Random rng, Span<float> row, bool isQuery)
        {
            row[0] = (float)(isQuery || t < _sinkCount ? _sink : 0);
            row[1] = (float)(isQuery || _verticals.Contains(t) ? _vertical : 0);
            for (int f = 0; f < _localFreq.Length; f++)
            {
                row[_l.LocalStart + 2 * f] = (float)(_local * Math.Cos(_localFreq[f] * t));
                row[_l.LocalStart + 2 * f + 1] = (float)(_local * Math.Sin(_localFreq[f] * t));
            }
            double slashPosition = isQuery ? t - _slashOffset : t;
            for (int f = 0; f < _slashFreq.Length; f++)
            {
                row[_l.SlashStart + 2 * f] = (float)(_slash * Math.Cos(_slashFreq[f] * slashPosition));
                row[_l.SlashStart + 2 * f + 1] = (float)(_slash * Math.Sin(_slashFreq[f] * slashPosition));
            }
            if ((isQuery ? _needleQueries : _needleKeys).TryGetValue(t, out float[]? dir))
            {
                for (int c = 0; c < dir.Length; c++) row[_l.NeedleStart + c] = (float)(_needle * dir[c]);
            }
            float[] centroid = _centroids[_segmentCluster[t / _segment]];
            for (int c = 0; c < centroid.Length; c++) row[_l.ClusterStart + c] = (float)(_cluster * centroid[c]);
            for (int c = _l.NoiseStart; c < row.Length; c++) row[c] = (float)(_noise * Gaussian.Next(rng));
        }

        private double Amp(double logit) => Math.Sqrt(Math.Max(logit, 0)) * _root;

        private static double[] Frequencies(Random rng, int count, int width)
        {
            var w = new double[count];
            for (int f = 0; f < count; f++) w[f] = Math.PI / width * ((f + rng.NextDouble()) / count);
            return w;
        }

        private static float[] UnitVector(Random rng, int dims)
        {
            var u = new float[dims];
            double norm = 0;
            for (int c = 0; c < dims; c++)
            {
                u[c] = (float)Gaussian.Next(rng);
                norm += u[c] * u[c];
            }
            float inv = (float)(1 / Math.Sqrt(norm));
            for (int c = 0; c < dims; c++) u[c] *= inv;
            return u;
        }
    }
}
