using Attend.Cuda;

namespace Attend.Cuda.Tests;

/// <summary>
/// Every embedded kernel compiles with every define combination the backend uses, through NVRTC on the CPU
/// (PTX for compute_80), so a kernel that does not compile never lands. Needs NVRTC, not a GPU: .ci/run installs
/// Debian's libnvrtc; where NVRTC cannot be loaded the test says so and passes only when ATTEND_REQUIRE_NVRTC is unset.
/// </summary>
public sealed class KernelCompileTests
{
    public static TheoryData<string, string> Variants()
    {
        var data = new TheoryData<string, string>();
        foreach ((string source, IReadOnlyDictionary<string, string> defines) in KernelVariants.All())
        {
            data.Add(source, string.Join(" | ", defines.Select(d => $"{d.Key}={d.Value}")));   // values may hold spaces and '=' (mask expressions)
        }
        return data;
    }

    [Theory]
    [MemberData(nameof(Variants))]
    public void Should_compile_with_nvrtc(string source, string defines)
    {
        if (!KernelCompiler.NvrtcAvailable)
        {
            Assert.True(Environment.GetEnvironmentVariable("ATTEND_REQUIRE_NVRTC") != "1", KernelCompiler.NvrtcUnavailableReason);
            return;
        }
        Dictionary<string, string> d = defines.Split(" | ", StringSplitOptions.RemoveEmptyEntries).Select(x => x.Split('=', 2)).ToDictionary(x => x[0], x => x[1]);
        CompiledImage image = KernelCompiler.Compile(source, d, "compute_80", useDiskCache: false);
        Assert.NotEmpty(image.Image);
    }

    [Fact]
    public void Should_report_the_nvrtc_log_of_a_broken_kernel()
    {
        if (!KernelCompiler.NvrtcAvailable) return;
        // HEAD_DIM 40 violates the kernel's static_assert: NVRTC must fail and the log must say why.
        var e = Assert.Throws<KernelCompilationException>(() =>
            KernelCompiler.Compile("flash_fwd.cu", new Dictionary<string, string> { ["HEAD_DIM"] = "40" }, "compute_80", useDiskCache: false));
        Assert.Contains("HEAD_DIM must be a multiple of 64", e.Log);
    }
}

public sealed class CudaAvailabilityTests
{
    [Fact]
    public void Should_explain_why_the_backend_is_unavailable()
    {
        if (CudaBackend.IsAvailable) return; // the GPU machine: nothing to explain
        Assert.False(string.IsNullOrWhiteSpace(CudaBackend.UnavailableReason));
        var e = Assert.Throws<CudaException>(() => CudaBackend.Device);
        Assert.Contains(CudaBackend.UnavailableReason!, e.Message);
        Assert.Throws<CudaException>(() => DeviceTensor<float>.Allocate(1, 2, 3, 4));
    }
}
