using System.CommandLine;
using System.Text.Json;
using System.Text.Json.Nodes;
using Attend.Sparse;
using Attend.Tensors;

namespace Attend.Cli;

/// <summary>
/// <c>attend gen</c>: structured q/k/v (attention sinks, local band, vertical stripes, slash diagonals, retrieval
/// needles, block clusters) as q.npy, k.npy, v.npy and needles.json, with how concentrated the attention is per head.
/// </summary>
internal static class GenCommand
{
    public static Command Create()
    {
        var structure = new Option<string>("--structure") { Description = "default, or components to keep: sinks,local,verticals,slashes,needles,clusters,noise (each optionally =logit)", DefaultValueFactory = _ => "default" };
        var shape = new Option<string>("--shape") { Description = "B,S,H,D of q", DefaultValueFactory = _ => "1,8192,8,128" };
        var kvHeads = new Option<int>("--kv-heads") { Description = "key/value heads (default: H)" };
        var seed = new Option<int>("--seed") { Description = "random seed", DefaultValueFactory = _ => 1 };
        var output = new Option<string>("--output", "-o") { Description = "folder to write q.npy, k.npy, v.npy, needles.json", Required = true };
        var json = new Option<string?>("--json") { Description = "write a JSON summary to this file ('-' for stdout)" };
        var command = new Command("gen", "generate structured attention inputs for judging sparse methods");
        foreach (Option o in new Option[] { structure, shape, kvHeads, seed, output, json }) command.Options.Add(o);
        command.SetAction(r =>
        {
            string shapeText = r.GetValue(shape)!;
            int[] dims = shapeText.Split(',').Select(x => int.TryParse(x, out int v) && v > 0 ? v : 0).ToArray();
            if (dims.Length != 4 || dims.Contains(0)) throw new ArgumentException($"--shape must be four positive integers B,S,H,D; got '{shapeText}'");
            int hkv = r.GetValue(kvHeads) is > 0 and var n ? n : dims[2];
            StructureOptions options = StructureOptions.Parse(r.GetValue(structure)!, r.GetValue(seed));
            (TensorView<float> q, TensorView<float> k, TensorView<float> v, IReadOnlyList<Needle> needles) =
                StructuredInputs.Generate(dims[0], dims[1], dims[2], hkv, dims[3], options);
            string dir = r.GetValue(output)!;
            Directory.CreateDirectory(dir);
            Npy.Write(Path.Combine(dir, "q.npy"), Tensor.FromArray(q.ToArray(), [.. q.Shape]));
            Npy.Write(Path.Combine(dir, "k.npy"), Tensor.FromArray(k.ToArray(), [.. k.Shape]));
            Npy.Write(Path.Combine(dir, "v.npy"), Tensor.FromArray(v.ToArray(), [.. v.Shape]));
            File.WriteAllText(Path.Combine(dir, "needles.json"), JsonSerializer.Serialize(needles.ToList(), Sparse.SparseJson.Default.ListNeedle));
            var shares = Enumerable.Range(0, dims[2]).Select(h => Metrics.TopKeyMassShare(q, k, h)).ToArray();
            string? path = r.GetValue(json);
            if (path != "-")
            {
                Console.WriteLine($"wrote {dir}: q [{string.Join(", ", q.Shape.ToArray())}], k/v [{string.Join(", ", k.Shape.ToArray())}], {needles.Count} needles");
                Console.WriteLine($"top-5% keys' share of the causal softmax mass (last 256 queries), per head: {string.Join(" ", shares.Select(x => x.ToString("F3", System.Globalization.CultureInfo.InvariantCulture)))}");
            }
            JsonOutput.Write(path, new JsonObject
            {
                ["command"] = "gen", ["structure"] = r.GetValue(structure), ["seed"] = r.GetValue(seed), ["shape"] = new JsonArray([.. dims.Select(x => (JsonNode)x)]),
                ["kvHeads"] = hkv, ["needles"] = needles.Count, ["topKeyMassShare"] = new JsonArray([.. shares.Select(x => (JsonNode)x)]),
            });
            return 0;
        });
        return command;
    }
}
