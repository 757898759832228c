using System.Diagnostics;
using Attend.Tensors;

namespace Attend.Models;

/// <summary>
/// A Llama-family decoder (RMSNorm, rotary embeddings, grouped-query attention through Attend, SwiGLU MLP, tied or
/// untied embeddings) loaded from a Hugging Face folder, weights in their stored dtype, computed in f32.
/// </summary>
public sealed class LlamaModel
{
    private readonly Tensor _embed, _lmHead;
    private readonly float[] _finalNorm;
    private readonly Layer[] _layers;
    private readonly float[] _invFreq;

    // Norm weights are widened to f32 once at load (a few KiB); the matrices stay in their stored dtype.
    private sealed record Layer(float[] InputNorm, Tensor Q, Tensor K, Tensor V, Tensor O, float[] PostNorm, Tensor Gate, Tensor Up, Tensor Down);

    private LlamaModel(LlamaConfig config, Tensor embed, Tensor lmHead, float[] finalNorm, Layer[] layers)
    {
        Config = config;
        _embed = embed;
        _lmHead = lmHead;
        _finalNorm = finalNorm;
        _layers = layers;
        int half = config.HeadDim / 2;
        _invFreq = new float[half];
        // As transformers' default rope: inv_freq = 1 / θ^(2j/D) in float32.
        for (int j = 0; j < half; j++) _invFreq[j] = (float)(1.0 / Math.Pow(config.RopeTheta, 2.0 * j / config.HeadDim));
    }

    /// <summary>The model's configuration.</summary>
    public LlamaConfig Config { get; }

    /// <summary>Loads config.json and the (sharded) safetensors of <paramref name="directory"/>, checking every shape against the config.</summary>
    public static LlamaModel Load(string directory)
    {
        LlamaConfig c = LlamaConfig.Load(Path.Combine(directory, "config.json"));
        Checkpoint ckpt = Checkpoint.Open(directory);
        int h = c.HiddenSize, qd = c.Heads * c.HeadDim, kvd = c.KvHeads * c.HeadDim, inter = c.IntermediateSize;
        Tensor embed = ckpt.Read("model.embed_tokens.weight", c.VocabSize, h);
        Tensor lmHead = c.TieWordEmbeddings || !ckpt.Contains("lm_head.weight") ? embed : ckpt.Read("lm_head.weight", c.VocabSize, h);
        var layers = new Layer[c.Layers];
        for (int l = 0; l < c.Layers; l++)
        {
            string p = $"model.layers.{l}.";
            layers[l] = new Layer(
                Widen(ckpt.Read(p + "input_layernorm.weight", h)),
                ckpt.Read(p + "self_attn.q_proj.weight", qd, h),
                ckpt.Read(p + "self_attn.k_proj.weight", kvd, h),
                ckpt.Read(p + "self_attn.v_proj.weight", kvd, h),
                ckpt.Read(p + "self_attn.o_proj.weight", h, qd),
                Widen(ckpt.Read(p + "post_attention_layernorm.weight", h)),
                ckpt.Read(p + "mlp.gate_proj.weight", inter, h),
                ckpt.Read(p + "mlp.up_proj.weight", inter, h),
                ckpt.Read(p + "mlp.down_proj.weight", h, inter));
        }
        return new LlamaModel(c, embed, lmHead, Widen(ckpt.Read("model.norm.weight", h)), layers);
    }

    /// <summary>Statistics of one forward pass.</summary>
    public sealed record ForwardStats(double Density, TimeSpan AttentionTime, TimeSpan Total);

    /// <summary>
    /// Logits [S, vocab] for <paramref name="tokens"/> (positions 0..S−1), with each layer's attention chosen by
    /// <paramref name="attention"/> (index = layer; one entry applies to all layers).
    /// </summary>
    public float[] Forward(ReadOnlySpan<int> tokens, IReadOnlyList<AttentionChoice> attention, KernelTuning? tuning, out ForwardStats stats) =>
        Forward(tokens, attention, tuning, out stats, null);

