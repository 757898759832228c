using System.Collections.Concurrent;
using System.Runtime.InteropServices;
using Attend.Cuda.Interop;

namespace Attend.Cuda;

/// <summary>Whether the CUDA backend can run here, and the device it uses (device 0, primary context).</summary>
public static class CudaBackend
{
    private static readonly Lazy<(CudaDevice? Device, string? Reason)> State = new(Open, LazyThreadSafetyMode.ExecutionAndPublication);

    /// <summary>True when a driver, a device and NVRTC were found.</summary>
    public static bool IsAvailable => State.Value.Device is not null;

    /// <summary>Why the backend is unavailable (no driver, no device, no NVRTC), or null.</summary>
    public static string? UnavailableReason => State.Value.Reason;

    /// <summary>The device. </summary>
    /// <exception cref="CudaException">when the backend is unavailable, with the reason.</exception>
    public static CudaDevice Device => State.Value.Device ?? throw new CudaException($"the CUDA backend is unavailable: {State.Value.Reason}");

    private static unsafe (CudaDevice?, string?) Open()
    {
        NativeLibraries.Register();
        if (NativeLibraries.CudaError is { } noDriver) return (null, noDriver);
        if (NativeLibraries.NvrtcError is { } noNvrtc) return (null, noNvrtc);
        try
        {
            int r = Driver.cuInit(0);
            if (r != 0) return (null, $"cuInit failed: {Driver.ErrorName(r)}: {Driver.ErrorText(r)}");
            int count;
            Driver.Check(Driver.cuDeviceGetCount(&count), "cuDeviceGetCount");
            if (count == 0) return (null, "the driver reports no CUDA device");
            return (new CudaDevice(0), null);
        }
        catch (CudaException e)
        {
            return (null, e.Message);
        }
        catch (DllNotFoundException e)
        {
            return (null, e.Message);
        }
        catch (EntryPointNotFoundException e)
        {
            return (null, e.Message);
        }
    }
}

/// <summary>One CUDA device with its primary context and a stream; kernels loaded on it are cached here.</summary>
public sealed unsafe class CudaDevice
{
    private readonly nint _context;
    private readonly ConcurrentDictionary<string, CudaKernel> _kernels = new(StringComparer.Ordinal);

    internal CudaDevice(int ordinal)
    {
        int device;
        Driver.Check(Driver.cuDeviceGet(&device, ordinal), "cuDeviceGet");
        Ordinal = device;
        nint context;
        Driver.Check(Driver.cuDevicePrimaryCtxRetain(&context, device), "cuDevicePrimaryCtxRetain");
        _context = context;
        MakeCurrent();
        byte* name = stackalloc byte[256];
        Driver.Check(Driver.cuDeviceGetName(name, 256, device), "cuDeviceGetName");
        Name = Marshal.PtrToStringUTF8((nint)name) ?? "CUDA device";
        ComputeMajor = DeviceAttribute(Driver.DeviceAttributeComputeCapabilityMajor);
        ComputeMinor = DeviceAttribute(Driver.DeviceAttributeComputeCapabilityMinor);
        Multiprocessors = DeviceAttribute(Driver.DeviceAttributeMultiprocessorCount);
        MaxSharedMemoryPerBlock = DeviceAttribute(Driver.DeviceAttributeMaxSharedMemoryPerBlockOptin);
        SharedMemoryPerMultiprocessor = DeviceAttribute(Driver.DeviceAttributeMaxSharedMemoryPerMultiprocessor);
        nuint total;
        Driver.Check(Driver.cuDeviceTotalMem(&total, device), "cuDeviceTotalMem");
        TotalMemory = (long)total;
        int version;
        Driver.Check(Driver.cuDriverGetVersion(&version), "cuDriverGetVersion");
        DriverVersion = $"{version / 1000}.{version % 1000 / 10}";
    }

    private int DeviceAttribute(int attribute)
    {
        int value;
        Driver.Check(Driver.cuDeviceGetAttribute(&value, attribute, Ordinal), "cuDeviceGetAttribute");
        return value;
    }

    /// <summary>Device ordinal.</summary>
    public int Ordinal { get; }

    /// <summary>Marketing name, e.g. "NVIDIA H100 80GB HBM3".</summary>
    public string Name { get; }

    /// <summary>Compute capability major.</summary>
    public int ComputeMajor { get; }

    /// <summary>Compute capability minor.</summary>
    public int ComputeMinor { get; }

    /// <summary>Streaming multiprocessors.</summary>
    public int Multiprocessors { get; }

    /// <summary>Largest opt-in dynamic shared memory per block, bytes.</summary>
    public int MaxSharedMemoryPerBlock { get; }

