using System.Reflection;
using System.Runtime.InteropServices;

namespace Attend.Cuda.Interop;

/// <summary>
/// Finds libcuda and the newest libnvrtc at first use and resolves the [LibraryImport] names "cuda" and "nvrtc" to
/// them. Nothing else in Attend loads native libraries.
/// </summary>
internal static class NativeLibraries
{
    private static readonly object Gate = new();
    private static bool _registered;
    private static nint _cuda;
    private static nint _nvrtc;

    /// <summary>The loaded NVRTC file name, for reports and cache keys.</summary>
    public static string? NvrtcName { get; private set; }

    /// <summary>Why the driver could not be loaded, or null when it was.</summary>
    public static string? CudaError { get; private set; }

    /// <summary>Why NVRTC could not be loaded, or null when it was.</summary>
    public static string? NvrtcError { get; private set; }

    public static void Register()
    {
        lock (Gate)
        {
            if (_registered) return;
            _registered = true;
            if (!NativeLibrary.TryLoad("libcuda.so.1", out _cuda) && !NativeLibrary.TryLoad("libcuda.so", out _cuda) && !NativeLibrary.TryLoad("nvcuda.dll", out _cuda))
            {
                CudaError = "the CUDA driver (libcuda.so.1) was not found: no NVIDIA driver on this machine";
            }
            foreach (string name in NvrtcCandidates())
            {
                if (NativeLibrary.TryLoad(name, out _nvrtc))
                {
                    NvrtcName = Path.GetFileName(name);
                    break;
                }
            }
            if (_nvrtc == 0)
            {
                NvrtcError = "NVRTC (libnvrtc.so.*) was not found: install the CUDA toolkit's NVRTC (Debian: libnvrtc11.2 from non-free)";
            }
            NativeLibrary.SetDllImportResolver(typeof(NativeLibraries).Assembly, Resolve);
        }
    }

    private static nint Resolve(string name, Assembly assembly, DllImportSearchPath? path) => name switch
    {
        Driver.Library => _cuda,
        Nvrtc.Library => _nvrtc,
        _ => 0,
    };

    /// <summary>Newest first: versioned sonames on the loader path, then the usual toolkit folders.</summary>
    private static IEnumerable<string> NvrtcCandidates()
    {
        string[] versions = ["13", "12", "11.2", "11.1", "11.0"];
        foreach (string v in versions) yield return $"libnvrtc.so.{v}";
        var folders = new List<string> { "/usr/local/cuda/lib64", "/usr/lib/x86_64-linux-gnu" };
        if (Environment.GetEnvironmentVariable("CUDA_HOME") is { Length: > 0 } home) folders.Insert(0, Path.Combine(home, "lib64"));
        try
        {
            folders.AddRange(Directory.GetDirectories("/usr/local", "cuda-*").OrderDescending().Select(d => Path.Combine(d, "lib64")));
        }
        catch (IOException)
        {
        }
        catch (UnauthorizedAccessException)
        {
        }
        foreach (string folder in folders)
        {
            if (!Directory.Exists(folder)) continue;
            foreach (string file in Directory.GetFiles(folder, "libnvrtc.so.*").Where(f => !f.Contains("builtins", StringComparison.Ordinal) && !f.Contains(".alt.", StringComparison.Ordinal)).OrderByDescending(f => f.Length).ThenByDescending(f => f, StringComparer.Ordinal))
            {
                yield return file;
            }
        }
        yield return "libnvrtc.so";
    }
}
