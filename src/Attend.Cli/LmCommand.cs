using System.CommandLine;
using System.Diagnostics;
using System.Text.Json.Nodes;
using Attend.Models;

namespace Attend.Cli;

/// <summary>
/// <c>attend lm eval|generate|compare</c>: a Llama-family checkpoint run on Attend — bits/byte of text under any
/// attention (dense, windows, masks, selectors, Auto), generation through the KV cache with a selection policy, and
/// the quality table of every method against dense in one run.
/// </summary>
internal static class LmCommand
{
    public static Command Create()
    {
        var command = new Command("lm", "run a Llama-family model (Hugging Face folder) on Attend's attention");
        command.Subcommands.Add(Eval());
        command.Subcommands.Add(Generate());
        command.Subcommands.Add(Compare());
        return command;
    }

    private static Option<string> ModelOption() => new("--model") { Description = "model folder (config.json + safetensors)", Required = true };

    private static Option<int> PageSizeOption() => new("--page-size") { Description = "tokens per KV-cache page for teacher-forced decoding (Quest's paper uses 16)", DefaultValueFactory = _ => 64 };

    private static Option<int> Threads() => new("--threads") { Description = "worker threads (0: all cores)" };

    private static Command Eval()
    {
        var model = ModelOption();
        var text = new Option<string>("--text") { Description = "text file (bytes)", Required = true };
        var context = new Option<int>("--context") { Description = "sequence length", DefaultValueFactory = _ => 8192 };
        var bytes = new Option<long>("--bytes") { Description = "use the first N bytes (default: 8 contexts)" };
        var attention = new Option<string>("--attention") { Description = "dense | window:N | sink:S+window:N | mask:EXPR | selector spec (xattention:t=0.9, auto:err=0.02, ...)", DefaultValueFactory = _ => "dense" };
        var policy = new Option<string?>("--policy") { Description = "teacher-forced decoding instead of prefill: dense | streaming:S,W | quest:1/8[,recent=N][@LAYERS] | moment:1/8 | oracle:1/8 | landmark:1/8 | h2o:H,R[,prune=F] | recycled:P,N | tokenselect:N | retrieval:N,SCAN | retention:N,CHUNK (with --decode-steps)" };
        var steps = new Option<int>("--decode-steps") { Description = "with --policy: bytes decoded one by one at the end of each context", DefaultValueFactory = _ => 1024 };
        var pageSize = PageSizeOption();
        var threads = Threads();
        var json = new Option<string?>("--json") { Description = "write a JSON summary to this file ('-' for stdout)" };
        var cmd = new Command("eval", "bits/byte of a text under an attention method (prefill) or a KV policy (teacher-forced decoding)");
        foreach (Option o in new Option[] { model, text, context, bytes, attention, policy, steps, pageSize, threads, json }) cmd.Options.Add(o);
        cmd.SetAction(r =>
        {
            LlamaModel m = LlamaModel.Load(r.GetValue(model)!);
            byte[] data = ReadText(r.GetValue(text)!);
            int ctx = r.GetValue(context);
            long limit = r.GetValue(bytes) is > 0 and var b ? b : 8L * ctx;
            var tuning = new KernelTuning { Threads = r.GetValue(threads) };
            string? jsonPath = r.GetValue(json);
            EvalResult result;
            string method;
            if (r.GetValue(policy) is { } policySpec)
            {
                method = "decode " + policySpec;
                result = DecodeEvaluation.BitsPerByte(m, data, ctx, r.GetValue(steps), PolicySpec.ParseLayers(policySpec, ctx, m.Config.Layers), r.GetValue(pageSize), limit, tuning, Progress(jsonPath));
            }
            else
            {
                AttentionChoice choice = AttentionChoice.Parse(r.GetValue(attention)!);
                method = choice.Spec;
                result = Evaluation.BitsPerByte(m, data, ctx, [choice], limit, tuning, Progress(jsonPath));
            }
            if (jsonPath != "-")
            {
                Console.WriteLine($"{method}: {result.BitsPerByte:F5} bits/byte over {result.Predictions} predictions, density {result.Density:F3}, " +
                    $"{result.Elapsed.TotalSeconds:F1} s ({result.TokensPerSecond:F0} tokens/s; attention {result.AttentionTime.TotalSeconds:F1} s)");
            }
            JsonOutput.Write(jsonPath, ToJson(method, ctx, result));
            return 0;
        });
        return cmd;
    }

