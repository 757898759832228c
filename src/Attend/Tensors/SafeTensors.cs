using System.Text;
using System.Text.Json;

namespace Attend.Tensors;

/// <summary>
/// Hugging Face <c>.safetensors</c> files: an 8-byte little-endian header length, a JSON header
/// <c>{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}</c>, then the raw little-endian data.
/// Element types F32, F16, BF16 and F64 are read and written.
/// </summary>
public static class SafeTensors
{
    /// <summary>One entry of a file's header.</summary>
    /// <param name="Name">Tensor name.</param>
    /// <param name="DType">Element type.</param>
    /// <param name="Shape">Extent of each dimension.</param>
    /// <param name="Begin">First byte of the data, relative to the end of the header.</param>
    /// <param name="End">One past the last byte.</param>
    public sealed record Entry(string Name, DType DType, int[] Shape, long Begin, long End);

    /// <summary>Reads the header of a file: every tensor's name, dtype, shape and byte range.</summary>
    public static IReadOnlyList<Entry> ReadHeader(string path)
    {
        using FileStream stream = File.OpenRead(path);
        return Wrap(path, () => ReadHeader(stream, out _));
    }

    /// <summary>Reads every tensor of a file.</summary>
    public static IReadOnlyDictionary<string, Tensor> ReadAll(string path)
    {
        using FileStream stream = File.OpenRead(path);
        return Wrap(path, () =>
        {
            IReadOnlyList<Entry> entries = ReadHeader(stream, out long dataStart);
            var result = new Dictionary<string, Tensor>(StringComparer.Ordinal);
            foreach (Entry e in entries)
            {
                result[e.Name] = ReadData(stream, dataStart, e);
            }
            return (IReadOnlyDictionary<string, Tensor>)result;
        });
    }

    /// <summary>Reads one named tensor of a file.</summary>
    /// <exception cref="KeyNotFoundException">when the file has no tensor of that name (the message lists those it has).</exception>
    public static Tensor Read(string path, string name)
    {
        using FileStream stream = File.OpenRead(path);
        return Wrap(path, () =>
        {
            IReadOnlyList<Entry> entries = ReadHeader(stream, out long dataStart);
            Entry entry = entries.FirstOrDefault(e => e.Name == name)
                ?? throw new KeyNotFoundException($"{path} has no tensor '{name}'; it has: {string.Join(", ", entries.Select(e => e.Name))}");
            return ReadData(stream, dataStart, entry);
        });
    }

    /// <summary>Writes tensors (in name order) with optional string metadata.</summary>
    public static void Write(string path, IReadOnlyDictionary<string, Tensor> tensors, IReadOnlyDictionary<string, string>? metadata = null)
    {
        ArgumentNullException.ThrowIfNull(tensors);
        using var headerJson = new MemoryStream();
        using (var w = new Utf8JsonWriter(headerJson))
        {
            w.WriteStartObject();
            if (metadata is not null)
            {
                w.WriteStartObject("__metadata__");
                foreach ((string k, string v) in metadata) w.WriteString(k, v);
                w.WriteEndObject();
            }
            long offset = 0;
            foreach ((string name, Tensor t) in tensors.OrderBy(p => p.Key, StringComparer.Ordinal))
            {
                long bytes = t.ElementCount * DTypes.SizeOf(t.DType);
                w.WriteStartObject(name);
                w.WriteString("dtype", t.DType switch
                {
                    DType.Float32 => "F32",
                    DType.Float16 => "F16",
                    DType.BFloat16 => "BF16",
                    DType.Float64 => "F64",
                    _ => throw new ArgumentOutOfRangeException(nameof(tensors)),
                });
                w.WriteStartArray("shape");
                foreach (int d in t.Shape) w.WriteNumberValue(d);
                w.WriteEndArray();
                w.WriteStartArray("data_offsets");
                w.WriteNumberValue(offset);
                w.WriteNumberValue(offset + bytes);
                w.WriteEndArray();
                w.WriteEndObject();
                offset += bytes;
            }
            w.WriteEndObject();
        }
        byte[] header = headerJson.ToArray();
        int padding = (8 - header.Length % 8) % 8;
        using FileStream stream = File.Create(path);
        stream.Write(BitConverter.GetBytes((ulong)(header.Length + padding)));
        stream.Write(header);
        for (int i = 0; i < padding; i++) stream.WriteByte((byte)' ');
        foreach ((string _, Tensor t) in tensors.OrderBy(p => p.Key, StringComparer.Ordinal))
        {
            stream.Write(t.AsBytes());
        }
    }