    /// <summary>As <see cref="Forward(ReadOnlySpan{int}, IReadOnlyList{AttentionChoice}, KernelTuning?, out ForwardStats)"/>,
    /// also handing each layer's rotated keys [S, Hkv·D] and values to <paramref name="layerKv"/> (to fill a KV cache).</summary>
    public float[] Forward(ReadOnlySpan<int> tokens, IReadOnlyList<AttentionChoice> attention, KernelTuning? tuning, out ForwardStats stats,
        Action<int, float[], float[]>? layerKv)
    {
        ArgumentNullException.ThrowIfNull(attention);
        if (attention.Count == 0 || (attention.Count != 1 && attention.Count != Config.Layers))
        {
            throw new ArgumentException($"attention needs one entry or one per layer ({Config.Layers}); got {attention.Count}", nameof(attention));
        }
        LlamaConfig c = Config;
        int s = tokens.Length;
        if (s < 1) throw new ArgumentException("tokens must not be empty", nameof(tokens));
        if (s > c.MaxPositions) throw new ArgumentException($"{s} tokens exceed the model's context of {c.MaxPositions} (max_position_embeddings)", nameof(tokens));
        tuning ??= KernelTuning.Default;
        int threads = tuning.Threads;
        var total = Stopwatch.StartNew();
        TimeSpan attentionTime = TimeSpan.Zero;
        int h = c.HiddenSize, d = c.HeadDim;

        var a = new Activations(c, s);
        for (int i = 0; i < s; i++)
        {
            int t = tokens[i];
            if ((uint)t >= (uint)c.VocabSize) throw new ArgumentException($"token {t} at position {i} is outside the vocabulary of {c.VocabSize}", nameof(tokens));
            RowOf(_embed, t, h, a.X.AsSpan(i * h, h));
        }
        double density = 0;
        for (int l = 0; l < c.Layers; l++)
        {
            Layer layer = _layers[l];
            AttentionInputs(layer, a, s, 0, threads);
            layerKv?.Invoke(l, a.K, a.V);
            var sw = Stopwatch.StartNew();
            density += attention[attention.Count == 1 ? 0 : l].Run(
                new TensorView<float>(a.Q, 1, s, c.Heads, d), new TensorView<float>(a.K, 1, s, c.KvHeads, d),
                new TensorView<float>(a.V, 1, s, c.KvHeads, d), new TensorView<float>(a.Attn, 1, s, c.Heads, d), tuning);
            attentionTime += sw.Elapsed;
            AttentionOutputAndFeedForward(layer, a, s, threads);
        }
        float[] logits = Logits(a, s, threads);
        stats = new ForwardStats(density / c.Layers, attentionTime, total.Elapsed);
        return logits;
    }

    /// <summary>
    /// One generation step: token <paramref name="token"/> at <paramref name="position"/>; its keys and values are
    /// appended to <paramref name="cache"/> (sequence <paramref name="sequence"/>, one cache layer per model layer)
    /// and attention reads the cache through <see cref="Decode.DecodeAttention"/> with <paramref name="options"/>
    /// (its KV selection policy). Returns the next-token logits.
    /// </summary>
    public float[] DecodeStep(int token, int position, Decode.KvCache cache, int sequence, Decode.DecodeOptions options, KernelTuning? tuning = null) =>
        DecodeStep(token, position, cache, sequence, [options], tuning, out _);

