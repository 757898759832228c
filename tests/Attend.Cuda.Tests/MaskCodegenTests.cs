using Attend.Masks;

namespace Attend.Cuda.Tests;

/// <summary>
/// Every mask's <c>ToCuda()</c> is a well-formed C expression: it compiles inside a kernel through NVRTC (no GPU
/// needed), and on a GPU it allows exactly the pairs <c>Allows</c> does.
/// </summary>
public sealed class MaskCodegenTests
{
    private const int Sq = 48, Skv = 64, Heads = 2;

    private static Dictionary<string, Mask> Catalog() => new()
    {
        ["full"] = Mask.Full,
        ["causal"] = Mask.Causal,
        ["window"] = Mask.SlidingWindow(7, 2),
        ["sink|causal&window"] = Mask.Sink(4) | (Mask.Causal & Mask.SlidingWindow(6)),
        ["!causal"] = !Mask.Causal,
        ["dilated"] = Mask.DilatedWindow(5, 3),
        ["strided_shards"] = Mask.StridedShards(8, 2, 3),
        ["head_windows"] = Mask.HeadWindows(5, 17),
        ["regions"] = Mask.Regions([(0, 10, 5, 30), (20, 40, 0, 8)]),
        ["head_chunks"] = Mask.HeadChunks(10, [[0, 2], [1, 3, 4]]) & Mask.Causal,
        ["global"] = Mask.GlobalTokens(3, 20) | (Mask.Causal & Mask.SlidingWindow(4)),
        ["global_rows"] = Mask.GlobalRows(7) | Mask.SlidingWindow(1, 1),
        ["shifted_groups"] = Mask.ShiftedGroups(8),
        ["block_causal"] = Mask.BlockCausal(12),
        // Packed documents (runs) and non-contiguous ids, each side with its own ids (Sq = 48, Skv = 64).
        ["documents"] = Mask.Document([.. Enumerable.Range(0, Sq).Select(i => i / 11)], [.. Enumerable.Range(0, Skv).Select(i => i / 9)]) & Mask.Causal,
        ["scattered_ids"] = Mask.Document([.. Enumerable.Range(0, Sq).Select(i => (i * 7) % 5)], [.. Enumerable.Range(0, Skv).Select(i => (i * 3) % 5)]),
    };

    // Neighborhood masks need Sq = Skv = the grid: checked on their own square extent.
    private static Dictionary<string, (Mask Mask, int Tokens)> Grids() => new()
    {
        ["nbh2d"] = (Mask.Neighborhood([8, 8], [3, 5], [2, 1]), 64),
        ["nbh3d"] = (Mask.Neighborhood([4, 4, 4], [3, 3, 3], [1, 1, 1], [false, true, false]), 64),
        ["nbh1d"] = (Mask.Neighborhood([64], [7], [3]), 64),
        ["nbh2d_strided"] = (Mask.Neighborhood([8, 8], [5, 3], [1, 2], [false, true], [2, 3]), 64),
    };

    public static TheoryData<string> GridNames() => [.. Grids().Keys];

    private static string GridKernel(Mask mask, int n) => $$"""
        extern "C" __global__ void mask_eval(unsigned char* out)
        {
            int i = blockIdx.x * blockDim.x + threadIdx.x;
            if (i >= {{n * n}}) return;
            int b = 0, h = 0, q = i / {{n}}, kv = i % {{n}};
            (void)b; (void)h;
            out[i] = ({{mask.ToCuda(new MaskExtent(1, 1, n, n))}}) ? 1 : 0;
        }
        """;

    [Theory]
    [MemberData(nameof(GridNames))]
    public void Should_compile_neighborhood_expressions(string name)
    {
        if (!KernelCompiler.NvrtcAvailable) return;
        (Mask mask, int n) = Grids()[name];
        Assert.NotEmpty(KernelCompiler.CompileSource(GridKernel(mask, n), $"nbh_{name}.cu", new Dictionary<string, string>(), "compute_80", useDiskCache: false).Image);
    }

    [CudaTheory]
    [MemberData(nameof(GridNames))]
    public unsafe void Should_evaluate_neighborhoods_on_the_gpu_like_allows(string name)
    {
        (Mask mask, int n) = Grids()[name];
        CompiledImage image = KernelCompiler.CompileSource(GridKernel(mask, n), $"nbh_{name}.cu", new Dictionary<string, string>(), CudaBackend.Device.Architecture);
        var kernel = new CudaKernel(image, "mask_eval");
        using DeviceBuffer<byte> result = DeviceBuffer<byte>.Allocate(n * n);
        ulong ptr = result.Pointer;
        void* arg = &ptr;
        kernel.Launch((uint)((n * n + 255) / 256), 1, 1, 256, 0, &arg);
        var host = new byte[n * n];
        result.CopyTo(host);
        var e = new MaskExtent(1, 1, n, n);
        for (int i = 0; i < n * n; i++) Assert.True((host[i] == 1) == mask.Allows(e, 0, 0, i / n, i % n), $"{name}: q={i / n} kv={i % n}");
    }

    public static TheoryData<string> Names() => [.. Catalog().Keys];

    private static string KernelSource(Mask mask) => $$"""
        extern "C" __global__ void mask_eval(unsigned char* out)
        {
            int i = blockIdx.x * blockDim.x + threadIdx.x;
            if (i >= {{Heads * Sq * Skv}}) return;
            int b = 0, h = i / ({{Sq * Skv}}), q = (i / {{Skv}}) % {{Sq}}, kv = i % {{Skv}};
            (void)b;
            out[i] = ({{mask.ToCuda(new MaskExtent(1, Heads, Sq, Skv))}}) ? 1 : 0;
        }
        """;

    [Theory]
    [MemberData(nameof(Names))]
    public void Should_compile_the_cuda_expression(string name)
    {
        if (!KernelCompiler.NvrtcAvailable) return;
        CompiledImage image = KernelCompiler.CompileSource(KernelSource(Catalog()[name]), $"mask_{name}.cu", new Dictionary<string, string>(), "compute_80", useDiskCache: false);
        Assert.NotEmpty(image.Image);
    }

    [CudaTheory]
    [MemberData(nameof(Names))]
    public unsafe void Should_allow_on_the_gpu_exactly_what_allows_says(string name)
    {
        Mask mask = Catalog()[name];
        CudaDevice device = CudaBackend.Device;
        CompiledImage image = KernelCompiler.CompileSource(KernelSource(mask), $"mask_{name}.cu", new Dictionary<string, string>(), device.Architecture);
        var kernel = new CudaKernel(image, "mask_eval");
        int n = Heads * Sq * Skv;
        using DeviceBuffer<byte> result = DeviceBuffer<byte>.Allocate(n);
        ulong ptr = result.Pointer;
        void* arg = &ptr;
        kernel.Launch((uint)((n + 255) / 256), 1, 1, 256, 0, &arg);
        var host = new byte[n];
        result.CopyTo(host);
        var e = new MaskExtent(1, Heads, Sq, Skv);
        for (int i = 0; i < n; i++)
        {
            int h = i / (Sq * Skv), q = i / Skv % Sq, kv = i % Skv;
            Assert.True((host[i] == 1) == mask.Allows(e, 0, h, q, kv), $"{name}: h={h} q={q} kv={kv}");
        }
    }
}
