using System.Globalization;
using System.Net;
using System.Text;
using System.Text.Json.Nodes;

namespace Attend.Cli;

/// <summary>
/// <c>attend report RESULTS.json -o report.html</c>: one self-contained HTML file (no scripts, no network) from the
/// bench JSON — a machine section, the table of every row, and inline SVG charts: time vs sequence length per
/// method (log-log), speed-up vs relative error per length (the accuracy/speed trade-off of approximate methods),
/// and the block plans rows carry (<c>planPicture</c>).
/// </summary>
internal static class Report
{
    public static System.CommandLine.Command Create()
    {
        var input = new System.CommandLine.Argument<string>("results") { Description = "bench JSON (attend bench --json FILE) or attend lm compare JSON" };
        var output = new System.CommandLine.Option<string>("--output", "-o") { Description = "HTML file to write", DefaultValueFactory = _ => "attend-report.html" };
        var command = new System.CommandLine.Command("report", "render a bench JSON as a self-contained HTML report with SVG charts");
        command.Arguments.Add(input);
        command.Options.Add(output);
        command.SetAction(r =>
        {
            string path = r.GetValue(input)!;
            if (!File.Exists(path)) throw new FileNotFoundException($"results file not found: {path}", path);
            JsonNode results = JsonNode.Parse(File.ReadAllText(path)) ?? throw new InvalidDataException($"{path}: empty JSON");
            string html = results["schema"]?.GetValue<string>() == "attend.lm-compare" ? RenderLanguageModel(results) : Render(results);
            File.WriteAllText(r.GetValue(output)!, html);
            Console.WriteLine($"wrote {r.GetValue(output)} ({html.Length / 1024} KiB, {CountCharts(html)} charts)");
            return 0;
        });
        return command;
    }

    internal static int CountCharts(string html) => html.Split("<svg", StringSplitOptions.None).Length - 1;

    /// <summary>Checks the parts of the schema the report relies on; throws <see cref="InvalidDataException"/> naming what is wrong.</summary>
    internal static void Validate(JsonNode results)
    {
        if (results["schema"]?.GetValue<string>() != "attend.bench") throw new InvalidDataException("not an attend.bench JSON: \"schema\" must be \"attend.bench\"");
        if (results["schemaVersion"]?.GetValue<int>() != BenchCommand.SchemaVersion)
        {
            throw new InvalidDataException($"schemaVersion {results["schemaVersion"]} is not {BenchCommand.SchemaVersion}");
        }
        if (results["rows"] is not JsonArray rows) throw new InvalidDataException("\"rows\" must be an array");
        if (results["machine"] is not JsonObject) throw new InvalidDataException("\"machine\" must be an object");
        int i = 0;
        foreach (JsonNode? row in rows)
        {
            foreach (string field in new[] { "suite", "method", "backend", "dtype", "seqLen", "headDim", "heads", "medianMs" })
            {
                if (row?[field] is null) throw new InvalidDataException($"rows[{i}] lacks \"{field}\"");
            }
            // Approximate rows carry their error; sparse selections also their recall (softmax mass computed), which
            // linear attention and the hybrids do not define.
            bool approximate = row!["relativeL2"] is not null || row["recall"] is not null;
            bool sparse = row["suite"]?.GetValue<string>() is "sparse" or "sparse-real" or "default";
            if (approximate && (row["relativeL2"] is null || row["cosine"] is null || (sparse && row["recall"] is null)))
            {
                throw new InvalidDataException($"rows[{i}] ({row["method"]}) is an approximate method without all of relativeL2, cosine{(sparse ? ", recall" : "")}");
            }
            i++;
        }
    }

