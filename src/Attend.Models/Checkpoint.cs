using System.Text.Json;
using Attend.Tensors;

namespace Attend.Models;

/// <summary>
/// Tensors of a Hugging Face checkpoint folder: <c>model.safetensors</c>, or shards listed by
/// <c>model.safetensors.index.json</c>. Tensors keep their stored dtype (f32, f16, bf16).
/// </summary>
public sealed class Checkpoint
{
    private readonly Dictionary<string, (string File, SafeTensors.Entry Entry)> _entries = new(StringComparer.Ordinal);

    private Checkpoint(string directory) => Directory = directory;

    /// <summary>The folder.</summary>
    public string Directory { get; }

    /// <summary>Tensor names.</summary>
    public IEnumerable<string> Names => _entries.Keys;

    /// <summary>Indexes the folder's safetensors files (headers only).</summary>
    public static Checkpoint Open(string directory)
    {
        if (!System.IO.Directory.Exists(directory)) throw new DirectoryNotFoundException($"model folder not found: {directory}");
        var checkpoint = new Checkpoint(directory);
        string index = Path.Combine(directory, "model.safetensors.index.json");
        string single = Path.Combine(directory, "model.safetensors");
        IEnumerable<string> files;
        if (File.Exists(index))
        {
            using JsonDocument doc = JsonDocument.Parse(File.ReadAllText(index));
            if (!doc.RootElement.TryGetProperty("weight_map", out JsonElement map) || map.ValueKind != JsonValueKind.Object)
            {
                throw new InvalidDataException($"{index}: missing \"weight_map\"");
            }
            files = map.EnumerateObject().Select(p => p.Value.GetString() ?? "").Distinct().ToList();
            foreach (string f in files)
            {
                if (!File.Exists(Path.Combine(directory, f))) throw new FileNotFoundException($"{index} lists shard {f}, which is missing from {directory}", Path.Combine(directory, f));
            }
        }
        else if (File.Exists(single))
        {
            files = ["model.safetensors"];
        }
        else
        {
            throw new FileNotFoundException($"{directory} has neither model.safetensors nor model.safetensors.index.json");
        }
        foreach (string f in files)
        {
            string path = Path.Combine(directory, f);
            foreach (SafeTensors.Entry e in SafeTensors.ReadHeader(path)) checkpoint._entries[e.Name] = (path, e);
        }
        return checkpoint;
    }

    /// <summary>Reads tensor <paramref name="name"/>, checking its shape.</summary>
    public Tensor Read(string name, params int[] expectedShape)
    {
        if (!_entries.TryGetValue(name, out var found)) throw new InvalidDataException($"{Directory}: tensor \"{name}\" is missing from the checkpoint");
        if (!found.Entry.Shape.SequenceEqual(expectedShape))
        {
            throw new InvalidDataException($"{Path.GetFileName(found.File)}: tensor \"{name}\" has shape [{string.Join(", ", found.Entry.Shape)}]; config.json implies [{string.Join(", ", expectedShape)}]");
        }
        return SafeTensors.Read(found.File, name);
    }

    /// <summary>Whether the checkpoint holds <paramref name="name"/>.</summary>
    public bool Contains(string name) => _entries.ContainsKey(name);
}