    /// <summary>
    /// As the other overload, with one <see cref="Decode.DecodeOptions"/> per layer (or one for all: e.g. Quest keeps the
    /// first two layers dense); <paramref name="pageFraction"/> is the share of the cached pages attention read.
    /// </summary>
    public float[] DecodeStep(int token, int position, Decode.KvCache cache, int sequence, IReadOnlyList<Decode.DecodeOptions> options, KernelTuning? tuning, out double pageFraction)
    {
        ArgumentNullException.ThrowIfNull(cache);
        ArgumentNullException.ThrowIfNull(options);
        if (options.Count != 1 && options.Count != Config.Layers) throw new ArgumentException($"options needs one entry or one per layer ({Config.Layers}); got {options.Count}", nameof(options));
        LlamaConfig c = Config;
        if ((uint)token >= (uint)c.VocabSize) throw new ArgumentOutOfRangeException(nameof(token), token, $"token must be in 0..{c.VocabSize - 1}");
        if (position >= c.MaxPositions) throw new ArgumentOutOfRangeException(nameof(position), position, $"position exceeds the model's context of {c.MaxPositions}");
        if (cache.Layers != c.Layers || cache.KvHeads != c.KvHeads || cache.HeadDim != c.HeadDim)
        {
            throw new ArgumentException($"cache must be [layers {c.Layers}, kv heads {c.KvHeads}, head dim {c.HeadDim}]; got [{cache.Layers}, {cache.KvHeads}, {cache.HeadDim}]", nameof(cache));
        }
        int threads = (tuning ?? KernelTuning.Default).Threads;
        int h = c.HiddenSize, d = c.HeadDim;
        var a = new Activations(c, 1);
        RowOf(_embed, token, h, a.X);
        long read = 0, available = 0;
        for (int l = 0; l < c.Layers; l++)
        {
            Layer layer = _layers[l];
            AttentionInputs(layer, a, 1, position, threads);
            cache.Append(sequence, l, new TensorView<float>(a.K, 1, c.KvHeads, d), new TensorView<float>(a.V, 1, c.KvHeads, d));
            read += Decode.DecodeAttention.Forward(new TensorView<float>(a.Q, 1, c.Heads, d), cache, sequence, l, new TensorView<float>(a.Attn, 1, c.Heads, d), options[options.Count == 1 ? 0 : l]);
            available += (long)c.KvHeads * ((cache.Length(sequence, l) + cache.PageSize - 1) / cache.PageSize);
            AttentionOutputAndFeedForward(layer, a, 1, threads);
        }
        float[] logits = Logits(a, 1, threads);
        pageFraction = available == 0 ? 1 : (double)read / available;
        return logits;
    }

    /// <summary>Runs <paramref name="tokens"/> as a prefill (dense causal) and stores every layer's keys and values in a new sequence of <paramref name="cache"/>.</summary>
    /// <returns>The sequence id and the logits [S, vocab].</returns>
    public (int Sequence, float[] Logits) Prefill(ReadOnlySpan<int> tokens, Decode.KvCache cache, KernelTuning? tuning = null)
    {
        ArgumentNullException.ThrowIfNull(cache);
        LlamaConfig c = Config;
        int sequence = cache.AddSequence(), s = tokens.Length;
        float[] logits = Forward(tokens, [AttentionChoice.Dense], tuning, out _, (l, k, v) =>
            cache.Append(sequence, l, new TensorView<float>(k, s, c.KvHeads, c.HeadDim), new TensorView<float>(v, s, c.KvHeads, c.HeadDim)));
        return (sequence, logits);
    }

    private static void RowOf(Tensor t, int index, int width, Span<float> destination)
    {
        switch (t.DType)
        {
            case DType.Float16: ElementConvert.ToSingle<Half>(t.Array<Half>().AsSpan(index * width, width), destination); break;
            case DType.BFloat16: ElementConvert.ToSingle<BFloat16>(t.Array<BFloat16>().AsSpan(index * width, width), destination); break;
            default: ElementConvert.ToSingle<float>(t.Array<float>().AsSpan(index * width, width), destination); break;
        }
    }

    /// <summary>The per-token buffers of one forward pass (S tokens; S = 1 when decoding).</summary>
    private sealed class Activations(LlamaConfig c, int s)
    {
        public float[] X { get; } = new float[s * c.HiddenSize];
        public float[] Normed { get; } = new float[s * c.HiddenSize];
        public float[] Q { get; } = new float[s * c.Heads * c.HeadDim];
        public float[] K { get; } = new float[s * c.KvHeads * c.HeadDim];
        public float[] V { get; } = new float[s * c.KvHeads * c.HeadDim];
        public float[] Attn { get; } = new float[s * c.Heads * c.HeadDim];
        public float[] Proj { get; } = new float[s * c.HiddenSize];
        public float[] Gate { get; } = new float[s * c.IntermediateSize];
        public float[] Up { get; } = new float[s * c.IntermediateSize];
    }

