using System.Diagnostics;

namespace Attend.Models;

/// <summary>Result of <see cref="Evaluation.BitsPerByte"/>.</summary>
/// <param name="BitsPerByte">Mean next-byte cross-entropy in bits.</param>
/// <param name="Predictions">Predicted bytes counted.</param>
/// <param name="Density">Mean fraction of the causal pairs the attention computed (1 for dense).</param>
/// <param name="Elapsed">Wall time of the forward passes.</param>
/// <param name="AttentionTime">Part of it spent in attention (selection included).</param>
/// <param name="Tokens">Tokens run through the model.</param>
public sealed record EvalResult(double BitsPerByte, long Predictions, double Density, TimeSpan Elapsed, TimeSpan AttentionTime, long Tokens)
{
    /// <summary>Prefill throughput.</summary>
    public double TokensPerSecond => Tokens / Elapsed.TotalSeconds;
}

/// <summary>Language-model quality as the model's bits/byte on text, the measure the model's README reports.</summary>
public static class Evaluation
{
    /// <summary>
    /// Splits the first <paramref name="maxBytes"/> bytes of <paramref name="text"/> into sequences of
    /// <paramref name="context"/> bytes and averages, over every position but the last of each sequence, the
    /// cross-entropy (bits) of the next byte.
    /// </summary>
    public static EvalResult BitsPerByte(LlamaModel model, ReadOnlySpan<byte> text, int context, IReadOnlyList<AttentionChoice> attention,
        long maxBytes = long.MaxValue, KernelTuning? tuning = null, Action<int, int>? progress = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        if (context < 2) throw new ArgumentOutOfRangeException(nameof(context), context, "context must be ≥ 2");
        if (context > model.Config.MaxPositions)
        {
            throw new ArgumentOutOfRangeException(nameof(context), context, $"context {context} exceeds the model's max_position_embeddings {model.Config.MaxPositions}");
        }
        long usable = Math.Min(text.Length, maxBytes);
        int sequences = (int)(usable / context);
        if (sequences == 0) throw new ArgumentException($"the text holds {text.Length} bytes, fewer than one context of {context}", nameof(text));
        double bits = 0, density = 0;
        long count = 0;
        var total = Stopwatch.StartNew();
        TimeSpan attentionTime = TimeSpan.Zero;
        var tokens = new int[context];
        int vocab = model.Config.VocabSize;
        for (int sq = 0; sq < sequences; sq++)
        {
            progress?.Invoke(sq, sequences);
            ReadOnlySpan<byte> chunk = text.Slice(sq * context, context);
            for (int i = 0; i < context; i++) tokens[i] = ByteTokenizer.Encode(chunk[i]);
            float[] logits = model.Forward(tokens, attention, tuning, out LlamaModel.ForwardStats stats);
            density += stats.Density;
            attentionTime += stats.AttentionTime;
            for (int i = 0; i + 1 < context; i++)
            {
                bits += CrossEntropyBits(logits.AsSpan(i * vocab, vocab), tokens[i + 1]);
                count++;
            }
        }
        return new EvalResult(bits / count, count, density / sequences, total.Elapsed, attentionTime, (long)sequences * context);
    }

    /// <summary>−log₂ softmax(logits)[target], in double.</summary>
    public static double CrossEntropyBits(ReadOnlySpan<float> logits, int target)
    {
        double max = double.NegativeInfinity;
        foreach (float l in logits) max = Math.Max(max, l);
        double sum = 0;
        foreach (float l in logits) sum += Math.Exp(l - max);
        return (Math.Log(sum) + max - logits[target]) / Math.Log(2);
    }
}

/// <summary>The shipped model's tokenizer: token id = byte value.</summary>
public static class ByteTokenizer
{
    /// <summary>Token of a byte.</summary>
    public static int Encode(byte b) => b;

    /// <summary>Tokens of a byte string.</summary>
    public static int[] Encode(ReadOnlySpan<byte> bytes)
    {
        var t = new int[bytes.Length];
        for (int i = 0; i < bytes.Length; i++) t[i] = bytes[i];
        return t;
    }