    internal static string Render(JsonNode results)
    {
        Validate(results);
        var rows = results["rows"]!.AsArray().Select(r => r!).ToList();
        var sb = new StringBuilder();
        sb.Append("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>attend bench report</title><style>")
          .Append("body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fff}table{border-collapse:collapse;font-size:12px;margin:8px 0}")
          .Append("td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td.n{text-align:left;max-width:420px;font-size:11px}th{background:#f2f2f2}td.l{text-align:left}")
          .Append("h1{font-size:22px}h2{font-size:17px;margin-top:28px}.charts{display:flex;flex-wrap:wrap;gap:16px}figure{margin:0}figcaption{font-size:12px;color:#555}")
          .Append("</style></head><body>");
        sb.Append($"<h1>attend bench — suite {E(S(results["suite"]))}</h1><p>{E(S(results["date"]))}</p>");

        // Machine.
        sb.Append("<h2>Machine</h2><table>");
        foreach ((string key, JsonNode? value) in results["machine"]!.AsObject())
        {
            if (value is not null) sb.Append($"<tr><th>{E(key)}</th><td class=\"l\">{E(value.ToString())}</td></tr>");
        }
        if (results["peak"] is JsonObject peak)
        {
            foreach ((string key, JsonNode? value) in peak) sb.Append($"<tr><th>peak {E(key)}</th><td class=\"l\">{E(value?.ToString() ?? "")}</td></tr>");
        }
        sb.Append("</table>");

        // Charts.
        sb.Append("<h2>Charts</h2><div class=\"charts\">");
        var timed = rows.Where(r => D(r["medianMs"]) > 0 && D(r["seqLen"]) > 0).ToList();
        var series = timed.GroupBy(r => $"{S(r["method"])} {S(r["backend"])} D={S(r["headDim"])}")
            .Where(g => g.Select(r => D(r["seqLen"])).Distinct().Count() >= 2)
            .Select(g => (g.Key, Points: g.Select(r => (X: D(r["seqLen"]), Y: D(r["medianMs"]))).OrderBy(p => p.X).ToList()))
            .ToList();
        if (series.Count > 0) sb.Append(Figure(LineChart(series, "sequence length", "median ms", logX: true, logY: true), "Time vs sequence length per method (log-log)"));
        foreach (var group in rows.Where(r => r["relativeL2"] is not null && r["speedupVsDense"] is not null).GroupBy(r => S(r["seqLen"])))
        {
            var points = group.Select(r => (Label: S(r["method"]), X: Math.Max(D(r["relativeL2"]), 1e-6), Y: D(r["speedupVsDense"]))).ToList();
            sb.Append(Figure(Scatter(points, "relative L2 error vs dense", "speed-up vs dense (same run)"), $"Speed-up vs error, S = {E(group.Key)} (up and left is better)"));
        }
        // Attend and peers side by side: every (mask, shape) that both measured.
        foreach (var group in timed.Where(r => r["mask"] is not null)
            .GroupBy(r => $"mask {S(r["mask"])}, S = {S(r["seqLen"])}, H = {S(r["heads"])}/{S(r["kvHeads"])}, D = {S(r["headDim"])}")
            .Where(g => g.Any(IsPeer) && g.Any(r => !IsPeer(r))))
        {
            var bars = group.OrderBy(IsPeer).Select(r => (Label: $"{S(r["method"])} ({S(r["backend"])}, {S(r["dtype"])})", Value: D(r["medianMs"]), Peer: IsPeer(r))).ToList();
            sb.Append(Figure(BarChart(bars, "median ms (shorter is faster)"), $"Attend vs peers: {E(group.Key)} (peers in grey)"));
        }
        foreach (JsonNode row in rows.Where(r => r["planPicture"] is JsonArray))
        {
            string[] lines = [.. row["planPicture"]!.AsArray().Select(x => S(x))];
            sb.Append(Figure(PlanPicture(lines), $"Plan of {E(S(row["method"]))} (batch 0, head 0): dark = full block, light = partial"));
        }
        sb.Append("</div>");

        // Table.
        sb.Append("<h2>Rows</h2><table><tr>");
        string[] columns = ["method", "backend", "dtype", "batch", "heads", "kvHeads", "seqLen", "headDim", "causal", "threads", "medianMs", "minMs", "maxMs", "gflops", "effectiveGflops", "peakFraction", "density", "speedupVsDense", "allocatedBytes", "peakRssGrowthBytes", "selectionMs", "relativeL2", "cosine", "recall", "needleHitRate", "note"];
        foreach (string c in columns) sb.Append($"<th>{E(c)}</th>");
        sb.Append("</tr>");
        foreach (JsonNode row in rows)
        {
            sb.Append("<tr>");
            foreach (string c in columns)
            {
                JsonNode? v = row[c];
                string text = v is JsonValue jv && jv.TryGetValue(out double x)
                    ? x.ToString(x == Math.Floor(x) && Math.Abs(x) < 1e15 ? "0" : Math.Abs(x) >= 100 ? "F1" : "G4", CultureInfo.InvariantCulture)
                    : v?.ToString() ?? "";
                sb.Append(c == "method" ? $"<td class=\"l\">{E(text)}</td>" : c == "note" ? $"<td class=\"n\">{E(text)}</td>" : $"<td>{E(text)}</td>");
            }
            sb.Append("</tr>");
        }
        sb.Append("</table><p style=\"font-size:12px;color:#555\">GFLOPS count useful FLOPs: 4·B·H·S²·D, halved for causal. Speed-ups are against dense measured in the same run.</p></body></html>");
        return sb.ToString();
    }

