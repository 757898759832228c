using System.Text.Json.Nodes;
using Attend.Models;
using Attend.Tensors;

namespace Attend.Tests;

/// <summary>The Llama runner against PyTorch's reference figures for the shipped model, plus a tiny synthetic checkpoint for every loading path and bad input.</summary>
public sealed class ModelRunnerTests : IDisposable
{
    private static readonly string ModelDir = Path.Combine(RepoPaths.Shared, "models", "byte-llama-8k");
    private static readonly Lazy<LlamaModel> Shipped = new(() => LlamaModel.Load(ModelDir));
    private readonly string _dir = Directory.CreateTempSubdirectory("attend-lm-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static byte[] Heldout => File.ReadAllBytes(Path.Combine(ModelDir, "heldout.txt"));

    [Fact]
    public void Logits_match_pytorch_on_the_first_512_bytes()
    {
        if (!Directory.Exists(ModelDir)) return;   // the shared model is part of the workspace, not of a bare clone
        JsonNode reference = JsonNode.Parse(File.ReadAllText(Path.Combine(ModelDir, "reference-eval.json")))!;
        float[] logits = Shipped.Value.Forward(ByteTokenizer.Encode(Heldout.AsSpan(0, 512)), [AttentionChoice.Dense], null, out _);
        for (int j = 0; j < 8; j++)
        {
            Assert.Equal(reference["logits_row0_first8"]![j]!.GetValue<double>(), logits[j], 1e-3);
            Assert.Equal(reference["logits_row511_first8"]![j]!.GetValue<double>(), logits[(511 * 256) + j], 1e-3);
            double rowSum = logits.AsSpan(j * 256, 256).ToArray().Sum(x => (double)x);
            Assert.Equal(reference["logits_first512_rows_sum"]![j]!.GetValue<double>(), rowSum, 0.05);   // a sum of 256 logits
        }
    }

    [Fact]
    public void Bits_per_byte_at_context_2048_match_pytorch()
    {
        if (!Directory.Exists(ModelDir)) return;
        EvalResult r = Evaluation.BitsPerByte(Shipped.Value, Heldout, 2048, [AttentionChoice.Dense], 16384);
        Assert.Equal(1.05260, r.BitsPerByte, 0.0005);
        Assert.Equal(8 * 2047, r.Predictions);
    }

    [Fact]
    public void Teacher_forced_decoding_equals_prefill_and_a_covering_policy_equals_dense()
    {
        if (!Directory.Exists(ModelDir)) return;
        byte[] text = Heldout.AsSpan(0, 640).ToArray();
        LlamaModel m = Shipped.Value;
        float[] logits = m.Forward(ByteTokenizer.Encode(text), [AttentionChoice.Dense], null, out _);
        double prefill = 0;
        for (int i = 639 - 64; i < 639; i++) prefill += Evaluation.CrossEntropyBits(logits.AsSpan(i * 256, 256), text[i + 1]);
        prefill /= 64;
        EvalResult dense = DecodeEvaluation.BitsPerByte(m, text, 640, 64, null);
        Assert.Equal(prefill, dense.BitsPerByte, 1e-4);
        EvalResult quest = DecodeEvaluation.BitsPerByte(m, text, 640, 64, new Decode.QuestPolicy(100_000));
        Assert.Equal(dense.BitsPerByte, quest.BitsPerByte, 1e-9);
        EvalResult perHead = DecodeEvaluation.BitsPerByte(m, text, 640, 64, PolicySpec.Parse("quest:100000,per-head", 640));
        Assert.Equal(dense.BitsPerByte, perHead.BitsPerByte, 1e-9);
        EvalResult small = DecodeEvaluation.BitsPerByte(m, text, 640, 64, PolicySpec.Parse("quest:128,per-head,recent=64", 640));
        Assert.InRange(small.Density, 0.1, 0.6);
        EvalResult streaming = DecodeEvaluation.BitsPerByte(m, text, 640, 64, PolicySpec.Parse("streaming:64,192", 640));
        Assert.InRange(streaming.Density, 0.3, 0.6);
    }

    [Fact]
    public void Window_choice_equals_its_mask_and_specs_parse()
    {
        Assert.Equal("dense", AttentionChoice.Parse("dense").Spec);
        Assert.Equal("sink:64+window:1024", AttentionChoice.Parse("sink:64+window:1024").Spec);
        Assert.Equal("xattention:t=0.9", AttentionChoice.Parse("xattention:t=0.9").Spec);
        Assert.Contains("positive integer", Assert.Throws<ArgumentException>(() => AttentionChoice.Parse("window:0")).Message);
        Assert.Contains("unknown selector", Assert.Throws<ArgumentException>(() => AttentionChoice.Parse("magic")).Message);
        Assert.Null(PolicySpec.Parse("dense", 8192));
        Assert.IsType<Decode.QuestPolicy>(PolicySpec.Parse("quest:1/8", 8192));
        Assert.Contains("unknown policy", Assert.Throws<ArgumentException>(() => PolicySpec.Parse("magic:5", 8192)).Message);
        Assert.IsType<Decode.LandmarkPolicy>(PolicySpec.Parse("landmark:1/8,recent=64", 8192));
        Assert.IsType<Decode.HeavyHitterPolicy>(PolicySpec.Parse("h2o:1/16,1/16", 8192));
        Assert.IsType<Decode.HeavyHitterPolicy>(PolicySpec.Parse("h2o:1/16,1/16,prune=0.25", 8192));
        Assert.Contains("pruned head fraction", Assert.Throws<ArgumentOutOfRangeException>(() => PolicySpec.Parse("h2o:1/16,1/16,prune=1.5", 8192)).Message);
        Assert.IsType<Decode.RecycledPolicy>(PolicySpec.Parse("recycled:8,1/8", 8192));
        Assert.IsType<Decode.TokenSelectPolicy>(PolicySpec.Parse("tokenselect:1/8", 8192));
        Assert.IsType<Decode.RetrievalPolicy>(PolicySpec.Parse("retrieval:1/8,1/4", 8192));
        Assert.IsType<Decode.RetentionPolicy>(PolicySpec.Parse("retention:1/16,1/16", 8192));
        Assert.Contains("HEAVY,RECENT", Assert.Throws<ArgumentException>(() => PolicySpec.Parse("h2o:5", 8192)).Message);
        Assert.Contains("PERIOD,TOKENS", Assert.Throws<ArgumentException>(() => PolicySpec.Parse("recycled:x,5", 8192)).Message);
    }

    // A tiny random Llama (hidden 16, 2 layers, 4/2 heads of 4, vocab 256) in the transformers-4 naming, with tied embeddings.
    private void WriteTiny(string dir, DType dtype, Action<JsonObject>? editConfig = null, Func<string, int[], int[]>? editShape = null, bool tied = true)
    {
        Directory.CreateDirectory(dir);
        var config = new JsonObject
        {
            ["architectures"] = new JsonArray("LlamaForCausalLM"), ["model_type"] = "llama", ["hidden_size"] = 16, ["intermediate_size"] = 24,
            ["num_hidden_layers"] = 2, ["num_attention_heads"] = 4, ["num_key_value_heads"] = 2, ["vocab_size"] = 256, ["rms_norm_eps"] = 1e-5,
            ["rope_theta"] = 500000.0, ["max_position_embeddings"] = 64, ["tie_word_embeddings"] = tied, ["hidden_act"] = "silu",
        };
        editConfig?.Invoke(config);
        File.WriteAllText(Path.Combine(dir, "config.json"), config.ToJsonString());
        var tensors = new Dictionary<string, Tensor>();
        int seed = 1;
        void Add(string name, params int[] shape)
        {
            shape = editShape?.Invoke(name, shape) ?? shape;
            tensors[name] = Tensor.FromArray(TestData.Normal(shape.Aggregate(1, (a, b) => a * b), seed++, 0.3f), shape).ConvertTo(dtype);
        }
        Add("model.embed_tokens.weight", 256, 16);
        if (!tied) Add("lm_head.weight", 256, 16);
        Add("model.norm.weight", 16);
        for (int l = 0; l < 2; l++)
        {
            string p = $"model.layers.{l}.";
            Add(p + "input_layernorm.weight", 16);
            Add(p + "post_attention_layernorm.weight", 16);
            Add(p + "self_attn.q_proj.weight", 16, 16);
            Add(p + "self_attn.k_proj.weight", 8, 16);
            Add(p + "self_attn.v_proj.weight", 8, 16);
            Add(p + "self_attn.o_proj.weight", 16, 16);
            Add(p + "mlp.gate_proj.weight", 24, 16);
            Add(p + "mlp.up_proj.weight", 24, 16);
            Add(p + "mlp.down_proj.weight", 16, 24);
        }
        SafeTensors.Write(Path.Combine(dir, "model.safetensors"), tensors);
    }

    [Theory]
    [InlineData(DType.Float32)]
    [InlineData(DType.BFloat16)]
    [InlineData(DType.Float16)]
    public void A_tiny_checkpoint_loads_in_any_dtype_and_prefill_equals_decoding(DType dtype)
    {
        string dir = Path.Combine(_dir, dtype.ToString());
        WriteTiny(dir, dtype, tied: dtype != DType.Float32);
        LlamaModel m = LlamaModel.Load(dir);
        Assert.Equal(500000, m.Config.RopeTheta);
        int[] tokens = [.. Enumerable.Range(0, 40).Select(i => (i * 37) % 256)];
        float[] logits = m.Forward(tokens, [AttentionChoice.Dense], null, out _);
        var cache = new Decode.KvCache(2, 2, 4, storage: DType.Float32);
        (int seq, float[] first) = m.Prefill(tokens.AsSpan(0, 30), cache);
        Assert.Equal(logits.AsSpan(0, 30 * 256).ToArray(), first, new ToleranceComparer(1e-5f));
        for (int t = 30; t < 40; t++)
        {
            float[] step = m.DecodeStep(tokens[t], t, cache, seq, new Decode.DecodeOptions());
            for (int j = 0; j < 256; j++) Assert.Equal(logits[(t * 256) + j], step[j], 1e-3f);
        }
    }

    private sealed class ToleranceComparer(float tolerance) : IEqualityComparer<float>
    {
        public bool Equals(float x, float y) => Math.Abs(x - y) <= tolerance * Math.Max(1, Math.Abs(y));
        public int GetHashCode(float obj) => 0;
    }

    [Fact]
    public void Bad_checkpoints_and_inputs_name_the_file_and_field()
    {
        string Fail<TE>(Action<JsonObject>? config = null, Func<string, int[], int[]>? shape = null, Action<string>? mutate = null) where TE : Exception
        {
            string dir = Path.Combine(_dir, Guid.NewGuid().ToString("N"));
            WriteTiny(dir, DType.Float16, config, shape);
            mutate?.Invoke(dir);
            return Assert.ThrowsAny<TE>(() => LlamaModel.Load(dir)).Message;
        }
        Assert.Contains("config.json: missing field \"hidden_size\"", Fail<InvalidDataException>(c => c.Remove("hidden_size")));
        Assert.Contains("architectures", Fail<NotSupportedException>(c => c["architectures"] = new JsonArray("GPT2LMHeadModel")));
        Assert.Contains("rope_type", Fail<NotSupportedException>(c => c["rope_parameters"] = new JsonObject { ["rope_type"] = "yarn", ["rope_theta"] = 1.0 }));
        Assert.Contains("attention_bias", Fail<NotSupportedException>(c => c["attention_bias"] = true));
        Assert.Contains("not a multiple", Fail<InvalidDataException>(c => c["num_key_value_heads"] = 3));
        string shapeMessage = Fail<InvalidDataException>(shape: (n, s) => n == "model.layers.1.mlp.up_proj.weight" ? [25, 16] : s);
        Assert.Contains("model.layers.1.mlp.up_proj.weight", shapeMessage);
        Assert.Contains("[25, 16]", shapeMessage);
        Assert.Contains("neither model.safetensors", Fail<FileNotFoundException>(mutate: d => File.Delete(Path.Combine(d, "model.safetensors"))));
        Assert.Contains("shard", Fail<FileNotFoundException>(mutate: d => File.WriteAllText(Path.Combine(d, "model.safetensors.index.json"),
            """{"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}""")));

        string ok = Path.Combine(_dir, "ok");
        WriteTiny(ok, DType.Float16);
        LlamaModel m = LlamaModel.Load(ok);
        Assert.Contains("exceed the model's context", Assert.Throws<ArgumentException>(() => m.Forward(new int[65], [AttentionChoice.Dense], null, out _)).Message);
        Assert.Contains("outside the vocabulary", Assert.Throws<ArgumentException>(() => m.Forward([1, 300], [AttentionChoice.Dense], null, out _)).Message);
        Assert.Contains("max_position_embeddings", Assert.Throws<ArgumentOutOfRangeException>(() => Evaluation.BitsPerByte(m, new byte[1000], 128, [AttentionChoice.Dense])).Message);
    }
}
