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
    private readonly float[] _history; // [H, K − 1, Dv]: the last K − 1 values for the value convolution, ring by token
    private readonly int _taps;        // K − 1, or 0 without a value convolution

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
        _taps = options.ValueConv is { } conv ? conv.Kernel - 1 : 0;
        _history = new float[(long)heads * _taps * valueDim];
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
            Options.FeatureMap.Apply(k.Slice(h * d, d), _phi, isQuery: false);
            ReadOnlySpan<float> vh = v.Slice(h * dv, dv);
            for (int r = 0; r < f; r++)
            {
                if (_phi[r] != 0f) Vectors.Axpy(_phi[r], vh, state.Slice(r * dv, dv));
                z[r] += _phi[r];
            }
            Options.FeatureMap.Apply(q.Slice(h * d, d), _phiQ, isQuery: true);
            Span<float> o = output.Slice(h * dv, dv);
            o.Clear();
            for (int r = 0; r < f; r++) Vectors.Axpy(_phiQ[r], state.Slice(r * dv, dv), o);
            float den = Options.Normalize ? Vectors.Dot(_phiQ, z) : 1f;
            float inv = den == 0f ? 0f : 1f / den;
            for (int c = 0; c < dv; c++) o[c] *= inv;
            if (Options.ValueConv is { } conv) AddValueConv(conv, h, vh, o);
        }
        Tokens++;
    }

    /// <summary>SLAB's causal value convolution at the current token: taps on the last K − 1 values and this one.</summary>
    private void AddValueConv(DepthwiseConv conv, int h, ReadOnlySpan<float> v, Span<float> o)
    {
        int dv = ValueDim, kernel = conv.Kernel;
        Span<float> history = _history.AsSpan(h * _taps * dv, _taps * dv);
        for (int c = 0; c < dv; c++)
        {
            float sum = (conv.Bias?[c] ?? 0f) + (conv.Weights[(c * kernel) + kernel - 1] * v[c]);
            for (int i = 0; i < _taps; i++)
            {
                long j = Tokens - _taps + i;
                if (j >= 0) sum += conv.Weights[(c * kernel) + i] * history[(int)(j % _taps) * dv + c];
            }
            o[c] += sum;
        }
        if (_taps > 0) v.CopyTo(history.Slice((int)(Tokens % _taps) * dv, dv));
    }

    /// <summary>Writes the state (sizes, token count, values and the value-convolution history; not the feature map or
    /// the convolution weights, which the loader's options supply).</summary>
    public void Save(Stream stream)
    {
        ArgumentNullException.ThrowIfNull(stream);
        using var w = new BinaryWriter(stream, System.Text.Encoding.UTF8, leaveOpen: true);
        w.Write("attend.linear-state/2");
        w.Write(Heads);
        w.Write(HeadDim);
        w.Write(ValueDim);
        w.Write(FeatureDim);
        w.Write(Tokens);
        foreach (float x in _state) w.Write(x);
        foreach (float x in _z) w.Write(x);
        w.Write(_taps);
        foreach (float x in _history) w.Write(x);
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
            string format = r.ReadString();
            if (format is not ("attend.linear-state/2" or "attend.linear-state/1")) throw new InvalidDataException("not an Attend linear state");
            int heads = r.ReadInt32(), d = r.ReadInt32(), dv = r.ReadInt32(), f = r.ReadInt32();
            var state = new LinearState(heads, d, dv, options);
            if (state.FeatureDim != f) throw new InvalidDataException($"the state has feature dim {f}; the options' map gives {state.FeatureDim}");
            state.Tokens = r.ReadInt64();
            for (int i = 0; i < state._state.Length; i++) state._state[i] = r.ReadSingle();
            for (int i = 0; i < state._z.Length; i++) state._z[i] = r.ReadSingle();
            int taps = format.EndsWith("/1", StringComparison.Ordinal) ? 0 : r.ReadInt32();   // v1: no value-convolution history
            if (taps != state._taps) throw new InvalidDataException($"the state was saved with a value convolution of {taps + 1} taps; the options give {state._taps + 1}");
            for (int i = 0; i < state._history.Length; i++) state._history[i] = r.ReadSingle();
            return state;
        }
        catch (EndOfStreamException e)
        {
            throw new InvalidDataException("linear state truncated", e);
        }
    }
}
