using System.Globalization;
using System.Text.Json;

namespace Attend.Models;

/// <summary>
/// The fields of a Hugging Face Llama <c>config.json</c> the runner needs, read from transformers 4 and 5 namings
/// (<c>rope_theta</c> at the top level or inside <c>rope_parameters</c>/<c>rope_scaling</c>). Anything the runner
/// cannot honour (another architecture, biases, a rope type other than default) is rejected naming the file and field.
/// </summary>
public sealed record LlamaConfig
{
    /// <summary>Model width.</summary>
    public required int HiddenSize { get; init; }

    /// <summary>SwiGLU inner width.</summary>
    public required int IntermediateSize { get; init; }

    /// <summary>Decoder layers.</summary>
    public required int Layers { get; init; }

    /// <summary>Query heads.</summary>
    public required int Heads { get; init; }

    /// <summary>Key/value heads (GQA when fewer than <see cref="Heads"/>).</summary>
    public required int KvHeads { get; init; }

    /// <summary>Head dimension.</summary>
    public required int HeadDim { get; init; }

    /// <summary>Vocabulary size.</summary>
    public required int VocabSize { get; init; }

    /// <summary>RMSNorm epsilon.</summary>
    public double RmsNormEps { get; init; } = 1e-6;

    /// <summary>Rotary base θ.</summary>
    public double RopeTheta { get; init; } = 10000;

    /// <summary>Longest context the model was trained for.</summary>
    public int MaxPositions { get; init; } = 2048;

    /// <summary>Output projection shares the embedding matrix.</summary>
    public bool TieWordEmbeddings { get; init; }

    /// <summary>Reads and checks <paramref name="path"/> (a config.json).</summary>
    public static LlamaConfig Load(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"model config not found: {path}", path);
        using JsonDocument doc = JsonDocument.Parse(File.ReadAllText(path));
        JsonElement root = doc.RootElement;
        string file = Path.GetFileName(path);

        if (root.TryGetProperty("architectures", out JsonElement arch) && arch.ValueKind == JsonValueKind.Array
            && !arch.EnumerateArray().Any(a => a.GetString() is "LlamaForCausalLM" or "MistralForCausalLM"))
        {
            throw new NotSupportedException($"{file}: architectures = [{string.Join(", ", arch.EnumerateArray().Select(a => a.GetString()))}]; the runner supports LlamaForCausalLM");
        }
        if (root.TryGetProperty("model_type", out JsonElement type) && type.GetString() is { } t && t is not ("llama" or "mistral"))
        {
            throw new NotSupportedException($"{file}: model_type = \"{t}\"; the runner supports llama");
        }
        foreach (string flag in new[] { "attention_bias", "mlp_bias" })
        {
            if (root.TryGetProperty(flag, out JsonElement b) && b.ValueKind == JsonValueKind.True) throw new NotSupportedException($"{file}: {flag} = true is not supported (Llama without biases only)");
        }
        if (root.TryGetProperty("hidden_act", out JsonElement act) && act.GetString() is { } a && a is not ("silu" or "swish"))
        {
            throw new NotSupportedException($"{file}: hidden_act = \"{a}\"; the runner implements SwiGLU with silu");
        }

        int hidden = Int(root, "hidden_size", file);
        int heads = Int(root, "num_attention_heads", file);
        int kvHeads = root.TryGetProperty("num_key_value_heads", out JsonElement kv) && kv.ValueKind == JsonValueKind.Number ? kv.GetInt32() : heads;
        int headDim = root.TryGetProperty("head_dim", out JsonElement hd) && hd.ValueKind == JsonValueKind.Number ? hd.GetInt32() : (heads > 0 ? hidden / heads : 0);
        double theta = 10000;
        if (root.TryGetProperty("rope_theta", out JsonElement rt) && rt.ValueKind == JsonValueKind.Number) theta = rt.GetDouble();
        foreach (string key in new[] { "rope_parameters", "rope_scaling" })
        {
            if (!root.TryGetProperty(key, out JsonElement rp) || rp.ValueKind != JsonValueKind.Object) continue;
            if (rp.TryGetProperty("rope_theta", out JsonElement th) && th.ValueKind == JsonValueKind.Number) theta = th.GetDouble();
            string? ropeType = rp.TryGetProperty("rope_type", out JsonElement ty) ? ty.GetString() : rp.TryGetProperty("type", out JsonElement ty2) ? ty2.GetString() : null;
            if (ropeType is not (null or "default"))
            {
                throw new NotSupportedException($"{file}: {key}.rope_type = \"{ropeType}\"; the runner supports the default rotary embedding only");
            }
        }
        var config = new LlamaConfig
        {
            HiddenSize = hidden,
            IntermediateSize = Int(root, "intermediate_size", file),
            Layers = Int(root, "num_hidden_layers", file),
            Heads = heads,
            KvHeads = kvHeads,
            HeadDim = headDim,
            VocabSize = Int(root, "vocab_size", file),
            RmsNormEps = root.TryGetProperty("rms_norm_eps", out JsonElement eps) && eps.ValueKind == JsonValueKind.Number ? eps.GetDouble() : 1e-6,
            RopeTheta = theta,
            MaxPositions = root.TryGetProperty("max_position_embeddings", out JsonElement mp) && mp.ValueKind == JsonValueKind.Number ? mp.GetInt32() : 2048,
            TieWordEmbeddings = root.TryGetProperty("tie_word_embeddings", out JsonElement tie) && tie.ValueKind == JsonValueKind.True,
        };
        config.Validate(file);
        return config;
    }

    private void Validate(string file)
    {
        void Positive(string field, int value)
        {
            if (value < 1) throw new InvalidDataException($"{file}: {field} must be ≥ 1; got {value}");
        }
        Positive("hidden_size", HiddenSize);
        Positive("intermediate_size", IntermediateSize);
        Positive("num_hidden_layers", Layers);
        Positive("num_attention_heads", Heads);
        Positive("num_key_value_heads", KvHeads);
        Positive("head_dim", HeadDim);
        Positive("vocab_size", VocabSize);
        if (Heads % KvHeads != 0) throw new InvalidDataException($"{file}: num_attention_heads = {Heads} is not a multiple of num_key_value_heads = {KvHeads}");
        if (HeadDim % 2 != 0) throw new InvalidDataException($"{file}: head_dim = {HeadDim} must be even for rotary embeddings");
        if (!(RopeTheta > 0)) throw new InvalidDataException($"{file}: rope_theta must be > 0; got {RopeTheta.ToString(CultureInfo.InvariantCulture)}");
        if (!(RmsNormEps > 0)) throw new InvalidDataException($"{file}: rms_norm_eps must be > 0");
    }

    private static int Int(JsonElement root, string name, string file)
    {
        if (!root.TryGetProperty(name, out JsonElement e)) throw new InvalidDataException($"{file}: missing field \"{name}\"");
        if (e.ValueKind != JsonValueKind.Number || !e.TryGetInt32(out int v)) throw new InvalidDataException($"{file}: field \"{name}\" must be an integer; got {e}");
        return v;
    }
}