    /// <summary>Input norm, q/k/v projections and rotary embedding (positions from <paramref name="firstPosition"/>).</summary>
    private void AttentionInputs(Layer layer, Activations a, int s, int firstPosition, int threads)
    {
        LlamaConfig c = Config;
        RmsNorm(a.X, a.Normed, s, c.HiddenSize, layer.InputNorm, c.RmsNormEps);
        MatMul.Multiply(a.Normed, s, c.HiddenSize, layer.Q, a.Q, threads);
        MatMul.Multiply(a.Normed, s, c.HiddenSize, layer.K, a.K, threads);
        MatMul.Multiply(a.Normed, s, c.HiddenSize, layer.V, a.V, threads);
        Rope(a.Q, s, c.Heads, c.HeadDim, firstPosition);
        Rope(a.K, s, c.KvHeads, c.HeadDim, firstPosition);
    }

    /// <summary>Output projection and residual, then the SwiGLU MLP and its residual.</summary>
    private void AttentionOutputAndFeedForward(Layer layer, Activations a, int s, int threads)
    {
        LlamaConfig c = Config;
        int h = c.HiddenSize, n = s * h;
        MatMul.Multiply(a.Attn, s, c.Heads * c.HeadDim, layer.O, a.Proj, threads);
        for (int i = 0; i < n; i++) a.X[i] += a.Proj[i];
        RmsNorm(a.X, a.Normed, s, h, layer.PostNorm, c.RmsNormEps);
        MatMul.Multiply(a.Normed, s, h, layer.Gate, a.Gate, threads);
        MatMul.Multiply(a.Normed, s, h, layer.Up, a.Up, threads);
        for (int i = 0; i < s * c.IntermediateSize; i++)
        {
            float g = a.Gate[i];
            a.Gate[i] = g / (1f + MathF.Exp(-g)) * a.Up[i];   // SiLU(gate) · up
        }
        MatMul.Multiply(a.Gate, s, c.IntermediateSize, layer.Down, a.Proj, threads);
        for (int i = 0; i < n; i++) a.X[i] += a.Proj[i];
    }

    private float[] Logits(Activations a, int s, int threads)
    {
        LlamaConfig c = Config;
        RmsNorm(a.X, a.Normed, s, c.HiddenSize, _finalNorm, c.RmsNormEps);
        var logits = new float[s * c.VocabSize];
        MatMul.Multiply(a.Normed, s, c.HiddenSize, _lmHead, logits, threads);
        return logits;
    }

    /// <summary>RMSNorm with the weight widened once at load; rows in parallel only when there are enough of them.</summary>
    private static void RmsNorm(float[] x, float[] y, int s, int h, float[] w, double eps)
    {
        void Row(int i)
        {
            ReadOnlySpan<float> r = x.AsSpan(i * h, h);
            Span<float> o = y.AsSpan(i * h, h);
            double ss = 0;
            foreach (float e in r) ss += (double)e * e;
            float inv = (float)(1.0 / Math.Sqrt((ss / h) + eps));
            for (int c = 0; c < h; c++) o[c] = w[c] * (r[c] * inv);
        }
        if (s < 64)
        {
            for (int i = 0; i < s; i++) Row(i);
        }
        else
        {
            Parallel.For(0, s, Row);
        }
    }

    private static float[] Widen(Tensor vector)
    {
        var w = new float[vector.Shape[0]];
        RowOf(vector, 0, w.Length, w);
        return w;
    }

    /// <summary>Rotary embedding in place on [S, heads, D] (transformers' rotate_half pairing: j with j + D/2).</summary>
    private void Rope(float[] x, int s, int heads, int d, int firstPosition)
    {
        int half = d / 2;
        Parallel.For(0, s, i =>
        {
            int pos = firstPosition + i;
            Span<float> cos = stackalloc float[half], sin = stackalloc float[half];
            for (int j = 0; j < half; j++)
            {
                float angle = pos * _invFreq[j];
                cos[j] = MathF.Cos(angle);
                sin[j] = MathF.Sin(angle);
            }
            for (int hh = 0; hh < heads; hh++)
            {
                Span<float> v = x.AsSpan(((i * heads) + hh) * d, d);
                for (int j = 0; j < half; j++)
                {
                    float a = v[j], b = v[j + half];
                    v[j] = (a * cos[j]) - (b * sin[j]);
                    v[j + half] = (b * cos[j]) + (a * sin[j]);
                }
            }
        });
    }
}
