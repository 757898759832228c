using System.Globalization;
using System.Text;
using System.Text.Json.Nodes;
using Attend.Tensors;

namespace Attend.Cli;

/// <summary>PyTorch peer rows (from ../shared/peers/torch_attention.py --json) as bench rows, and CSV output of any result.</summary>
internal static class Peers
{
    /// <summary>Reads a peers JSON (an array of rows, or JSON lines) into bench rows of suite "peers".</summary>
    public static List<BenchCommand.BenchRow> Read(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"--peers: file not found: {path}", path);
        string text = File.ReadAllText(path).Trim();
        IEnumerable<JsonNode?> nodes = text.StartsWith('[')
            ? JsonNode.Parse(text)!.AsArray()
            : text.Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l => JsonNode.Parse(l));
        var rows = new List<BenchCommand.BenchRow>();
        int index = 0;
        foreach (JsonNode? n in nodes)
        {
            index++;
            if (n is null || n["ms"] is null) continue;   // errors carry no timing
            if (n["peer"]?.GetValue<string>() is { } name && name.EndsWith("_first_call", StringComparison.Ordinal)) continue;   // compile + mask build, not a kernel time
            int b, s, h, hkv, d;
            if (n["shape"] is JsonArray shape && shape.Count == 5)
            {
                (b, s, h, hkv, d) = (shape[0]!.GetValue<int>(), shape[1]!.GetValue<int>(), shape[2]!.GetValue<int>(), shape[3]!.GetValue<int>(), shape[4]!.GetValue<int>());
            }
            else if (n["kv"] is not null)
            {
                (b, s, h, hkv, d) = (1, n["kv"]!.GetValue<int>(), n["heads"]!.GetValue<int>(), n["kv_heads"]!.GetValue<int>(), n["dim"]!.GetValue<int>());
            }
            else
            {
                throw new InvalidDataException($"--peers {path}: row {index} has neither \"shape\" [B,S,H,Hkv,D] nor \"kv\"");
            }
            double ms = n["ms"]!.GetValue<double>();
            double fraction = n["visited_fraction"]?.GetValue<double>() ?? 1;
            string mask = n["mask"]?.GetValue<string>() ?? "decode";
            double flops = 4.0 * b * h * s * s * d * fraction;
            rows.Add(new BenchCommand.BenchRow("peers", $"{n["peer"]?.GetValue<string>()} {mask}", ParseDType(n["dtype"]?.GetValue<string>()), b, h, hkv, s, d, mask == "causal",
                0, KernelPath.Auto, ms, n["ms_min"]?.GetValue<double>() ?? ms, n["ms_max"]?.GetValue<double>() ?? ms, 0, flops, GpuBench.NominalPeakGflops)
            {
                Backend = "peer:" + (n["device"]?.GetValue<string>() ?? "cuda"), Mask = mask, Density = fraction, Note = "PyTorch peer (torch_attention.py), measured in its own process",
            });
        }
        return rows;
    }

    private static DType ParseDType(string? name) => name switch { "fp16" => DType.Float16, "fp32" => DType.Float32, _ => DType.BFloat16 };

    /// <summary>The JSON rows as CSV: one column per field seen in any row, in first-seen order.</summary>
    public static string ToCsv(JsonNode results)
    {
        var rows = results["rows"]!.AsArray().Select(r => r!.AsObject()).ToList();
        var columns = new List<string>();
        foreach (JsonObject row in rows)
            foreach ((string key, JsonNode? value) in row)
                if (value is not JsonArray && !columns.Contains(key)) columns.Add(key);
        var sb = new StringBuilder(string.Join(',', columns)).Append('\n');
        foreach (JsonObject row in rows)
        {
            sb.Append(string.Join(',', columns.Select(c => Cell(row[c])))).Append('\n');
        }
        return sb.ToString();
    }

    private static string Cell(JsonNode? v)
    {
        if (v is null) return "";
        string text = v is JsonValue jv && jv.TryGetValue(out double x) ? x.ToString("R", CultureInfo.InvariantCulture) : v.ToString();
        return text.Contains(',') || text.Contains('"') || text.Contains('\n') ? "\"" + text.Replace("\"", "\"\"") + "\"" : text;
    }
}