    /// <summary>Shared memory of one multiprocessor (bytes): with a kernel's per-block need, how many of its blocks fit at once.</summary>
    public int SharedMemoryPerMultiprocessor { get; }

    /// <summary>Device memory, bytes.</summary>
    public long TotalMemory { get; }

    /// <summary>CUDA driver API version, e.g. "13.0".</summary>
    public string DriverVersion { get; }

    /// <summary>The NVRTC architecture compiled for: sm_90a on Hopper (its arch-specific features), sm_XY elsewhere.</summary>
    public string Architecture => ComputeMajor == 9 && ComputeMinor == 0 ? "sm_90a" : $"sm_{ComputeMajor}{ComputeMinor}";

    /// <summary>Binds the primary context to the calling thread (cheap; every entry point calls it).</summary>
    public void MakeCurrent() => Driver.Check(Driver.cuCtxSetCurrent(_context), "cuCtxSetCurrent");

    /// <summary>Waits for all work on the device.</summary>
    public void Synchronize()
    {
        MakeCurrent();
        Driver.Check(Driver.cuCtxSynchronize(), "cuCtxSynchronize");
    }

    /// <summary>Free and total device memory, bytes.</summary>
    public (long Free, long Total) MemoryInfo()
    {
        MakeCurrent();
        nuint free, total;
        Driver.Check(Driver.cuMemGetInfo(&free, &total), "cuMemGetInfo");
        return ((long)free, (long)total);
    }

    /// <summary>Gets (compiling and loading at first use) a kernel function of an embedded source with defines.</summary>
    public CudaKernel Kernel(string sourceName, string function, IReadOnlyDictionary<string, string> defines)
    {
        string key = $"{sourceName}|{function}|{string.Join(';', defines.OrderBy(d => d.Key, StringComparer.Ordinal).Select(d => $"{d.Key}={d.Value}"))}";
        return _kernels.GetOrAdd(key, _ =>
        {
            MakeCurrent();
            CompiledImage image = KernelCompiler.Compile(sourceName, defines, Architecture);
            return new CudaKernel(image, function);
        });
    }

    /// <summary>Kernels loaded so far, by their key (source, function, defines).</summary>
    public IReadOnlyDictionary<string, CudaKernel> Kernels => _kernels.ToDictionary(k => k.Key, k => k.Value);
}

/// <summary>A loaded kernel function.</summary>
public sealed unsafe class CudaKernel
{
    private readonly nint _module;

    internal CudaKernel(CompiledImage image, string function)
    {
        nint module;
        fixed (byte* p = image.Image)
        {
            Driver.Check(Driver.cuModuleLoadData(&module, p), "cuModuleLoadData");
        }
        _module = module;
        nint fn;
        byte[] name = System.Text.Encoding.UTF8.GetBytes(function + "\0");
        fixed (byte* n = name)
        {
            Driver.Check(Driver.cuModuleGetFunction(&fn, module, n), $"cuModuleGetFunction({function})");
        }
        Function = fn;
        CompileMilliseconds = image.CompileMilliseconds;
        int regs, local;
        Driver.Check(Driver.cuFuncGetAttribute(&regs, Driver.FunctionAttributeNumRegisters, fn), "cuFuncGetAttribute");
        Driver.Check(Driver.cuFuncGetAttribute(&local, Driver.FunctionAttributeLocalSizeBytes, fn), "cuFuncGetAttribute");
        Registers = regs;
        LocalBytes = local;
    }

    internal nint Function { get; }

    /// <summary>NVRTC time of this kernel's image; 0 when it came from the disk cache.</summary>
    public double CompileMilliseconds { get; }

    /// <summary>Registers per thread.</summary>
    public int Registers { get; }

    /// <summary>Local memory per thread (non-zero means register spills).</summary>
    public int LocalBytes { get; }

    private int _sharedConfigured;

    /// <summary>Launches on the default stream. <paramref name="arguments"/> point at each kernel parameter.</summary>
    internal void Launch(uint gridX, uint gridY, uint gridZ, uint block, int sharedBytes, void** arguments, nint stream = 0)
    {
        if (sharedBytes > 48 * 1024 && _sharedConfigured < sharedBytes)
        {
            Driver.Check(Driver.cuFuncSetAttribute(Function, Driver.FunctionAttributeMaxDynamicSharedSizeBytes, sharedBytes), "cuFuncSetAttribute(max dynamic shared memory)");
            _sharedConfigured = sharedBytes;
        }
        Driver.Check(Driver.cuLaunchKernel(Function, gridX, gridY, gridZ, block, 1, 1, (uint)sharedBytes, stream, arguments, null), "cuLaunchKernel");
    }
}
