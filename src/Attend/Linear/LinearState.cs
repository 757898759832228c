namespace Attend.Linear;

/// <summary>
/// The recurrent form of causal linear attention for decoding: per head a state S = Σ γ^(t−j) φ(k_j) v_jᵀ [F × Dv]
/// and normalizer z = Σ γ^(t−j) φ(k_j); <see cref="Step"/> adds one token and returns its output in O(F·Dv) — the
/// same result as <see cref="LinearAttention.Forward"/> with <c>Causal = true</c>. Serializable with
/// <see cref="Save"/> / <see cref="Load"/>.
/// </summary>
public sealed class LinearState
{
    private readonly float[] _state;   // [H, F, Dv]
    private readonly float[] _z;       // [H, F]
    private readonly float[] _decay;   // [H]
    private readonly float[] _phi;
    private readonly float[] _phiQ;

    /// <summary>An empty state for <paramref name="heads"/> heads of dimension <paramref name="headDim"/> and values of <paramref name="valueDim"/>.</summary>
    public LinearState(int heads, int headDim, int valueDim, LinearOptions? options = null)
    {
        options ??= new LinearOptions { Causal = true };
        if (heads < 1 || headDim < 1 || valueDim < 1)
        {
            throw new ArgumentException($"heads, head dim and value dim must be ≥ 1; got {heads}, {headDim}, {valueDim}");
        }
        LinearAttention.Validate(new AttentionShape(1, 1, 1, heads, heads, headDim, valueDim), options with { Causal = true }, KernelTuning.Default);
        Options = options;
        Heads = heads;
        HeadDim = headDim;
        ValueDim = valueDim;
        FeatureDim = options.FeatureMap.FeatureDim(headDim);
        _state = new float[(long)heads * FeatureDim * valueDim];
        _z = new float[heads * FeatureDim];
        _decay = Enumerable.Range(0, heads).Select(h => options.Decay?[h] ?? 1f).ToArray();
        _phi = new float[FeatureDim];
        _phiQ = new float[FeatureDim];
    }

    /// <summary>The options (feature map, normalization, decay).</summary>
    public LinearOptions Options { get; }

    /// <summary>Heads.</summary>
    public int Heads { get; }

    /// <summary>Head dim D of q and k.</summary>
    public int HeadDim { get; }

    /// <summary>Value dim Dv.</summary>
    public int ValueDim { get; }

    /// <summary>Feature dim F.</summary>
    public int FeatureDim { get; }

    /// <summary>Tokens consumed so far.</summary>
    public long Tokens { get; private set; }

    /// <summary>Consumes one token: q, k [H·D], v [H·Dv] (head-major); writes output [H·Dv].</summary>
    public void Step(ReadOnlySpan<float> q, ReadOnlySpan<float> k, ReadOnlySpan<float> v, Span<float> output)
    {
        int d = HeadDim, dv = ValueDim, f = FeatureDim;
        if (q.Length != Heads * d || k.Length != Heads * d) throw new ArgumentException($"q and k must hold H·D = {Heads * d} values; got {q.Length} and {k.Length}", nameof(q));
        if (v.Length != Heads * dv || output.Length != Heads * dv) throw new ArgumentException($"v and output must hold H·Dv = {Heads * dv} values; got {v.Length} and {output.Length}", nameof(v));
        for (int h = 0; h < Heads; h++)
        {
            Span<float> state = _state.AsSpan(h * f * dv, f * dv);
            Span<float> z = _z.AsSpan(h * f, f);
            if (_decay[h] != 1f)
            {
                Vectors.Scale(state, _decay[h]);
                Vectors.Scale(z, _decay[h]);
            }
            Options.FeatureMap.Apply<float>(k.Slice(h * d, d), _phi, isQuery: false);
            ReadOnlySpan<float> vh = v.Slice(h * dv, dv);
            for (int r = 0; r < f; r++)
            {
                if (_phi[r] != 0f) Vectors.Axpy(_phi[r], vh, state.Slice(r * dv, dv));
                z[r] += _phi[r];
            }
            Options.FeatureMap.Apply<float>(q.Slice(h * d, d), _phiQ, isQuery: true);
            Span<float> o = output.Slice(h * dv, dv);
            o.Clear();
            for (int r = 0; r < f; r++) Vectors.Axpy(_phiQ[r], state.Slice(r * dv, dv), o);
            float den = Options.Normalize ? Vectors.Dot(_phiQ, z) : 1f;
            float inv = den == 0f ? 0f : 1f / den;
            for (int c = 0; c < dv; c++) o[c] *= inv;
        }
        Tokens++;
    }

    /// <summary>Writes the state (sizes, token count and values; not the feature map, which the loader supplies).</summary>
    public void Save(Stream stream)
    {
        ArgumentNullException.ThrowIfNull(stream);
        using var w = new BinaryWriter(stream, System.Text.Encoding.UTF8, leaveOpen: true);
        w.Write("attend.linear-state/1");
        w.Write(Heads);
        w.Write(HeadDim);
        w.Write(ValueDim);
        w.Write(FeatureDim);
        w.Write(Tokens);
        foreach (float x in _state) w.Write(x);
        foreach (float x in _z) w.Write(x);
    }

    /// <summary>Reads a state written by <see cref="Save"/>; <paramref name="options"/> must describe the same map.</summary>
    /// <exception cref="InvalidDataException">for a stream that is not a state of these sizes.</exception>
    public static LinearState Load(Stream stream, LinearOptions options)
    {
        ArgumentNullException.ThrowIfNull(stream);
        ArgumentNullException.ThrowIfNull(options);
        using var r = new BinaryReader(stream, System.Text.Encoding.UTF8, leaveOpen: true);
        try
        {
            if (r.ReadString() != "attend.linear-state/1") throw new InvalidDataException("not an Attend linear state");
            int heads = r.ReadInt32(), d = r.ReadInt32(), dv = r.ReadInt32(), f = r.ReadInt32();
            var state = new LinearState(heads, d, dv, options);
            if (state.FeatureDim != f) throw new InvalidDataException($"the state has feature dim {f}; the options' map gives {state.FeatureDim}");
            state.Tokens = r.ReadInt64();
            for (int i = 0; i < state._state.Length; i++) state._state[i] = r.ReadSingle();
            for (int i = 0; i < state._z.Length; i++) state._z[i] = r.ReadSingle();
            return state;
        }
        catch (EndOfStreamException e)
        {
            throw new InvalidDataException("linear state truncated", e);
        }
    }
}