    /// <summary>The <c>attend lm compare</c> table as HTML: bits/byte vs density (prefill methods) and every row.</summary>
    internal static string RenderLanguageModel(JsonNode compare)
    {
        if (compare["schema"]?.GetValue<string>() != "attend.lm-compare") throw new InvalidDataException("not an attend.lm-compare JSON");
        var rows = compare["rows"]!.AsArray().Select(r => r!).ToList();
        var sb = new StringBuilder("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>attend lm compare</title><style>")
            .Append("body{font-family:system-ui,sans-serif;margin:24px}table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td.l{text-align:left}th{background:#f2f2f2}figcaption{font-size:12px;color:#555}")
            .Append("</style></head><body>");
        sb.Append($"<h1>attend lm compare — {E(S(compare["model"]))}</h1><p>context {E(S(compare["context"]))}, {E(S(compare["bytes"]))} bytes</p>");
        var prefill = rows.Where(r => !S(r["method"]).StartsWith("decode", StringComparison.Ordinal)).ToList();
        if (prefill.Count > 0)
        {
            var points = prefill.Select(r => (Label: S(r["method"]), X: Math.Max(D(r["density"]), 1e-3), Y: D(r["bitsPerByte"]))).ToList();
            sb.Append(Figure(Scatter(points, "attention density (share of causal pairs computed)", "bits/byte (lower is better)", yFromZero: false), "Quality vs density of every prefill method (same run)"));
        }
        sb.Append("<table><tr><th>method</th><th>bits/byte</th><th>over dense</th><th>density / pages read</th><th>seconds</th><th>tokens/s</th><th>speed vs dense</th></tr>");
        foreach (JsonNode r in rows)
        {
            sb.Append($"<tr><td class=\"l\">{E(S(r["method"]))}</td><td>{D(r["bitsPerByte"]):F5}</td><td>{D(r["bitsOverDense"]):+0.00000;-0.00000}</td><td>{D(r["density"]):F3}</td>")
              .Append($"<td>{D(r["seconds"]):F1}</td><td>{D(r["tokensPerSecond"]):F0}</td><td>{D(r["speedupVsDense"]):F2}×</td></tr>");
        }
        return sb.Append("</table></body></html>").ToString();
    }

    private static string Figure(string svg, string caption) => $"<figure>{svg}<figcaption>{caption}</figcaption></figure>";

    private static readonly string[] Palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

    private const int W = 560, H = 360, L = 64, R = 170, T = 16, B = 44;

    /// <summary>A line chart of named series, with optional log axes; legend on the right.</summary>
    internal static string LineChart(IReadOnlyList<(string Name, List<(double X, double Y)> Points)> series, string xLabel, string yLabel, bool logX, bool logY)
    {
        var all = series.SelectMany(s => s.Points).ToList();
        Axis x = Axis.For(all.Select(p => p.X), logX, L, W - R), y = Axis.For(all.Select(p => p.Y), logY, H - B, T);
        var sb = new StringBuilder(Frame(x, y, xLabel, yLabel));
        for (int i = 0; i < series.Count; i++)
        {
            string color = Palette[i % Palette.Length];
            string pts = string.Join(" ", series[i].Points.Select(p => $"{F(x.Map(p.X))},{F(y.Map(p.Y))}"));
            sb.Append($"<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{pts}\"/>");
            foreach ((double px, double py) in series[i].Points) sb.Append($"<circle cx=\"{F(x.Map(px))}\" cy=\"{F(y.Map(py))}\" r=\"3\" fill=\"{color}\"/>");
            sb.Append($"<text x=\"{W - R + 10}\" y=\"{T + 12 + (i * 15)}\" font-size=\"11\" fill=\"{color}\">{E(series[i].Name)}</text>");
        }
        return sb.Append("</svg>").ToString();
    }

    private static bool IsPeer(JsonNode row) => S(row["backend"]).StartsWith("peer", StringComparison.Ordinal);