    private static T Wrap<T>(string path, Func<T> body)
    {
        try
        {
            return body();
        }
        catch (InvalidDataException e)
        {
            throw new InvalidDataException($"{path}: {e.Message}", e);
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"{path}: the safetensors header is not valid JSON ({e.Message})", e);
        }
    }

    private static IReadOnlyList<Entry> ReadHeader(Stream stream, out long dataStart)
    {
        Span<byte> lengthBytes = stackalloc byte[8];
        if (stream.ReadAtLeast(lengthBytes, 8, throwOnEndOfStream: false) < 8)
        {
            throw new InvalidDataException("file truncated: no 8-byte header length");
        }
        ulong headerLength = BitConverter.ToUInt64(lengthBytes);
        long fileLength = stream.Length;
        if (headerLength > 100_000_000 || (long)headerLength > fileLength - 8)
        {
            throw new InvalidDataException($"header length {headerLength} does not fit in a file of {fileLength} bytes");
        }
        byte[] header = new byte[headerLength];
        stream.ReadExactly(header);
        dataStart = 8 + (long)headerLength;
        long dataLength = fileLength - dataStart;
        using JsonDocument doc = JsonDocument.Parse(header);
        if (doc.RootElement.ValueKind != JsonValueKind.Object)
        {
            throw new InvalidDataException("the header is not a JSON object");
        }
        var entries = new List<Entry>();
        foreach (JsonProperty p in doc.RootElement.EnumerateObject())
        {
            if (p.Name == "__metadata__")
            {
                continue;
            }
            entries.Add(ParseEntry(p, dataLength));
        }
        return entries;
    }

    private static Entry ParseEntry(JsonProperty p, long dataLength)
    {
        JsonElement e = p.Value;
        if (e.ValueKind != JsonValueKind.Object
            || !e.TryGetProperty("dtype", out JsonElement dtypeElement)
            || !e.TryGetProperty("shape", out JsonElement shapeElement)
            || !e.TryGetProperty("data_offsets", out JsonElement offsetsElement)
            || shapeElement.ValueKind != JsonValueKind.Array
            || offsetsElement.ValueKind != JsonValueKind.Array
            || offsetsElement.GetArrayLength() != 2)
        {
            throw new InvalidDataException($"tensor '{p.Name}' needs dtype, shape and data_offsets [begin, end]");
        }
        string dtypeName = dtypeElement.GetString() ?? "";
        DType dtype = dtypeName switch
        {
            "F32" => DType.Float32,
            "F16" => DType.Float16,
            "BF16" => DType.BFloat16,
            "F64" => DType.Float64,
            _ => throw new InvalidDataException($"tensor '{p.Name}' has dtype {dtypeName}; supported: F32, F16, BF16, F64"),
        };
        int[] shape = shapeElement.EnumerateArray().Select(x => x.TryGetInt32(out int v) && v >= 0 ? v
            : throw new InvalidDataException($"tensor '{p.Name}' has a bad shape {shapeElement}")).ToArray();
        long begin = offsetsElement[0].GetInt64();
        long end = offsetsElement[1].GetInt64();
        long count = 1;
        foreach (int d in shape) count *= d;
        long expected = count * DTypes.SizeOf(dtype);
        if (begin < 0 || end < begin || end > dataLength)
        {
            throw new InvalidDataException($"tensor '{p.Name}' data_offsets [{begin}, {end}] lie outside the {dataLength} data bytes (file truncated?)");
        }
        if (end - begin != expected)
        {
            throw new InvalidDataException($"tensor '{p.Name}' of shape [{string.Join(", ", shape)}] {dtypeName} needs {expected} bytes; data_offsets give {end - begin}");
        }
        return new Entry(p.Name, dtype, shape, begin, end);
    }

    private static Tensor ReadData(Stream stream, long dataStart, Entry entry)
    {
        Tensor tensor = Tensor.Zeros(entry.DType, entry.Shape);
        stream.Position = dataStart + entry.Begin;
        stream.ReadExactly(tensor.AsBytes());
        return tensor;
    }

    /// <summary>A short description of the header, for messages.</summary>
    public static string Describe(IReadOnlyList<Entry> entries)
    {
        ArgumentNullException.ThrowIfNull(entries);
        var sb = new StringBuilder();
        foreach (Entry e in entries) sb.Append(e.Name).Append(' ').Append(DTypes.Name(e.DType)).Append('[').AppendJoin(", ", e.Shape).Append("] ");
        return sb.ToString().TrimEnd();
    }
}
