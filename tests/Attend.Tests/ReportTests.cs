using System.Diagnostics;
using System.IO.Compression;
using System.Text.Json.Nodes;
using Attend.Cli;

namespace Attend.Tests;

/// <summary>The HTML report: schema checks on a stored sample result, the charts it must hold, and a headless-Chromium screenshot that is not blank.</summary>
public sealed class ReportTests : IDisposable
{
    private static readonly string SamplePath = Path.Combine(AppContext.BaseDirectory, "Data", "sample-bench.json");
    private readonly string _dir = Directory.CreateTempSubdirectory("attend-report-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static JsonNode Sample() => JsonNode.Parse(File.ReadAllText(SamplePath))!;

    [Fact]
    public void The_stored_sample_is_valid_and_renders_every_chart()
    {
        JsonNode sample = Sample();
        Report.Validate(sample);
        string html = Report.Render(sample);
        // Time vs length, one speed/error chart (S = 4096), Attend vs the CPU peer for two masks, three plan pictures.
        Assert.Equal(7, Report.CountCharts(html));
        Assert.Contains("Attend vs peers: mask causal, S = 4096, H = 8/8, D = 128", html);
        Assert.Contains("peakRssGrowthBytes", html);
        Assert.Contains("Time vs sequence length", html);
        Assert.Contains("Speed-up vs error, S = 4096", html);
        Assert.DoesNotContain("NaN", html);
        Assert.DoesNotContain("<script", html);
        Assert.DoesNotContain("http://", html.Replace("http://www.w3.org/2000/svg", ""));   // self-contained
        foreach (JsonNode? row in sample["rows"]!.AsArray()) Assert.Contains(System.Net.WebUtility.HtmlEncode(row!["method"]!.GetValue<string>()), html);
    }

    [Fact]
    public void The_language_model_table_renders_with_its_chart()
    {
        JsonNode compare = JsonNode.Parse(File.ReadAllText(Path.Combine(AppContext.BaseDirectory, "Data", "sample-lm-compare.json")))!;
        string html = Report.RenderLanguageModel(compare);
        Assert.Equal(1, Report.CountCharts(html));
        Assert.Contains("vertical-slash", html);
        Assert.Contains("0.81462", html);
        Assert.Contains("decode quest:1/8", html);
        Assert.Throws<InvalidDataException>(() => Report.RenderLanguageModel(Sample()));
    }

    [Fact]
    public void Schema_violations_are_named()
    {
        JsonNode bad = Sample();
        bad["schema"] = "other";
        Assert.Contains("schema", Assert.Throws<InvalidDataException>(() => Report.Validate(bad)).Message);
        bad = Sample();
        bad["rows"]![0]!.AsObject().Remove("medianMs");
        Assert.Contains("rows[0] lacks \"medianMs\"", Assert.Throws<InvalidDataException>(() => Report.Validate(bad)).Message);
        bad = Sample();
        JsonObject approximate = bad["rows"]!.AsArray().Select(r => r!.AsObject()).First(r => r["relativeL2"] is not null);
        approximate.Remove("recall");
        Assert.Contains("without all of relativeL2, cosine, recall", Assert.Throws<InvalidDataException>(() => Report.Validate(bad)).Message);
        bad = Sample();
        bad["schemaVersion"] = 99;
        Assert.Contains("schemaVersion", Assert.Throws<InvalidDataException>(() => Report.Validate(bad)).Message);
    }

    [Fact]
    public void Charts_map_their_data_inside_the_plot()
    {
        string svg = Report.LineChart([("a", [(1024, 10), (4096, 160), (16384, 2560)])], "x", "y", logX: true, logY: true);
        Assert.Contains("<polyline", svg);
        var axis = Report.Axis.For([0.3, 2.6], log: false, 0, 100);
        Assert.InRange(axis.Ticks().Count(), 3, 8);
        Assert.InRange(axis.Map(0.3), 0, 100);
        string plan = Report.PlanPicture(["#+.", ".#+"]);
        Assert.Equal(4, plan.Split("<rect").Length - 1 - 1);   // background + 4 cells
    }

    /// <summary>Headless Chromium (Debian's chromium, installed by .ci/run) renders the report to a PNG that shows the charts.</summary>
    [Fact]
    public void The_report_renders_in_headless_chromium()
    {
        string? chromium = new[] { "chromium", "chromium-browser", "google-chrome" }
            .Select(n => Environment.GetEnvironmentVariable("PATH")!.Split(':').Select(d => Path.Combine(d, n)).FirstOrDefault(File.Exists)).FirstOrDefault(p => p is not null);
        if (chromium is null)
        {
            Assert.True(Environment.GetEnvironmentVariable("ATTEND_REQUIRE_CHROMIUM") != "1", "chromium is not installed");
            return;
        }
        string html = Path.Combine(_dir, "report.html"), png = Path.Combine(_dir, "report.png");
        File.WriteAllText(html, Report.Render(Sample()));
        var start = new ProcessStartInfo(chromium, ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", $"--screenshot={png}", "--window-size=1400,1800", "file://" + html])
        {
            RedirectStandardError = true, RedirectStandardOutput = true,
        };
        using (Process p = Process.Start(start)!)
        {
            p.StandardError.ReadToEndAsync();
            p.StandardOutput.ReadToEndAsync();
            Assert.True(p.WaitForExit(120_000), "chromium did not finish in 2 minutes");
        }
        Assert.True(File.Exists(png), "no screenshot written");
        (int width, int height, byte[] rgb) = Png.Decode(File.ReadAllBytes(png));
        Assert.Equal(1400, width);
        long nonWhite = 0, seriesBlue = 0;
        for (int i = 0; i < width * height; i++)
        {
            byte r = rgb[3 * i], g = rgb[(3 * i) + 1], b = rgb[(3 * i) + 2];
            if (r < 240 || g < 240 || b < 240) nonWhite++;
            if (Math.Abs(r - 0x1f) < 12 && Math.Abs(g - 0x77) < 12 && Math.Abs(b - 0xb4) < 12) seriesBlue++;   // the first series' colour: charts drew
        }
        Assert.True(nonWhite > width * height / 50, $"screenshot nearly blank: {nonWhite} non-white pixels");
        Assert.True(seriesBlue > 50, $"no chart series pixels found ({seriesBlue})");
    }

    /// <summary>Just enough PNG (8-bit RGB or RGBA, non-interlaced) to look at a screenshot.</summary>
    private static class Png
    {
        public static (int Width, int Height, byte[] Rgb) Decode(byte[] file)
        {
            int pos = 8, width = 0, height = 0, colorType = 0;
            using var idat = new MemoryStream();
            while (pos < file.Length)
            {
                int length = (file[pos] << 24) | (file[pos + 1] << 16) | (file[pos + 2] << 8) | file[pos + 3];
                string type = System.Text.Encoding.ASCII.GetString(file, pos + 4, 4);
                if (type == "IHDR")
                {
                    width = (file[pos + 8] << 24) | (file[pos + 9] << 16) | (file[pos + 10] << 8) | file[pos + 11];
                    height = (file[pos + 12] << 24) | (file[pos + 13] << 16) | (file[pos + 14] << 8) | file[pos + 15];
                    Assert.Equal(8, file[pos + 16]);
                    colorType = file[pos + 17];
                    Assert.Equal(0, file[pos + 20]);
                }
                if (type == "IDAT") idat.Write(file, pos + 8, length);
                pos += 12 + length;
            }
            int channels = colorType switch { 2 => 3, 6 => 4, _ => throw new InvalidDataException($"PNG colour type {colorType}") };
            idat.Position = 0;
            using var inflated = new MemoryStream();
            using (var z = new ZLibStream(idat, CompressionMode.Decompress)) z.CopyTo(inflated);
            byte[] raw = inflated.ToArray();
            int stride = width * channels;
            var prev = new byte[stride];
            var cur = new byte[stride];
            var rgb = new byte[width * height * 3];
            for (int y = 0; y < height; y++)
            {
                int filter = raw[y * (stride + 1)];
                Array.Copy(raw, (y * (stride + 1)) + 1, cur, 0, stride);
                for (int x = 0; x < stride; x++)
                {
                    int a = x >= channels ? cur[x - channels] : 0, b = prev[x], c = x >= channels ? prev[x - channels] : 0;
                    int add = filter switch
                    {
                        0 => 0, 1 => a, 2 => b, 3 => (a + b) / 2,
                        4 => Paeth(a, b, c),
                        _ => throw new InvalidDataException($"PNG filter {filter}"),
                    };
                    cur[x] = (byte)(cur[x] + add);
                }
                for (int x = 0; x < width; x++)
                {
                    rgb[((y * width) + x) * 3] = cur[x * channels];
                    rgb[(((y * width) + x) * 3) + 1] = cur[(x * channels) + 1];
                    rgb[(((y * width) + x) * 3) + 2] = cur[(x * channels) + 2];
                }
                (prev, cur) = (cur, prev);
            }
            return (width, height, rgb);
        }

        private static int Paeth(int a, int b, int c)
        {
            int p = a + b - c, pa = Math.Abs(p - a), pb = Math.Abs(p - b), pc = Math.Abs(p - c);
            return pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
        }
    }
}