    /// <summary>Horizontal bars from zero, one per labelled value; peer bars grey, Attend's blue; the value printed at the end.</summary>
    internal static string BarChart(IReadOnlyList<(string Label, double Value, bool Peer)> bars, string xLabel)
    {
        const int labelWidth = 240, barHeight = 18, gap = 6, width = W;
        int height = T + (bars.Count * (barHeight + gap)) + B;
        double max = bars.Select(b => b.Value).Where(double.IsFinite).DefaultIfEmpty(1).Max();
        var x = new Axis(0, max > 0 ? max * 1.15 : 1, Log: false, labelWidth, width - 40);   // bars start at zero, room for the value label
        var sb = new StringBuilder($"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\"><rect width=\"100%\" height=\"100%\" fill=\"#fff\"/>");
        for (int i = 0; i < bars.Count; i++)
        {
            double y = T + (i * (barHeight + gap));
            double end = x.Map(double.IsFinite(bars[i].Value) ? bars[i].Value : 0);
            string fill = bars[i].Peer ? "#9a9a9a" : Palette[0];
            sb.Append($"<text x=\"{labelWidth - 6}\" y=\"{F(y + 13)}\" font-size=\"11\" text-anchor=\"end\">{E(bars[i].Label)}</text>");
            sb.Append($"<rect x=\"{labelWidth}\" y=\"{F(y)}\" width=\"{F(Math.Max(1, end - labelWidth))}\" height=\"{barHeight}\" fill=\"{fill}\"/>");
            sb.Append($"<text x=\"{F(end + 4)}\" y=\"{F(y + 13)}\" font-size=\"10\">{E(Tick(bars[i].Value))}</text>");
        }
        double axisY = T + (bars.Count * (barHeight + gap));
        sb.Append($"<line x1=\"{labelWidth}\" y1=\"{F(axisY)}\" x2=\"{width - 40}\" y2=\"{F(axisY)}\" stroke=\"#333\"/>");
        foreach (double t in x.Ticks().Where(t => t >= 0)) sb.Append($"<text x=\"{F(x.Map(t))}\" y=\"{F(axisY + 14)}\" font-size=\"10\" text-anchor=\"middle\">{E(Tick(t))}</text>");
        sb.Append($"<text x=\"{(labelWidth + width - 40) / 2}\" y=\"{F(axisY + 32)}\" font-size=\"12\" text-anchor=\"middle\">{E(xLabel)}</text>");
        return sb.Append("</svg>").ToString();
    }

    /// <summary>Labelled points (x log scale): one per method.</summary>
    internal static string Scatter(IReadOnlyList<(string Label, double X, double Y)> points, string xLabel, string yLabel, bool yFromZero = true)
    {
        Axis x = Axis.For(points.Select(p => p.X), log: true, L, W - R);
        Axis y = yFromZero ? Axis.For(points.Select(p => p.Y).Append(1), log: false, H - B, T) : Axis.For(points.Select(p => p.Y), log: false, H - B, T, includeZero: false);
        var sb = new StringBuilder(Frame(x, y, xLabel, yLabel));
        for (int i = 0; i < points.Count; i++)
        {
            string color = Palette[i % Palette.Length];
            sb.Append($"<circle cx=\"{F(x.Map(points[i].X))}\" cy=\"{F(y.Map(points[i].Y))}\" r=\"5\" fill=\"{color}\"/>");
            sb.Append($"<text x=\"{W - R + 10}\" y=\"{T + 12 + (i * 15)}\" font-size=\"11\" fill=\"{color}\">{E(points[i].Label)}</text>");
        }
        return sb.Append("</svg>").ToString();
    }

