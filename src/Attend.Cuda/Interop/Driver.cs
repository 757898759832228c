using System.Runtime.InteropServices;

namespace Attend.Cuda.Interop;

/// <summary>The CUDA driver API entry points Attend uses (libcuda.so.1). Every call's result goes through <see cref="Check"/>.</summary>
internal static unsafe partial class Driver
{
    public const string Library = "cuda";

    [LibraryImport(Library)] public static partial int cuInit(uint flags);
    [LibraryImport(Library)] public static partial int cuDriverGetVersion(int* version);
    [LibraryImport(Library)] public static partial int cuDeviceGetCount(int* count);
    [LibraryImport(Library)] public static partial int cuDeviceGet(int* device, int ordinal);
    [LibraryImport(Library)] public static partial int cuDeviceGetName(byte* name, int length, int device);
    [LibraryImport(Library)] public static partial int cuDeviceGetAttribute(int* value, int attribute, int device);
    [LibraryImport(Library, EntryPoint = "cuDeviceTotalMem_v2")] public static partial int cuDeviceTotalMem(nuint* bytes, int device);
    [LibraryImport(Library)] public static partial int cuDevicePrimaryCtxRetain(nint* context, int device);
    [LibraryImport(Library)] public static partial int cuCtxSetCurrent(nint context);
    [LibraryImport(Library)] public static partial int cuCtxSynchronize();
    [LibraryImport(Library)] public static partial int cuStreamCreate(nint* stream, uint flags);
    [LibraryImport(Library, EntryPoint = "cuStreamDestroy_v2")] public static partial int cuStreamDestroy(nint stream);
    [LibraryImport(Library)] public static partial int cuStreamSynchronize(nint stream);
    [LibraryImport(Library)] public static partial int cuEventCreate(nint* evt, uint flags);
    [LibraryImport(Library, EntryPoint = "cuEventDestroy_v2")] public static partial int cuEventDestroy(nint evt);
    [LibraryImport(Library)] public static partial int cuEventRecord(nint evt, nint stream);
    [LibraryImport(Library)] public static partial int cuEventSynchronize(nint evt);
    [LibraryImport(Library)] public static partial int cuEventElapsedTime(float* ms, nint start, nint end);
    [LibraryImport(Library, EntryPoint = "cuMemAlloc_v2")] public static partial int cuMemAlloc(ulong* pointer, nuint bytes);
    [LibraryImport(Library, EntryPoint = "cuMemFree_v2")] public static partial int cuMemFree(ulong pointer);
    [LibraryImport(Library, EntryPoint = "cuMemGetInfo_v2")] public static partial int cuMemGetInfo(nuint* free, nuint* total);
    [LibraryImport(Library, EntryPoint = "cuMemAllocHost_v2")] public static partial int cuMemAllocHost(void** pointer, nuint bytes);
    [LibraryImport(Library)] public static partial int cuMemFreeHost(void* pointer);
    [LibraryImport(Library, EntryPoint = "cuMemcpyHtoD_v2")] public static partial int cuMemcpyHtoD(ulong destination, void* source, nuint bytes);
    [LibraryImport(Library, EntryPoint = "cuMemcpyDtoH_v2")] public static partial int cuMemcpyDtoH(void* destination, ulong source, nuint bytes);
    [LibraryImport(Library, EntryPoint = "cuMemcpyDtoD_v2")] public static partial int cuMemcpyDtoD(ulong destination, ulong source, nuint bytes);
    [LibraryImport(Library, EntryPoint = "cuMemsetD8_v2")] public static partial int cuMemsetD8(ulong destination, byte value, nuint count);
    [LibraryImport(Library)] public static partial int cuModuleLoadData(nint* module, void* image);
    [LibraryImport(Library)] public static partial int cuModuleUnload(nint module);
    [LibraryImport(Library)] public static partial int cuModuleGetFunction(nint* function, nint module, byte* name);
    [LibraryImport(Library)] public static partial int cuFuncSetAttribute(nint function, int attribute, int value);
    [LibraryImport(Library)] public static partial int cuFuncGetAttribute(int* value, int attribute, nint function);
    [LibraryImport(Library)] public static partial int cuLaunchKernel(nint function, uint gridX, uint gridY, uint gridZ,
        uint blockX, uint blockY, uint blockZ, uint sharedBytes, nint stream, void** parameters, void** extra);
    [LibraryImport(Library)] public static partial int cuGetErrorName(int error, byte** name);
    [LibraryImport(Library)] public static partial int cuGetErrorString(int error, byte** text);

    public const int DeviceAttributeMultiprocessorCount = 16;
    public const int DeviceAttributeComputeCapabilityMajor = 75;
    public const int DeviceAttributeComputeCapabilityMinor = 76;
    public const int DeviceAttributeMaxSharedMemoryPerBlockOptin = 97;
    public const int DeviceAttributeMaxSharedMemoryPerMultiprocessor = 81;
    public const int FunctionAttributeNumRegisters = 4;
    public const int FunctionAttributeLocalSizeBytes = 3;
    public const int FunctionAttributeMaxDynamicSharedSizeBytes = 8;
    public const int ErrorOutOfMemory = 2;

    /// <summary>Throws <see cref="CudaException"/> with the driver's error name and text unless <paramref name="result"/> is CUDA_SUCCESS.</summary>
    public static void Check(int result, string call)
    {
        if (result != 0)
        {
            throw new CudaException(result, ErrorName(result), ErrorText(result), call);
        }
    }

    public static string ErrorName(int result)
    {
        byte* p = null;
        return cuGetErrorName(result, &p) == 0 && p != null ? Marshal.PtrToStringUTF8((nint)p) ?? "?" : $"CUDA error {result}";
    }

    public static string ErrorText(int result)
    {
        byte* p = null;
        return cuGetErrorString(result, &p) == 0 && p != null ? Marshal.PtrToStringUTF8((nint)p) ?? "" : "";
    }
}