    private static Command Generate()
    {
        var model = ModelOption();
        var prompt = new Option<string>("--prompt-file") { Description = "prompt bytes", Required = true };
        var maxNew = new Option<int>("--max-new") { Description = "bytes to generate", DefaultValueFactory = _ => 256 };
        var policy = new Option<string>("--policy") { Description = "dense | streaming:S,W | quest:TOKENS | quest:1/8 | landmark:N | h2o:H,R[,prune=F] | recycled:P,N | tokenselect:N | retrieval:N,SCAN | retention:N,CHUNK", DefaultValueFactory = _ => "dense" };
        var temperature = new Option<double>("--temperature") { Description = "0: greedy", DefaultValueFactory = _ => 0 };
        var seed = new Option<int>("--seed") { Description = "sampling seed", DefaultValueFactory = _ => 1 };
        var threads = Threads();
        var json = new Option<string?>("--json") { Description = "write a JSON summary to this file ('-' for stdout)" };
        var cmd = new Command("generate", "generate bytes through the KV cache, streaming them to stdout");
        foreach (Option o in new Option[] { model, prompt, maxNew, policy, temperature, seed, threads, json }) cmd.Options.Add(o);
        cmd.SetAction(r =>
        {
            LlamaModel m = LlamaModel.Load(r.GetValue(model)!);
            byte[] promptBytes = ReadText(r.GetValue(prompt)!);
            if (promptBytes.Length == 0) throw new ArgumentException("--prompt-file: the prompt is empty");
            int n = r.GetValue(maxNew);
            if (n < 0) throw new ArgumentException($"--max-new must be ≥ 0; got {n}");
            if (promptBytes.Length + n > m.Config.MaxPositions)
            {
                throw new ArgumentException($"prompt ({promptBytes.Length} bytes) + --max-new ({n}) exceed the model's context of {m.Config.MaxPositions}");
            }
            double temp = r.GetValue(temperature);
            if (!(temp >= 0)) throw new ArgumentException($"--temperature must be ≥ 0; got {temp}");
            var tuning = new KernelTuning { Threads = r.GetValue(threads) };
            var options = new Decode.DecodeOptions { Policy = PolicySpec.Parse(r.GetValue(policy)!, m.Config.MaxPositions) };
            var cache = new Decode.KvCache(m.Config.Layers, m.Config.KvHeads, m.Config.HeadDim);
            var sw = Stopwatch.StartNew();
            (int seq, float[] logits) = m.Prefill(ByteTokenizer.Encode(promptBytes), cache, tuning);
            double prefillMs = sw.Elapsed.TotalMilliseconds;
            float[] next = logits.AsSpan((promptBytes.Length - 1) * m.Config.VocabSize, m.Config.VocabSize).ToArray();
            var rng = new Random(r.GetValue(seed));
            var output = new List<byte>();
            string? jsonPath = r.GetValue(json);
            using Stream stdout = Console.OpenStandardOutput();
            sw.Restart();
            for (int i = 0; i < n; i++)
            {
                int token = Sample(next, temp, rng);
                output.Add(ByteTokenizer.Decode(token));
                if (jsonPath != "-")
                {
                    stdout.WriteByte((byte)token);
                    stdout.Flush();
                }
                if (i + 1 < n) next = m.DecodeStep(token, promptBytes.Length + i, cache, seq, options, tuning);
            }
            double genMs = sw.Elapsed.TotalMilliseconds;
            if (jsonPath != "-") Console.Error.WriteLine($"\n[prefill {promptBytes.Length} bytes in {prefillMs:F0} ms; {n} bytes at {n / Math.Max(genMs / 1000, 1e-9):F1} tokens/s, policy {r.GetValue(policy)}]");
            JsonOutput.Write(jsonPath, new JsonObject
            {
                ["command"] = "lm generate", ["policy"] = r.GetValue(policy), ["promptBytes"] = promptBytes.Length, ["generated"] = n,
                ["prefillMs"] = prefillMs, ["tokensPerSecond"] = n / Math.Max(genMs / 1000, 1e-9), ["text"] = System.Text.Encoding.UTF8.GetString([.. output]),
            });
            return 0;
        });
        return cmd;
    }

