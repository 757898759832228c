using System.Runtime.InteropServices;

namespace Attend.Cuda.Interop;

/// <summary>The NVRTC entry points (libnvrtc.so.*, the newest found) for compiling kernels at run time.</summary>
internal static unsafe partial class Nvrtc
{
    public const string Library = "nvrtc";

    [LibraryImport(Library)] public static partial int nvrtcVersion(int* major, int* minor);
    [LibraryImport(Library)] public static partial int nvrtcCreateProgram(nint* program, byte* source, byte* name, int headers, byte** headerSources, byte** headerNames);
    [LibraryImport(Library)] public static partial int nvrtcCompileProgram(nint program, int optionCount, byte** options);
    [LibraryImport(Library)] public static partial int nvrtcGetProgramLogSize(nint program, nuint* size);
    [LibraryImport(Library)] public static partial int nvrtcGetProgramLog(nint program, byte* log);
    [LibraryImport(Library)] public static partial int nvrtcGetPTXSize(nint program, nuint* size);
    [LibraryImport(Library)] public static partial int nvrtcGetPTX(nint program, byte* ptx);
    [LibraryImport(Library)] public static partial int nvrtcGetCUBINSize(nint program, nuint* size);
    [LibraryImport(Library)] public static partial int nvrtcGetCUBIN(nint program, byte* cubin);
    [LibraryImport(Library)] public static partial int nvrtcDestroyProgram(nint* program);
    [LibraryImport(Library)] public static partial byte* nvrtcGetErrorString(int result);

    public static void Check(int result, string call)
    {
        if (result != 0)
        {
            string text = Marshal.PtrToStringUTF8((nint)nvrtcGetErrorString(result)) ?? $"NVRTC error {result}";
            throw new KernelCompilationException($"{call} failed: {text}", log: "");
        }
    }
}
