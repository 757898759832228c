using System.Text.Json.Nodes;
using Attend.Tensors;

namespace Attend.Tests;

/// <summary>The CLI in-process: the file contract of <c>attend run</c>, <c>verify</c>, <c>bench</c> and exit code 2 on bad input.</summary>
[Collection("Console")]
public sealed class CliTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("attend-cli-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string P(string name) => Path.Combine(_dir, name);

    private static (int Code, string Out, string Err) Cli(params string[] args)
    {
        TextWriter stdout = Console.Out, stderr = Console.Error;
        var o = new StringWriter();
        var e = new StringWriter();
        Console.SetOut(o);
        Console.SetError(e);
        try
        {
            System.Reflection.MethodInfo main = typeof(Attend.Cli.CliErrors).Assembly.EntryPoint!;
            int code = (int)main.Invoke(null, [args])!;
            return (code, o.ToString(), e.ToString());
        }
        finally
        {
            Console.SetOut(stdout);
            Console.SetError(stderr);
        }
    }

    private void WriteInputs(DType dtype, int s = 40, int h = 2, int d = 16)
    {
        Npy.Write(P("q.npy"), Tensor.FromArray(TestData.Normal(s * h * d, 1), 1, s, h, d).ConvertTo(dtype));
        Npy.Write(P("k.npy"), Tensor.FromArray(TestData.Normal(s * h * d, 2), 1, s, h, d).ConvertTo(dtype));
        Npy.Write(P("v.npy"), Tensor.FromArray(TestData.Normal(s * h * d, 3), 1, s, h, d).ConvertTo(dtype));
    }

    [Theory]
    [InlineData(DType.Float32)]
    [InlineData(DType.BFloat16)]
    public void Should_run_on_files_and_match_the_library(DType dtype)
    {
        WriteInputs(dtype);
        var (code, _, err) = Cli("run", "--q", P("q.npy"), "--k", P("k.npy"), "--v", P("v.npy"), "--out", P("o.npy"), "--lse", P("lse.npy"), "--causal");
        Assert.True(code == 0, err);
        Tensor o = Npy.Read(P("o.npy"));
        Assert.Equal(dtype, o.DType);
        Assert.Equal([1, 40, 2, 16], o.Shape);
        Assert.Equal([1, 40, 2], Npy.Read(P("lse.npy")).Shape);
    }

    [Fact]
    public void Should_generate_structured_inputs_run_a_selector_and_bench_it_with_metrics()
    {
        string gen = P("gen");
        var (code, _, err) = Cli("gen", "--shape", "1,1024,2,32", "--seed", "3", "-o", gen, "--json", P("gen.json"));
        Assert.True(code == 0, err);
        Assert.Equal([1, 1024, 2, 32], Npy.Read(Path.Combine(gen, "q.npy")).Shape);
        Assert.True(File.Exists(Path.Combine(gen, "needles.json")));
        Assert.Equal(2, JsonNode.Parse(File.ReadAllText(P("gen.json")))!["topKeyMassShare"]!.AsArray().Count);

        (code, _, err) = Cli("run", "--q", Path.Combine(gen, "q.npy"), "--k", Path.Combine(gen, "k.npy"), "--v", Path.Combine(gen, "v.npy"),
            "--out", P("o.npy"), "--causal", "--selector", "xattention:t=0.9,block=64");
        Assert.True(code == 0, err);
        Assert.Equal([1, 1024, 2, 32], Npy.Read(P("o.npy")).Shape);

        (code, _, err) = Cli("bench", "--suite", "sparse", "--inputs", gen, "--selector", "pooled:block=64", "anchor:block=64", "auto:err=0.05,sample=256", "--json", P("b.json"));
        Assert.True(code == 0, err);
        JsonArray rows = JsonNode.Parse(File.ReadAllText(P("b.json")))!["rows"]!.AsArray();
        Assert.Equal(4, rows.Count);
        foreach (JsonNode? row in rows.Skip(1))
        {
            // Every approximate row carries its error metrics and its selection time.
            foreach (string field in new[] { "relativeL2", "cosine", "recall", "needleHitRate", "selectionMs", "density", "speedupVsDense" })
            {
                Assert.True(row![field] is not null, $"{row["method"]}: {field} missing");
            }
        }

        (code, _, err) = Cli("run", "--q", P("o.npy"), "--k", P("o.npy"), "--v", P("o.npy"), "--out", P("x.npy"), "--selector", "magic");
        Assert.Equal(2, code);
        Assert.Contains("unknown selector", err);
        (code, _, err) = Cli("gen", "--shape", "1,64,1,16", "-o", P("g2"));
        Assert.Equal(2, code);
        Assert.Contains("D ≥ 32", err);
    }

    [Fact]
    public void Should_evaluate_and_generate_with_the_shared_model()
    {
        string model = Path.Combine(RepoPaths.Shared, "models", "byte-llama-8k");
        if (!Directory.Exists(model)) return;   // shared/ sits beside every checkout and CI clone
        string text = Path.Combine(model, "heldout.txt");
        var (code, _, err) = Cli("lm", "eval", "--model", model, "--text", text, "--context", "256", "--bytes", "512", "--attention", "window:64", "--json", P("e.json"));
        Assert.True(code == 0, err);
        JsonNode e = JsonNode.Parse(File.ReadAllText(P("e.json")))!;
        Assert.Equal(2 * 255, e["predictions"]!.GetValue<long>());
        Assert.InRange(e["bitsPerByte"]!.GetValue<double>(), 0.3, 4);
        Assert.InRange(e["density"]!.GetValue<double>(), 0.2, 0.7);
        File.WriteAllText(P("prompt.py"), "def main():\n    ");
        (code, _, err) = Cli("lm", "generate", "--model", model, "--prompt-file", P("prompt.py"), "--max-new", "6", "--policy", "quest:128", "--json", P("g.json"));
        Assert.True(code == 0, err);
        Assert.Equal(6, JsonNode.Parse(File.ReadAllText(P("g.json")))!["generated"]!.GetValue<int>());
        (code, _, err) = Cli("lm", "eval", "--model", P("missing"), "--text", text);
        Assert.Equal(2, code);
        Assert.Contains("config", err);
        (code, _, err) = Cli("lm", "eval", "--model", model, "--text", text, "--context", "9000");
        Assert.Equal(2, code);
        Assert.Contains("max_position_embeddings", err);
    }

    [Fact]
    public void Should_merge_peer_rows_and_write_csv_and_a_report()
    {
        File.WriteAllText(P("peers.json"), """
            [{"shape": [1, 4096, 32, 32, 128], "mask": "causal", "device": "cuda", "dtype": "bf16", "peer": "sdpa_flash_attention", "ms": 0.5, "ms_min": 0.48, "ms_max": 0.53, "visited_fraction": 0.5},
             {"shape": [1, 16384, 32, 32, 128], "mask": "causal", "device": "cuda", "dtype": "bf16", "peer": "sdpa_flash_attention", "ms": 6.4, "visited_fraction": 0.5},
             {"shape": [1, 4096, 32, 32, 128], "mask": "causal", "device": "cuda", "peer": "flex_mask_build_ms_first_call", "ms": 5388.9},
             {"shape": [1, 4096, 32, 32, 128], "mask": "full", "device": "cuda", "peer": "flex", "error": "not built"}]
            """);
        var (code, _, err) = Cli("bench", "--suite", "peak", "--seq", "4096", "--peers", P("peers.json"), "--json", P("b.json"), "--csv", P("b.csv"));
        Assert.True(code == 0, err);
        JsonArray rows = JsonNode.Parse(File.ReadAllText(P("b.json")))!["rows"]!.AsArray();
        Assert.Equal(2, rows.Count(r => r!["suite"]!.GetValue<string>() == "peers"));
        Assert.Contains(rows, r => r!["method"]!.GetValue<string>() == "dense decode f16");   // the decoding bar's step, against the copy
        Assert.All(rows.Where(r => r!["suite"]!.GetValue<string>() == "peers"), r => Assert.Equal("peer:cuda", r!["backend"]!.GetValue<string>()));
        string[] csv = File.ReadAllLines(P("b.csv"));
        Assert.StartsWith("suite,method,", csv[0]);
        Assert.Equal(rows.Count + 1, csv.Length);
        (code, _, err) = Cli("report", P("b.json"), "-o", P("r.html"));
        Assert.True(code == 0, err);
        Assert.Contains("sdpa_flash_attention causal", File.ReadAllText(P("r.html")));
        (code, _, err) = Cli("report", P("missing.json"));
        Assert.Equal(2, code);
    }

    [Fact]
    public void Should_read_safetensors_inputs_by_name()
    {
        int s = 9, h = 1, d = 8;
        SafeTensors.Write(P("in.safetensors"), new Dictionary<string, Tensor>
        {
            ["q"] = Tensor.FromArray(TestData.Normal(s * h * d, 1), 1, s, h, d),
            ["k"] = Tensor.FromArray(TestData.Normal(s * h * d, 2), 1, s, h, d),
            ["v"] = Tensor.FromArray(TestData.Normal(s * h * d, 3), 1, s, h, d),
        });
        string f = P("in.safetensors");
        var (code, _, err) = Cli("verify", "--q", f + ":q", "--k", f + ":k", "--v", f + ":v", "--json", P("v.json"));
        Assert.True(code == 0, err);
        JsonNode json = JsonNode.Parse(File.ReadAllText(P("v.json")))!;
        Assert.True((bool)json["pass"]!);
        Assert.True((double)json["maxAbsError"]! < 1e-5);
    }

    [Fact]
    public void Should_verify_and_print_the_verdict()
    {
        WriteInputs(DType.Float16);
        var (code, output, err) = Cli("verify", "--q", P("q.npy"), "--k", P("k.npy"), "--v", P("v.npy"), "--causal", "--softcap", "5");
        Assert.True(code == 0, err + output);
        Assert.Contains("relative L2 error", output);
        Assert.Contains("PASS", output);
    }

    [Fact]
    public void Should_exit_2_with_one_line_on_bad_input()
    {
        WriteInputs(DType.Float32);
        Npy.Write(P("k_bad.npy"), Tensor.FromArray(TestData.Normal(40 * 3 * 16, 2), 1, 40, 3, 16));
        File.WriteAllText(P("garbage.npy"), "not an array");
        string[][] cases =
        [
            ["run", "--q", P("q.npy"), "--k", P("k_bad.npy"), "--v", P("v.npy"), "--out", P("o.npy")],
            ["run", "--q", P("garbage.npy"), "--k", P("k.npy"), "--v", P("v.npy"), "--out", P("o.npy")],
            ["run", "--q", P("missing.npy"), "--k", P("k.npy"), "--v", P("v.npy"), "--out", P("o.npy")],
            ["run", "--q", P("q.npy"), "--k", P("k.npy"), "--v", P("v.npy"), "--out", P("o.npy"), "--scale", "-1"],
            ["run", "--q", P("q.npy"), "--k", P("k.npy"), "--v", P("v.npy"), "--out", P("o.npy"), "--device", "tpu"],
            ["run", "--q", P("q.npy")],
            ["bench", "--suite", "nope"],
        ];
        foreach (string[] args in cases)
        {
            var (code, _, err) = Cli(args);
            Assert.True(code == 2, $"{string.Join(' ', args)} gave {code}: {err}");
            Assert.DoesNotContain("   at ", err);
            Assert.StartsWith("attend: ", err);
        }
    }

    [Fact]
    public void Should_run_with_a_mask_expression_and_show_masks()
    {
        WriteInputs(DType.Float32, s: 64);
        var (code, output, err) = Cli("verify", "--q", P("q.npy"), "--k", P("k.npy"), "--v", P("v.npy"), "--mask", "causal & window(8) | sink(2)");
        Assert.True(code == 0, err + output);
        Assert.Contains("PASS", output);
        (code, output, err) = Cli("mask", "show", "--mask", "causal & window(256)", "--seq", "1024", "--block", "128");
        Assert.True(code == 0, err);
        Assert.Contains("sparsity", output);
        Assert.Contains("#", output);
        (code, _, err) = Cli("mask", "show", "--mask", "causal &", "--seq", "64");
        Assert.Equal(2, code);
        Assert.Contains("expected", err);
    }

    [Fact]
    public void Should_run_linear_attention_on_files()
    {
        WriteInputs(DType.BFloat16, s: 33);
        var (code, _, err) = Cli("run", "--q", P("q.npy"), "--k", P("k.npy"), "--v", P("v.npy"), "--out", P("lin.npy"), "--linear", "taylor", "--causal");
        Assert.True(code == 0, err);
        Tensor o = Npy.Read(P("lin.npy"));
        Assert.Equal(DType.BFloat16, o.DType);
        Assert.Equal([1, 33, 2, 16], o.Shape);
        (code, _, err) = Cli("run", "--q", P("q.npy"), "--k", P("k.npy"), "--v", P("v.npy"), "--out", P("lin.npy"), "--linear", "random");
        Assert.Equal(2, code);
        Assert.Contains("random:64", err);

        // SLAB's value convolution from a [Dv, K] file equals the library call.
        Tensor w = Tensor.FromArray(Enumerable.Range(0, 48).Select(i => 0.1f * (i % 5)).ToArray(), 16, 3);
        Npy.Write(P("conv.npy"), w);
        (code, _, err) = Cli("run", "--q", P("q.npy"), "--k", P("k.npy"), "--v", P("v.npy"), "--out", P("slab.npy"), "--linear", "relu", "--value-conv", P("conv.npy"));
        Assert.True(code == 0, err);
        TensorView<float> q = Npy.Read(P("q.npy")).ConvertTo(DType.Float32).AsView<float>(), k = Npy.Read(P("k.npy")).ConvertTo(DType.Float32).AsView<float>();
        TensorView<float> v = Npy.Read(P("v.npy")).ConvertTo(DType.Float32).AsView<float>();
        var expected = new TensorView<float>(new float[33 * 2 * 16], 1, 33, 2, 16);
        Attend.Linear.LinearAttention.Forward(q, k, v, expected, new Attend.Linear.LinearOptions { FeatureMap = Attend.Linear.FeatureMap.Relu, ValueConv = new Attend.Linear.DepthwiseConv(w.AsView<float>().ToArray(), 3) });
        float[] slab = Npy.Read(P("slab.npy")).ConvertTo(DType.Float32).Array<float>();
        float[] exp = expected.ToArray();
        for (int i = 0; i < exp.Length; i++) Assert.Equal((float)(BFloat16)exp[i], slab[i], 2);
        (code, _, err) = Cli("run", "--q", P("q.npy"), "--k", P("k.npy"), "--v", P("v.npy"), "--out", P("lin.npy"), "--value-conv", P("conv.npy"));
        Assert.Equal(2, code);
        Assert.Contains("needs --linear", err);
    }

    [Fact]
    public void Should_run_the_hybrids_on_files()
    {
        WriteInputs(DType.Float32, s: 40);
        foreach (string[] hybrid in new[] { new[] { "based:8", "--causal" }, ["mossformer:16"], ["mossformer:16", "--causal"], ["scout:8,4", "--causal"], ["agent:5"], ["infsa"], ["infsa:0.5"] })
        {
            var (code, _, err) = Cli(["run", "--q", P("q.npy"), "--k", P("k.npy"), "--v", P("v.npy"), "--out", P("h.npy"), "--hybrid", .. hybrid]);
            Assert.True(code == 0, $"{string.Join(' ', hybrid)}: {err}");
            Assert.Equal([1, 40, 2, 16], Npy.Read(P("h.npy")).Shape);
        }
        var (c, _, e) = Cli("run", "--q", P("q.npy"), "--k", P("k.npy"), "--v", P("v.npy"), "--out", P("h.npy"), "--hybrid", "based:8");
        Assert.Equal(2, c);
        Assert.Contains("add --causal", e);
        (c, _, e) = Cli("run", "--q", P("q.npy"), "--k", P("k.npy"), "--v", P("v.npy"), "--out", P("h.npy"), "--hybrid", "scout:8", "--causal");
        Assert.Equal(2, c);
        Assert.Contains("scout:256,64", e);
        (c, _, e) = Cli("run", "--q", P("q.npy"), "--k", P("k.npy"), "--v", P("v.npy"), "--out", P("h.npy"), "--hybrid", "nope:1");
        Assert.Equal(2, c);
        Assert.Contains("--hybrid must be", e);
        (c, _, e) = Cli("verify", "--q", P("q.npy"), "--k", P("k.npy"), "--v", P("v.npy"), "--hybrid", "infsa");
        Assert.Equal(2, c);
        Assert.Contains("LinearReference", e);
    }

    [Fact]
    public void Should_bench_a_small_suite_as_json()
    {
        var (code, _, err) = Cli("bench", "--seq", "128", "--head-dim", "32", "--causal", "yes", "--threads", "1", "2", "--dtype", "f32", "bf16", "--json", P("b.json"));
        Assert.True(code == 0, err);
        JsonNode json = JsonNode.Parse(File.ReadAllText(P("b.json")))!;
        Assert.Equal(1, (int)json["schemaVersion"]!);
        Assert.True((double)json["peak"]!["fmaGflops"]! > 0);
        JsonArray rows = json["rows"]!.AsArray();
        // The threads and dtype axes: one dense row per (dtype, threads), each with its memory and its peer mask key.
        List<JsonNode> dense = [.. rows.Where(r => r!["suite"]!.GetValue<string>() == "dense").Select(r => r!)];
        Assert.Equal(["f32/1", "f32/2", "bf16/1", "bf16/2"], dense.Select(r => $"{r["dtype"]}/{r["threads"]}"));
        Assert.All(dense, r =>
        {
            Assert.True((double)r["gflops"]! > 0);
            Assert.Equal("causal", (string)r["mask"]!);
            Assert.True((long)r["allocatedBytes"]! >= 0);
            if (OperatingSystem.IsLinux()) Assert.True((long)r["peakRssGrowthBytes"]! >= 0);
        });
        // The default suite's sparse block: its dense baseline and three selectors, each with its error metrics.
        Assert.Equal(4, rows.Count(r => r!["suite"]!.GetValue<string>() == "sparse"));
        Assert.Equal(3, rows.Count(r => r!["relativeL2"] is not null && r["recall"] is not null && r["planPicture"] is JsonArray));
    }
}
