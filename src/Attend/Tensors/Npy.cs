using System.Globalization;
using System.Text;
using System.Text.RegularExpressions;

namespace Attend.Tensors;

/// <summary>
/// NumPy <c>.npy</c> files (format versions 1.0, 2.0 and 3.0, C order, little-endian).
/// Element types: <c>&lt;f4</c> (f32), <c>&lt;f2</c> (f16), <c>&lt;f8</c> (f64) and, by Attend's convention,
/// <c>&lt;u2</c> for bfloat16 bit patterns — NumPy has no bfloat16, and <c>&lt;u2</c> is what
/// <c>np.save(path, t.view(torch.uint16).numpy())</c> writes for a torch bf16 tensor
/// (read it back in PyTorch with <c>torch.from_numpy(np.load(path)).view(torch.bfloat16)</c>).
/// ml_dtypes' bfloat16 (<c>|V2</c> / <c>&lt;V2</c>) is also read as bfloat16.
/// </summary>
public static partial class Npy
{
    private static ReadOnlySpan<byte> Magic => [0x93, (byte)'N', (byte)'U', (byte)'M', (byte)'P', (byte)'Y'];

    /// <summary>Reads a whole <c>.npy</c> file.</summary>
    /// <exception cref="InvalidDataException">when the file is not a well-formed .npy of a supported dtype.</exception>
    public static Tensor Read(string path)
    {
        using FileStream stream = File.OpenRead(path);
        try
        {
            return Read(stream);
        }
        catch (InvalidDataException e)
        {
            throw new InvalidDataException($"{path}: {e.Message}", e);
        }
    }

    /// <summary>Reads one <c>.npy</c> array from a stream.</summary>
    public static Tensor Read(Stream stream)
    {
        ArgumentNullException.ThrowIfNull(stream);
        Span<byte> prefix = stackalloc byte[8];
        ReadExactly(stream, prefix, "the magic string");
        if (!prefix[..6].SequenceEqual(Magic))
        {
            throw new InvalidDataException("not a .npy file (the magic string \\x93NUMPY is missing)");
        }
        byte major = prefix[6];
        int headerLength;
        if (major == 1)
        {
            Span<byte> len = stackalloc byte[2];
            ReadExactly(stream, len, "the header length");
            headerLength = len[0] | (len[1] << 8);
        }
        else if (major is 2 or 3)
        {
            Span<byte> len = stackalloc byte[4];
            ReadExactly(stream, len, "the header length");
            headerLength = BitConverter.ToInt32(len);
            if (headerLength < 0 || headerLength > 1 << 24)
            {
                throw new InvalidDataException($"implausible header length {headerLength}");
            }
        }
        else
        {
            throw new InvalidDataException($"unsupported .npy format version {major}.{prefix[7]}");
        }
        byte[] headerBytes = new byte[headerLength];
        ReadExactly(stream, headerBytes, "the header");
        string header = (major == 3 ? Encoding.UTF8 : Encoding.Latin1).GetString(headerBytes);
        (DType dtype, bool fortran, int[] shape) = ParseHeader(header);
        if (fortran)
        {
            throw new InvalidDataException("Fortran-order arrays are not supported; save with np.ascontiguousarray");
        }
        Tensor tensor = Tensor.Zeros(dtype, shape);
        ReadExactly(stream, tensor.AsBytes(), $"the data ({tensor.ElementCount} elements of {DTypes.Name(dtype)})");
        return tensor;
    }

    /// <summary>Writes a tensor as a version 1.0 <c>.npy</c> file (bfloat16 as <c>&lt;u2</c>).</summary>
    public static void Write(string path, Tensor tensor)
    {
        using FileStream stream = File.Create(path);
        Write(stream, tensor);
    }

    /// <summary>Writes a tensor as a version 1.0 (or 2.0 for huge headers) <c>.npy</c> array.</summary>
    public static void Write(Stream stream, Tensor tensor)
    {
        ArgumentNullException.ThrowIfNull(stream);
        ArgumentNullException.ThrowIfNull(tensor);
        string descr = tensor.DType switch
        {
            DType.Float32 => "<f4",
            DType.Float16 => "<f2",
            DType.BFloat16 => "<u2",
            DType.Float64 => "<f8",
            _ => throw new ArgumentOutOfRangeException(nameof(tensor)),
        };
        string shape = tensor.Shape.Count == 1
            ? $"({tensor.Shape[0]},)"
            : "(" + string.Join(", ", tensor.Shape) + ")";
        string dict = $"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}";
        int preamble = 10;
        int total = preamble + dict.Length + 1;
        int padded = (total + 63) / 64 * 64;
        string header = dict + new string(' ', padded - total) + "\n";
        stream.Write(Magic);
        if (header.Length > ushort.MaxValue)
        {
            throw new ArgumentException("header too long for a .npy 1.0 file", nameof(tensor));
        }
        stream.Write([1, 0, (byte)(header.Length & 0xFF), (byte)(header.Length >> 8)]);
        stream.Write(Encoding.Latin1.GetBytes(header));
        stream.Write(tensor.AsBytes());
    }

    internal static (DType DType, bool Fortran, int[] Shape) ParseHeader(string header)
    {
        Match descr = DescrPattern().Match(header);
        Match fortran = FortranPattern().Match(header);
        Match shape = ShapePattern().Match(header);
        if (!descr.Success || !fortran.Success || !shape.Success)
        {
            throw new InvalidDataException($"malformed .npy header: {header.Trim()}");
        }
        string d = descr.Groups[1].Value;
        DType dtype = d switch
        {
            "<f4" or "=f4" => DType.Float32,
            "<f2" or "=f2" => DType.Float16,
            "<f8" or "=f8" => DType.Float64,
            "<u2" or "=u2" or "|V2" or "<V2" => DType.BFloat16,
            _ when d.StartsWith('>') => throw new InvalidDataException($"big-endian arrays ({d}) are not supported"),
            _ => throw new InvalidDataException($"unsupported dtype '{d}': expected <f4, <f2, <f8 or <u2 (bfloat16 bits)"),
        };
        string[] parts = shape.Groups[1].Value.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        var dims = new int[parts.Length];
        for (int i = 0; i < parts.Length; i++)
        {
            string p = parts[i].TrimEnd('L');
            if (!int.TryParse(p, NumberStyles.None, CultureInfo.InvariantCulture, out dims[i]))
            {
                throw new InvalidDataException($"malformed shape in .npy header: ({shape.Groups[1].Value})");
            }
        }
        return (dtype, fortran.Groups[1].Value == "True", dims);
    }

    private static void ReadExactly(Stream stream, Span<byte> buffer, string what)
    {
        int read = stream.ReadAtLeast(buffer, buffer.Length, throwOnEndOfStream: false);
        if (read < buffer.Length)
        {
            throw new InvalidDataException($"file truncated while reading {what}: got {read} of {buffer.Length} bytes");
        }
    }

    [GeneratedRegex("""['"]descr['"]\s*:\s*['"]([^'"]*)['"]""")]
    private static partial Regex DescrPattern();

    [GeneratedRegex("""['"]fortran_order['"]\s*:\s*(True|False)""")]
    private static partial Regex FortranPattern();

    [GeneratedRegex("""['"]shape['"]\s*:\s*\(([^)]*)\)""")]
    private static partial Regex ShapePattern();
}
