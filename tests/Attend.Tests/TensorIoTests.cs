using System.Text;
using Attend.Tensors;

namespace Attend.Tests;

public sealed class TensorIoTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("attend-io-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string PathOf(string name) => Path.Combine(_dir, name);

    public static TheoryData<DType> DTypesAll => [DType.Float32, DType.Float16, DType.BFloat16, DType.Float64];

    [Theory]
    [MemberData(nameof(DTypesAll))]
    public void Should_round_trip_npy(DType dtype)
    {
        Tensor t = Tensor.FromArray(TestData.Normal(2 * 3 * 5 * 7, 7), 2, 3, 5, 7).ConvertTo(dtype);
        Npy.Write(PathOf("a.npy"), t);
        Tensor back = Npy.Read(PathOf("a.npy"));
        Assert.Equal(dtype, back.DType);
        Assert.Equal(t.Shape, back.Shape);
        Assert.Equal(t.AsBytes().ToArray(), back.AsBytes().ToArray());
        // NumPy requires the header block to be a multiple of 64 bytes, ending in a newline.
        byte[] file = File.ReadAllBytes(PathOf("a.npy"));
        int headerLength = file[8] | (file[9] << 8);
        Assert.Equal(0, (10 + headerLength) % 64);
        Assert.Equal((byte)'\n', file[10 + headerLength - 1]);
    }

    [Theory]
    [MemberData(nameof(DTypesAll))]
    public void Should_round_trip_safetensors(DType dtype)
    {
        Tensor a = Tensor.FromArray(TestData.Normal(4 * 6, 1), 4, 6).ConvertTo(dtype);
        Tensor b = Tensor.FromArray(TestData.Normal(3, 2), 3).ConvertTo(dtype);
        SafeTensors.Write(PathOf("m.safetensors"), new Dictionary<string, Tensor> { ["w.a"] = a, ["w.b"] = b }, new Dictionary<string, string> { ["format"] = "pt" });
        IReadOnlyDictionary<string, Tensor> all = SafeTensors.ReadAll(PathOf("m.safetensors"));
        Assert.Equal(2, all.Count);
        Assert.Equal(a.AsBytes().ToArray(), all["w.a"].AsBytes().ToArray());
        Assert.Equal(b.Shape, SafeTensors.Read(PathOf("m.safetensors"), "w.b").Shape);
        long headerLength = BitConverter.ToInt64(File.ReadAllBytes(PathOf("m.safetensors")), 0);
        Assert.Equal(0, headerLength % 8);
    }

    [Fact]
    public void Should_read_a_numpy_written_header()
    {
        // Exactly what numpy 1.x writes for np.save('x.npy', np.arange(6, dtype='<f4').reshape(2, 3)).
        string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
        byte[] file = NpyBytes(dict, Enumerable.Range(0, 6).SelectMany(i => BitConverter.GetBytes((float)i)).ToArray());
        Tensor t = Npy.Read(new MemoryStream(file));
        Assert.Equal([2, 3], t.Shape);
        Assert.Equal([0f, 1, 2, 3, 4, 5], t.Array<float>());
    }

    [Fact]
    public void Should_read_bf16_bits_written_as_u2_and_a_1d_shape()
    {
        // torch: np.save(p, torch.tensor([1.0, -2.5, 3.0], dtype=torch.bfloat16).view(torch.uint16).numpy())
        ushort[] bits = [0x3F80, 0xC020, 0x4040];
        byte[] file = NpyBytes("{'descr': '<u2', 'fortran_order': False, 'shape': (3,), }", bits.SelectMany(BitConverter.GetBytes).ToArray());
        Tensor t = Npy.Read(new MemoryStream(file));
        Assert.Equal(DType.BFloat16, t.DType);
        Assert.Equal([1f, -2.5f, 3f], t.ToSingleArray());
    }

    [Fact]
    public void Should_read_a_pytorch_style_safetensors_header()
    {
        // safetensors' Python writer: compact JSON, __metadata__ first, header padded with spaces to 8 bytes.
        string json = "{\"__metadata__\":{\"format\":\"pt\"},\"q\":{\"dtype\":\"F16\",\"shape\":[1,2],\"data_offsets\":[0,4]}}";
        while ((json.Length % 8) != 0) json += " ";
        byte[] data = [.. BitConverter.GetBytes((Half)1.5f), .. BitConverter.GetBytes((Half)(-0.25f))];
        File.WriteAllBytes(PathOf("p.safetensors"), [.. BitConverter.GetBytes((long)json.Length), .. Encoding.UTF8.GetBytes(json), .. data]);
        Tensor q = SafeTensors.Read(PathOf("p.safetensors"), "q");
        Assert.Equal([1.5f, -0.25f], q.ToSingleArray());
    }

    [Theory]
    [InlineData("{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", "big-endian")]
    [InlineData("{'descr': '<i8', 'fortran_order': False, 'shape': (2,), }", "unsupported dtype")]
    [InlineData("{'descr': '<f4', 'fortran_order': True, 'shape': (2,), }", "Fortran")]
    [InlineData("{'descr': '<f4', 'shape': (2,), }", "malformed")]
    [InlineData("{'descr': '<f4', 'fortran_order': False, 'shape': (2, x), }", "malformed shape")]
    public void Should_reject_bad_npy_headers(string dict, string message)
    {
        var e = Assert.Throws<InvalidDataException>(() => Npy.Read(new MemoryStream(NpyBytes(dict, new byte[8]))));
        Assert.Contains(message, e.Message);
    }

    [Fact]
    public void Should_reject_truncated_and_garbled_npy()
    {
        byte[] file = NpyBytes("{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }", new byte[8]);
        Assert.Contains("truncated", Assert.Throws<InvalidDataException>(() => Npy.Read(new MemoryStream(file))).Message);
        Assert.Contains("magic", Assert.Throws<InvalidDataException>(() => Npy.Read(new MemoryStream("hello world, no npy"u8.ToArray()))).Message);
        Assert.Contains("truncated", Assert.Throws<InvalidDataException>(() => Npy.Read(new MemoryStream(file[..20]))).Message);
    }

    [Fact]
    public void Should_reject_truncated_and_garbled_safetensors()
    {
        Tensor a = Tensor.FromArray(TestData.Normal(64, 1), 8, 8);
        SafeTensors.Write(PathOf("ok.safetensors"), new Dictionary<string, Tensor> { ["a"] = a });
        byte[] good = File.ReadAllBytes(PathOf("ok.safetensors"));
        File.WriteAllBytes(PathOf("short.safetensors"), good[..^10]);
        Assert.Contains("outside", Assert.Throws<InvalidDataException>(() => SafeTensors.ReadAll(PathOf("short.safetensors"))).Message);
        File.WriteAllBytes(PathOf("tiny.safetensors"), good[..5]);
        Assert.Throws<InvalidDataException>(() => SafeTensors.ReadAll(PathOf("tiny.safetensors")));
        byte[] garbled = (byte[])good.Clone();
        garbled[9] = (byte)'#';
        File.WriteAllBytes(PathOf("garbled.safetensors"), garbled);
        Assert.Contains("JSON", Assert.Throws<InvalidDataException>(() => SafeTensors.ReadAll(PathOf("garbled.safetensors"))).Message);
        byte[] hugeHeader = (byte[])good.Clone();
        BitConverter.GetBytes(1L << 40).CopyTo(hugeHeader, 0);
        File.WriteAllBytes(PathOf("huge.safetensors"), hugeHeader);
        Assert.Throws<InvalidDataException>(() => SafeTensors.ReadAll(PathOf("huge.safetensors")));
        Assert.Contains("has no tensor 'b'", Assert.Throws<KeyNotFoundException>(() => SafeTensors.Read(PathOf("ok.safetensors"), "b")).Message);
    }

    [Fact]
    public void Should_read_the_shared_real_attention_inputs_when_present()
    {
        string path = Path.Combine(RepoPaths.Shared, "data", "gpt-bytes-8k", "layer6_q.npy");
        if (!File.Exists(path)) return; // shared/ sits beside every checkout and CI clone; nothing to check without it
        Tensor q = Npy.Read(path);
        Assert.Equal(DType.Float16, q.DType);
        Assert.Equal([1, 8192, 4, 64], q.Shape);
    }

    private static byte[] NpyBytes(string dict, byte[] data)
    {
        int total = 10 + dict.Length + 1;
        string header = dict + new string(' ', (total + 63) / 64 * 64 - total) + "\n";
        return [0x93, .. "NUMPY"u8.ToArray(), 1, 0, (byte)(header.Length & 0xFF), (byte)(header.Length >> 8), .. Encoding.Latin1.GetBytes(header), .. data];
    }
}

internal static class RepoPaths
{
    /// <summary>The shared/ folder beside the checkout (../shared from the repository root).</summary>
    public static string Shared
    {
        get
        {
            string? dir = AppContext.BaseDirectory;
            while (dir is not null && !File.Exists(Path.Combine(dir, "Attend.slnx"))) dir = Path.GetDirectoryName(dir);
            return Path.Combine(Path.GetDirectoryName(dir ?? ".") ?? ".", "shared");
        }
    }
}