    private static Command Compare()
    {
        var model = ModelOption();
        var text = new Option<string>("--text") { Description = "text file (bytes)", Required = true };
        var context = new Option<int>("--context") { Description = "sequence length", DefaultValueFactory = _ => 8192 };
        var bytes = new Option<long>("--bytes") { Description = "use the first N bytes (default: 8 contexts)" };
        var attention = new Option<string[]>("--attention") { Description = "methods (default: dense, windows, sink+window, every selector, per-row top-k 512, auto)", AllowMultipleArgumentsPerToken = true };
        var policies = new Option<string[]>("--policy") { Description = "KV policies for teacher-forced decoding (default: every policy at 1/8: dense, streaming:64,1/8-64, quest, landmark, h2o 1/16+1/16, recycled every 8, tokenselect, retrieval scanning 1/4, retention 1/16 + chunks of 1/16)", AllowMultipleArgumentsPerToken = true };
        var steps = new Option<int>("--decode-steps") { Description = "bytes decoded one by one at the end of each context", DefaultValueFactory = _ => 1024 };
        var pageSize = PageSizeOption();
        var threads = Threads();
        var json = new Option<string?>("--json") { Description = "write the table as JSON ('-' for stdout)" };
        var html = new Option<string?>("--html") { Description = "also write the table and a quality-vs-density chart as one HTML file" };
        var cmd = new Command("compare", "the quality table: bits/byte, density and speed vs dense of every attention method and KV policy, one run");
        foreach (Option o in new Option[] { model, text, context, bytes, attention, policies, steps, pageSize, threads, json, html }) cmd.Options.Add(o);
        cmd.SetAction(r =>
        {
            LlamaModel m = LlamaModel.Load(r.GetValue(model)!);
            byte[] data = ReadText(r.GetValue(text)!);
            int ctx = r.GetValue(context);
            long limit = r.GetValue(bytes) is > 0 and var b ? b : 8L * ctx;
            var tuning = new KernelTuning { Threads = r.GetValue(threads) };
            string? htmlPath = r.GetValue(html);
            string[] methods = r.GetValue(attention) is { Length: > 0 } a ? a :
                ["dense", "window:256", "window:1024", "window:2048", "sink:64+window:1024", .. Sparse.Selectors.Names, "topk:k=512", "auto:err=0.02"];
            string[] policyList = r.GetValue(policies) is { Length: > 0 } p ? p : ["dense", $"streaming:64,{ctx / 8 - 64}", "quest:1/8", "landmark:1/8", "h2o:1/16,1/16", "recycled:8,1/8", "tokenselect:1/8", "retrieval:1/8,1/4", "retention:1/16,1/16"];
            string? jsonPath = r.GetValue(json);
            var rows = new JsonArray();
            double? denseSeconds = null, denseBits = null;
            foreach (string spec in methods)
            {
                AttentionChoice choice = AttentionChoice.Parse(spec);
                EvalResult e = Evaluation.BitsPerByte(m, data, ctx, [choice], limit, tuning, Progress(jsonPath, spec));
                denseSeconds ??= e.Elapsed.TotalSeconds;
                denseBits ??= e.BitsPerByte;
                JsonObject row = ToJson(choice.Spec, ctx, e);
                row["speedupVsDense"] = denseSeconds / e.Elapsed.TotalSeconds;
                row["bitsOverDense"] = e.BitsPerByte - denseBits;
                rows.Add((JsonNode)row);
                if (jsonPath != "-") Console.WriteLine($"{choice.Spec,-36} {e.BitsPerByte:F5} bits/byte  density {e.Density:F3}  {e.Elapsed.TotalSeconds,7:F1} s  {denseSeconds / e.Elapsed.TotalSeconds:F2}x dense");
            }
            double? denseDecode = null;
            foreach (string spec in policyList)
            {
                EvalResult e = DecodeEvaluation.BitsPerByte(m, data, ctx, r.GetValue(steps), PolicySpec.ParseLayers(spec, ctx, m.Config.Layers), r.GetValue(pageSize), limit, tuning, Progress(jsonPath, spec));
                denseDecode ??= e.Elapsed.TotalSeconds;
                JsonObject row = ToJson("decode " + spec, ctx, e);
                row["speedupVsDense"] = denseDecode / e.Elapsed.TotalSeconds;
                row["bitsOverDense"] = e.BitsPerByte - denseBits;
                rows.Add((JsonNode)row);
                if (jsonPath != "-") Console.WriteLine($"{"decode " + spec,-36} {e.BitsPerByte:F5} bits/byte  pages read {e.Density:F3}  {e.Elapsed.TotalSeconds,7:F1} s  {denseDecode / e.Elapsed.TotalSeconds:F2}x dense decode");
            }
            var result = new JsonObject
            {
                ["schema"] = "attend.lm-compare", ["schemaVersion"] = 1, ["model"] = r.GetValue(model), ["context"] = ctx, ["bytes"] = limit,
                ["decodeSteps"] = r.GetValue(steps), ["pageSize"] = r.GetValue(pageSize), ["machine"] = BenchCommand.Machine(), ["rows"] = rows,
            };
            JsonOutput.Write(jsonPath, result);
            if (htmlPath is not null) File.WriteAllText(htmlPath, Report.RenderLanguageModel(result));
            return 0;
        });
        return cmd;
    }