    /// <summary>Byte of a token.</summary>
    public static byte Decode(int token) =>
        (uint)token < 256 ? (byte)token : throw new ArgumentOutOfRangeException(nameof(token), token, "a byte token is 0..255");
}

/// <summary>
/// KV selection policies by name for decoding: <c>dense</c>, <c>streaming:SINK,WINDOW</c>, <c>quest:TOKENS</c> or
/// <c>quest:1/8</c> (a fraction of the context), optionally <c>quest:1/8,sink=64,recent=256</c>; a suffix <c>@N</c> keeps the first N layers dense (the Quest paper
/// leaves its first two layers dense: their attention is diffuse).
/// </summary>
public static class PolicySpec
{
    /// <summary>Parses a policy spec for all layers; fractions are of <paramref name="context"/> tokens.</summary>
    public static Decode.IKvSelectionPolicy? Parse(string spec, int context) => ParseLayers(spec, context, 1)[0].Policy;

    /// <summary>Parses a spec into per-layer decode options (<paramref name="layers"/> entries; a leading dense prefix from <c>@N</c>).</summary>
    public static IReadOnlyList<Decode.DecodeOptions> ParseLayers(string spec, int context, int layers)
    {
        ArgumentNullException.ThrowIfNull(spec);
        string body = spec.Trim();
        int denseLayers = 0;
        int at = body.IndexOf('@', StringComparison.Ordinal);
        if (at >= 0)
        {
            if (!int.TryParse(body[(at + 1)..], System.Globalization.CultureInfo.InvariantCulture, out denseLayers) || denseLayers < 0)
            {
                throw new ArgumentException($"policy '{spec}': '@' takes the number of leading dense layers", nameof(spec));
            }
            body = body[..at];
        }
        Decode.IKvSelectionPolicy? policy = ParseOne(body, spec, context);
        var options = new Decode.DecodeOptions[layers];
        for (int l = 0; l < layers; l++) options[l] = new Decode.DecodeOptions { Policy = l < denseLayers ? null : policy };
        return options;
    }

