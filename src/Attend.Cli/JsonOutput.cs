using System.Text.Json;
using System.Text.Json.Nodes;

namespace Attend.Cli;

internal static class JsonOutput
{
    private static readonly JsonSerializerOptions Indented = new() { WriteIndented = true };

    /// <summary>Writes <paramref name="node"/> to a file, or to stdout for "-".</summary>
    public static void Write(string? path, JsonNode node)
    {
        if (path is null) return;
        string text = node.ToJsonString(Indented);
        if (path == "-") Console.WriteLine(text);
        else File.WriteAllText(path, text + "\n");
    }

    /// <summary>A JSON number, or null for NaN/∞ (JSON has neither).</summary>
    public static JsonNode? Number(double x) => double.IsFinite(x) ? JsonValue.Create(x) : null;

    /// <summary>A number, or null when absent or not finite.</summary>
    public static JsonNode? Number(double? x) => x is { } v ? Number(v) : null;
}