    private static Action<int, int>? Progress(string? jsonPath, string? label = null) =>
        jsonPath == "-" || Console.IsErrorRedirected ? null : (i, n) => Console.Error.Write($"\r  {label ?? "eval"}: sequence {i + 1}/{n}   ");

    private static byte[] ReadText(string path) =>
        File.Exists(path) ? File.ReadAllBytes(path) : throw new FileNotFoundException($"text file not found: {path}", path);

    private static int Sample(float[] logits, double temperature, Random rng)
    {
        int best = 0;
        for (int i = 1; i < logits.Length; i++) if (logits[i] > logits[best]) best = i;
        if (temperature == 0) return best;
        double sum = 0;
        var p = new double[logits.Length];
        for (int i = 0; i < p.Length; i++) sum += p[i] = Math.Exp((logits[i] - logits[best]) / temperature);
        double u = rng.NextDouble() * sum;
        for (int i = 0; i < p.Length; i++)
        {
            u -= p[i];
            if (u <= 0) return i;
        }
        return best;
    }

    private static JsonObject ToJson(string method, int context, EvalResult e) => new()
    {
        ["method"] = method, ["context"] = context, ["bitsPerByte"] = e.BitsPerByte, ["predictions"] = e.Predictions, ["density"] = JsonOutput.Number(e.Density),
        ["seconds"] = e.Elapsed.TotalSeconds, ["attentionSeconds"] = e.AttentionTime.TotalSeconds, ["tokensPerSecond"] = e.TokensPerSecond,
    };
}