    private static Decode.IKvSelectionPolicy? ParseOne(string body, string spec, int context)
    {
        string[] parts = body.Split(':', 2);
        int Tokens(string text)
        {
            string[] frac = text.Split('/');
            if (frac.Length == 2 && int.TryParse(frac[0], System.Globalization.CultureInfo.InvariantCulture, out int a)
                && int.TryParse(frac[1], System.Globalization.CultureInfo.InvariantCulture, out int b) && a > 0 && b > 0) return Math.Max(1, context * a / b);
            return int.TryParse(text, System.Globalization.CultureInfo.InvariantCulture, out int n) && n > 0 ? n
                : throw new ArgumentException($"policy '{spec}': '{text}' is not a token count or a fraction like 1/8", nameof(spec));
        }
        switch (parts[0])
        {
            case "dense":
                return null;
            case "quest" when parts.Length == 2:
                string[] q = parts[1].Split(',');
                int sink = 0, recent = 0;
                bool perHead = false;
                foreach (string option in q.Skip(1))
                {
                    string[] kv = option.Split('=', 2);
                    if (kv.Length == 2 && kv[0] == "sink") sink = Tokens(kv[1]);
                    else if (kv.Length == 2 && kv[0] == "recent") recent = Tokens(kv[1]);
                    else if (option == "per-head") perHead = true;
                    else throw new ArgumentException($"policy '{spec}': quest takes sink=N, recent=N and per-head after its budget; got '{option}'", nameof(spec));
                }
                return new Decode.QuestPolicy(Tokens(q[0]), sink, recent, perHead);
            case "moment" when parts.Length == 2:
                string[] mo = parts[1].Split(',');
                int msink = 0, mrecent = 0;
                foreach (string option in mo.Skip(1))
                {
                    string[] kv = option.Split('=', 2);
                    if (kv.Length == 2 && kv[0] == "sink") msink = Tokens(kv[1]);
                    else if (kv.Length == 2 && kv[0] == "recent") mrecent = Tokens(kv[1]);
                    else throw new ArgumentException($"policy '{spec}': moment takes sink=N and recent=N after its budget; got '{option}'", nameof(spec));
                }
                return new Decode.MomentPolicy(Tokens(mo[0]), msink, mrecent);
            case "oracle" when parts.Length == 2:
                string[] or = parts[1].Split(',');
                int orecent = 0;
                foreach (string option in or.Skip(1))
                {
                    string[] kv = option.Split('=', 2);
                    if (kv.Length == 2 && kv[0] == "recent") orecent = Tokens(kv[1]);
                    else throw new ArgumentException($"policy '{spec}': oracle takes recent=N after its budget; got '{option}'", nameof(spec));
                }
                return new Decode.OraclePagePolicy(Tokens(or[0]), orecent);
            case "landmark" when parts.Length == 2:
                string[] lm = parts[1].Split(',');
                int lsink = 0, lrecent = 0;
                foreach (string option in lm.Skip(1))
                {
                    string[] kv = option.Split('=', 2);
                    if (kv.Length == 2 && kv[0] == "sink") lsink = Tokens(kv[1]);
                    else if (kv.Length == 2 && kv[0] == "recent") lrecent = Tokens(kv[1]);
                    else throw new ArgumentException($"policy '{spec}': landmark takes sink=N and recent=N after its budget; got '{option}'", nameof(spec));
                }
                return new Decode.LandmarkPolicy(Tokens(lm[0]), lsink, lrecent);
            case "h2o" when parts.Length == 2:
                string[] hh = parts[1].Split(',');
                double prune = 0;
                if (hh.Length == 3 && hh[2].StartsWith("prune=", StringComparison.Ordinal)
                    && double.TryParse(hh[2]["prune=".Length..], System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture, out prune))
                {
                    hh = hh[..2];
                }
                if (hh.Length != 2) throw new ArgumentException($"policy '{spec}': h2o takes HEAVY,RECENT[,prune=FRACTION] (e.g. h2o:1/16,1/16 or h2o:1/16,1/16,prune=0.25)", nameof(spec));
                return new Decode.HeavyHitterPolicy(Tokens(hh[0]), Tokens(hh[1]), prune);
            case "recycled" when parts.Length == 2:
                string[] rc = parts[1].Split(',');
                if (rc.Length != 2 || !int.TryParse(rc[0], System.Globalization.CultureInfo.InvariantCulture, out int period))
                {
                    throw new ArgumentException($"policy '{spec}': recycled takes PERIOD,TOKENS (e.g. recycled:8,1/8)", nameof(spec));
                }
                return new Decode.RecycledPolicy(period, Tokens(rc[1]));
            case "tokenselect" when parts.Length == 2:
                string[] ts = parts[1].Split(',');
                float threshold = 0.9f;
                foreach (string option in ts.Skip(1))
                {
                    string[] kv = option.Split('=', 2);
                    if (kv.Length == 2 && kv[0] == "reuse" && float.TryParse(kv[1], System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture, out float t)) threshold = t;
                    else throw new ArgumentException($"policy '{spec}': tokenselect takes reuse=COSINE after its budget; got '{option}'", nameof(spec));
                }
                return new Decode.TokenSelectPolicy(Tokens(ts[0]), threshold);
            case "retention" when parts.Length == 2:
                string[] rt = parts[1].Split(',');
                if (rt.Length != 2) throw new ArgumentException($"policy '{spec}': retention takes TOKENS,CHUNK (e.g. retention:1/16,1/16)", nameof(spec));
                return new Decode.RetentionPolicy(Tokens(rt[0]), Tokens(rt[1]));
            case "retrieval" when parts.Length == 2:
                string[] rv = parts[1].Split(',');
                if (rv.Length != 2) throw new ArgumentException($"policy '{spec}': retrieval takes TOKENS,SCAN (e.g. retrieval:1/8,1/4)", nameof(spec));
                return new Decode.RetrievalPolicy(Tokens(rv[0]), Tokens(rv[1]));
            case "streaming" when parts.Length == 2:
                string[] sw = parts[1].Split(',');
                if (sw.Length != 2) throw new ArgumentException($"policy '{spec}': streaming takes SINK,WINDOW (e.g. streaming:64,960)", nameof(spec));
                return new Decode.StreamingPolicy(Tokens(sw[0]), Tokens(sw[1]));
            default:
                throw new ArgumentException($"unknown policy '{spec}'; expected dense, streaming:SINK,WINDOW, quest:TOKENS|quest:1/8, moment:1/8, oracle:1/8 (diagnostic: the pages of most true mass), landmark:TOKENS, h2o:HEAVY,RECENT, recycled:PERIOD,TOKENS, tokenselect:TOKENS[,reuse=C], retrieval:TOKENS,SCAN or retention:TOKENS,CHUNK, optionally @N", nameof(spec));
        }
    }
}