    /// <summary>A block plan picture from its ASCII rows ('#' full, '+' partial, '.' skipped).</summary>
    internal static string PlanPicture(IReadOnlyList<string> lines)
    {
        int rows = lines.Count, cols = lines.Count == 0 ? 0 : lines.Max(l => l.Length);
        double cell = Math.Max(1, Math.Min(8, 320.0 / Math.Max(1, Math.Max(rows, cols))));
        var sb = new StringBuilder($"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{F(cols * cell + 2)}\" height=\"{F(rows * cell + 2)}\"><rect width=\"100%\" height=\"100%\" fill=\"#fafafa\" stroke=\"#ccc\"/>");
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < lines[r].Length; c++)
            {
                string? fill = lines[r][c] switch { '#' => "#1f4e79", '+' => "#8fb3d9", _ => null };
                if (fill is not null) sb.Append($"<rect x=\"{F(1 + c * cell)}\" y=\"{F(1 + r * cell)}\" width=\"{F(cell)}\" height=\"{F(cell)}\" fill=\"{fill}\"/>");
            }
        return sb.Append("</svg>").ToString();
    }

    private static string Frame(Axis x, Axis y, string xLabel, string yLabel)
    {
        var sb = new StringBuilder($"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\"><rect width=\"100%\" height=\"100%\" fill=\"#fff\"/>");
        sb.Append($"<line x1=\"{L}\" y1=\"{H - B}\" x2=\"{W - R}\" y2=\"{H - B}\" stroke=\"#333\"/><line x1=\"{L}\" y1=\"{T}\" x2=\"{L}\" y2=\"{H - B}\" stroke=\"#333\"/>");
        foreach (double t in x.Ticks()) sb.Append($"<line x1=\"{F(x.Map(t))}\" y1=\"{H - B}\" x2=\"{F(x.Map(t))}\" y2=\"{H - B + 4}\" stroke=\"#333\"/><text x=\"{F(x.Map(t))}\" y=\"{H - B + 16}\" font-size=\"10\" text-anchor=\"middle\">{E(Tick(t))}</text>");
        foreach (double t in y.Ticks()) sb.Append($"<line x1=\"{L - 4}\" y1=\"{F(y.Map(t))}\" x2=\"{W - R}\" y2=\"{F(y.Map(t))}\" stroke=\"#eee\"/><text x=\"{L - 6}\" y=\"{F(y.Map(t) + 3)}\" font-size=\"10\" text-anchor=\"end\">{E(Tick(t))}</text>");
        sb.Append($"<text x=\"{(L + W - R) / 2}\" y=\"{H - 8}\" font-size=\"12\" text-anchor=\"middle\">{E(xLabel)}</text>");
        sb.Append($"<text x=\"14\" y=\"{(T + H - B) / 2}\" font-size=\"12\" text-anchor=\"middle\" transform=\"rotate(-90 14 {(T + H - B) / 2})\">{E(yLabel)}</text>");
        return sb.ToString();
    }

    /// <summary>A linear or log axis mapping data to pixels.</summary>
    internal readonly record struct Axis(double Min, double Max, bool Log, double P0, double P1)
    {
        public static Axis For(IEnumerable<double> values, bool log, double p0, double p1, bool includeZero = true)
        {
            double[] v = [.. values.Where(x => double.IsFinite(x) && (!log || x > 0))];
            if (v.Length == 0) v = [1];
            double min = v.Min(), max = v.Max();
            if (log)
            {
                min = Math.Pow(10, Math.Floor(Math.Log10(min)));
                max = Math.Pow(10, Math.Ceiling(Math.Log10(max)));
                if (max <= min) max = min * 10;
            }
            else
            {
                double pad = Math.Max((max - min) * 0.1, 1e-3);
                min = includeZero ? Math.Min(0, min - pad) : min - pad;
                max = max + pad;
                if (max <= min) max = min + 1;
            }
            return new Axis(min, max, log, p0, p1);
        }

        public double Map(double v)
        {
            double f = Log ? (Math.Log10(Math.Max(v, Min)) - Math.Log10(Min)) / (Math.Log10(Max) - Math.Log10(Min)) : (v - Min) / (Max - Min);
            return P0 + (f * (P1 - P0));
        }

        public IEnumerable<double> Ticks()
        {
            if (Log)
            {
                for (double t = Min; t <= Max * 1.0001; t *= 10) yield return t;
                yield break;
            }
            // About five ticks at 1, 2 or 5 × 10^k.
            double raw = (Max - Min) / 5, magnitude = Math.Pow(10, Math.Floor(Math.Log10(raw)));
            double step = magnitude * (raw / magnitude <= 1 ? 1 : raw / magnitude <= 2 ? 2 : raw / magnitude <= 5 ? 5 : 10);
            for (double t = Math.Ceiling(Min / step) * step; t <= Max + (step * 1e-9); t += step) yield return t;
        }
    }

    private static string Tick(double t) => Math.Abs(t) >= 1000 ? t.ToString("0.#e0", CultureInfo.InvariantCulture) : t.ToString("G3", CultureInfo.InvariantCulture);

    private static string F(double v) => v.ToString("0.##", CultureInfo.InvariantCulture);

    private static string E(string s) => WebUtility.HtmlEncode(s);

    private static string S(JsonNode? n) => n switch
    {
        null => "",
        JsonValue v when v.TryGetValue(out string? s) => s ?? "",
        _ => n.ToString(),
    };

    private static double D(JsonNode? n) => n is JsonValue v && v.TryGetValue(out double d) ? d : n is JsonValue iv && iv.TryGetValue(out int i) ? i : double.NaN;
}