/// <summary>Teacher-forced decoding quality: each step attends through the KV cache under a selection policy.</summary>
public static class DecodeEvaluation
{
    /// <summary>
    /// For each sequence of <paramref name="context"/> bytes: a dense prefill of all but the last
    /// <paramref name="decodeSteps"/> bytes fills an f32 KV cache, then every remaining byte is fed one step at a
    /// time (teacher forcing) with <paramref name="policy"/> choosing the pages each step reads; bits/byte of the
    /// predictions made from the last prefill position on. <c>null</c> policy: dense decoding.
    /// </summary>
    public static EvalResult BitsPerByte(LlamaModel model, ReadOnlySpan<byte> text, int context, int decodeSteps, Decode.IKvSelectionPolicy? policy,
        long maxBytes = long.MaxValue, KernelTuning? tuning = null, Action<int, int>? progress = null) =>
        BitsPerByte(model, text, context, decodeSteps, [new Decode.DecodeOptions { Policy = policy }], 64, maxBytes, tuning, progress);

    /// <summary>As the other overload with per-layer options (see <see cref="PolicySpec.ParseLayers"/>) and the cache's page size.</summary>
    public static EvalResult BitsPerByte(LlamaModel model, ReadOnlySpan<byte> text, int context, int decodeSteps, IReadOnlyList<Decode.DecodeOptions> options,
        int pageSize, long maxBytes = long.MaxValue, KernelTuning? tuning = null, Action<int, int>? progress = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        if (decodeSteps < 1 || decodeSteps >= context) throw new ArgumentOutOfRangeException(nameof(decodeSteps), decodeSteps, $"decodeSteps must be in 1..{context - 1}");
        int sequences = (int)(Math.Min(text.Length, maxBytes) / context);
        if (sequences == 0) throw new ArgumentException($"the text holds {text.Length} bytes, fewer than one context of {context}", nameof(text));
        LlamaConfig c = model.Config;
        int vocab = c.VocabSize, prefill = context - decodeSteps;
        double bits = 0, pages = 0;
        long count = 0, steps = 0;
        var total = Stopwatch.StartNew();
        for (int sq = 0; sq < sequences; sq++)
        {
            progress?.Invoke(sq, sequences);
            int[] tokens = ByteTokenizer.Encode(text.Slice(sq * context, context));
            var cache = new Decode.KvCache(c.Layers, c.KvHeads, c.HeadDim, storage: Tensors.DType.Float32, pageSize: pageSize);
            (int seq, float[] logits) = model.Prefill(tokens.AsSpan(0, prefill), cache, tuning);
            bits += Evaluation.CrossEntropyBits(logits.AsSpan((prefill - 1) * vocab, vocab), tokens[prefill]);
            count++;
            for (int t = prefill; t + 1 < context; t++)
            {
                float[] next = model.DecodeStep(tokens[t], t, cache, seq, options, tuning, out double fraction);
                pages += fraction;
                steps++;
                bits += Evaluation.CrossEntropyBits(next, tokens[t + 1]);
                count++;
            }
        }
        // Density here: the mean share of cached pages each step read.
        return new EvalResult(bits / count, count, steps == 0 ? 1 : pages / steps, total.Elapsed, TimeSpan.Zero, (long)sequences * decodeSteps);
    }
}
