using System.Diagnostics;
using System.Reflection;
using System.Runtime.InteropServices;
using System.Security.Cryptography;
using System.Text;
using Attend.Cuda.Interop;

namespace Attend.Cuda;

/// <summary>The result of compiling one kernel source with one set of defines.</summary>
/// <param name="Image">PTX text (NUL-terminated) or a CUBIN.</param>
/// <param name="IsCubin">True for a CUBIN.</param>
/// <param name="CompileMilliseconds">Time NVRTC took; 0 when the image came from the disk cache.</param>
/// <param name="Log">The NVRTC log (warnings).</param>
public sealed record CompiledImage(byte[] Image, bool IsCubin, double CompileMilliseconds, string Log);

/// <summary>
/// Compiles the kernels embedded in this assembly (Kernels/*.cu) with NVRTC. Kernels include no CUDA headers
/// (built-ins and inline PTX only; their shared helpers, Kernels/*.cuh, are inlined by <see cref="Source"/>), so they
/// compile with any NVRTC ≥ 11.8. Images are cached on disk under
/// <c>~/.cache/attend/kernels</c> keyed by source hash, defines, architecture and NVRTC version.
/// </summary>
public static unsafe class KernelCompiler
{
    /// <summary>Names of the embedded kernel sources (e.g. "flash_fwd.cu"; the shared headers, *.cuh, are not listed).</summary>
    public static IReadOnlyList<string> Sources { get; } = typeof(KernelCompiler).Assembly.GetManifestResourceNames()
        .Where(n => n.StartsWith("Attend.Cuda.Kernels.", StringComparison.Ordinal) && n.EndsWith(".cu", StringComparison.Ordinal))
        .Select(n => n["Attend.Cuda.Kernels.".Length..]).Order(StringComparer.Ordinal).ToArray();

    /// <summary>
    /// The text of an embedded kernel source, its <c>#include "name.cuh"</c> lines replaced by the embedded headers'
    /// text (each header once; headers may include others). Inlined here rather than handed to NVRTC as headers, so
    /// the disk cache's key — a hash of this text — changes with any header the kernel uses.
    /// </summary>
    public static string Source(string name) => Inline(name, new HashSet<string>(StringComparer.Ordinal));

    private static string Inline(string name, HashSet<string> included)
    {
        using Stream? s = typeof(KernelCompiler).Assembly.GetManifestResourceStream("Attend.Cuda.Kernels." + name)
            ?? throw new ArgumentException($"no embedded kernel source '{name}'; have: {string.Join(", ", Sources)}", nameof(name));
        using var reader = new StreamReader(s);
        var text = new StringBuilder();
        while (reader.ReadLine() is { } line)
        {
            string trimmed = line.Trim();
            if (trimmed.StartsWith("#include \"", StringComparison.Ordinal) && trimmed.EndsWith('"'))
            {
                string header = trimmed["#include \"".Length..^1];
                if (included.Add(header)) text.Append(Inline(header, included));
                continue;
            }
            text.Append(line).Append('\n');
        }
        return text.ToString();
    }

    /// <summary>True when NVRTC can be loaded on this machine (no GPU needed).</summary>
    public static bool NvrtcAvailable
    {
        get
        {
            NativeLibraries.Register();
            return NativeLibraries.NvrtcError is null;
        }
    }

    /// <summary>Why NVRTC is unavailable, or null.</summary>
    public static string? NvrtcUnavailableReason
    {
        get
        {
            NativeLibraries.Register();
            return NativeLibraries.NvrtcError;
        }
    }

    /// <summary>NVRTC's version, e.g. (12, 8).</summary>
    public static (int Major, int Minor) NvrtcVersion
    {
        get
        {
            RequireNvrtc();
            int major, minor;
            Nvrtc.Check(Nvrtc.nvrtcVersion(&major, &minor), "nvrtcVersion");
            return (major, minor);
        }
    }

    /// <summary>
    /// Compiles <paramref name="sourceName"/> with <paramref name="defines"/> for <paramref name="architecture"/>:
    /// "sm_XY[a]" gives a CUBIN, "compute_XY" PTX. Uses the disk cache unless <paramref name="useDiskCache"/> is false.
    /// </summary>
    /// <exception cref="KernelCompilationException">with the NVRTC log when the source does not compile.</exception>
    public static CompiledImage Compile(string sourceName, IReadOnlyDictionary<string, string> defines, string architecture, bool useDiskCache = true) =>
        CompileSource(Source(sourceName), sourceName, defines, architecture, useDiskCache);

    /// <summary>Compiles generated CUDA source text (e.g. a kernel around a mask's <c>ToCuda()</c> expression).</summary>
    public static CompiledImage CompileSource(string source, string sourceName, IReadOnlyDictionary<string, string> defines, string architecture, bool useDiskCache = true)
    {
        ArgumentNullException.ThrowIfNull(source);
        ArgumentNullException.ThrowIfNull(defines);
        RequireNvrtc();
        bool cubin = architecture.StartsWith("sm_", StringComparison.Ordinal);
        var options = new List<string> { $"--gpu-architecture={architecture}", "--std=c++17", "-default-device" };
        options.AddRange(defines.OrderBy(d => d.Key, StringComparer.Ordinal).Select(d => $"-D{d.Key}={d.Value}"));
        (int major, int minor) = NvrtcVersion;
        string key = Convert.ToHexString(SHA256.HashData(Encoding.UTF8.GetBytes(
            $"{source}\n{string.Join(' ', options)}\nnvrtc {major}.{minor} {NativeLibraries.NvrtcName}")))[..32];
        string? cacheFile = useDiskCache ? CachePath(sourceName, key, cubin) : null;
        if (cacheFile is not null && File.Exists(cacheFile))
        {
            try
            {
                return new CompiledImage(File.ReadAllBytes(cacheFile), cubin, 0, "");
            }
            catch (IOException)
            {
                // A cache we cannot read is a cache miss.
            }
        }
        var sw = Stopwatch.StartNew();
        (byte[] image, string log) = CompileNow(source, sourceName, options, cubin);
        double ms = sw.Elapsed.TotalMilliseconds;
        if (cacheFile is not null)
        {
            try
            {
                Directory.CreateDirectory(Path.GetDirectoryName(cacheFile)!);
                string temp = cacheFile + "." + Environment.ProcessId + ".tmp";
                File.WriteAllBytes(temp, image);
                File.Move(temp, cacheFile, overwrite: true);
            }
            catch (IOException)
            {
            }
            catch (UnauthorizedAccessException)
            {
            }
        }
        return new CompiledImage(image, cubin, ms, log);
    }

    private static string? CachePath(string sourceName, string key, bool cubin)
    {
        string? root = Environment.GetEnvironmentVariable("ATTEND_CACHE_DIR");
        if (string.IsNullOrEmpty(root))
        {
            string home = Environment.GetFolderPath(Environment.SpecialFolder.UserProfile);
            if (string.IsNullOrEmpty(home)) return null;
            root = Path.Combine(home, ".cache", "attend");
        }
        return Path.Combine(root, "kernels", $"{Path.GetFileNameWithoutExtension(sourceName)}-{key}.{(cubin ? "cubin" : "ptx")}");
    }

    private static (byte[] Image, string Log) CompileNow(string source, string name, List<string> options, bool cubin)
    {
        nint program;
        byte[] src = Encoding.UTF8.GetBytes(source + "\0");
        byte[] nameBytes = Encoding.UTF8.GetBytes(name + "\0");
        fixed (byte* s = src)
        fixed (byte* n = nameBytes)
        {
            Nvrtc.Check(Nvrtc.nvrtcCreateProgram(&program, s, n, 0, null, null), "nvrtcCreateProgram");
        }
        try
        {
            var handles = options.Select(o => Marshal.StringToCoTaskMemUTF8(o)).ToArray();
            int result;
            try
            {
                fixed (nint* opts = handles)
                {
                    result = Nvrtc.nvrtcCompileProgram(program, handles.Length, (byte**)opts);
                }
            }
            finally
            {
                foreach (nint h in handles) Marshal.FreeCoTaskMem(h);
            }
            nuint logSize;
            Nvrtc.Check(Nvrtc.nvrtcGetProgramLogSize(program, &logSize), "nvrtcGetProgramLogSize");
            var logBytes = new byte[(int)logSize];
            fixed (byte* l = logBytes) Nvrtc.Check(Nvrtc.nvrtcGetProgramLog(program, l), "nvrtcGetProgramLog");
            string log = Encoding.UTF8.GetString(logBytes).TrimEnd('\0').Trim();
            if (result != 0)
            {
                string text = Marshal.PtrToStringUTF8((nint)Nvrtc.nvrtcGetErrorString(result)) ?? result.ToString();
                throw new KernelCompilationException($"NVRTC could not compile {name} ({string.Join(' ', options)}): {text}", log);
            }
            nuint size;
            byte[] image;
            if (cubin)
            {
                Nvrtc.Check(Nvrtc.nvrtcGetCUBINSize(program, &size), "nvrtcGetCUBINSize");
                image = new byte[(int)size];
                fixed (byte* p = image) Nvrtc.Check(Nvrtc.nvrtcGetCUBIN(program, p), "nvrtcGetCUBIN");
            }
            else
            {
                Nvrtc.Check(Nvrtc.nvrtcGetPTXSize(program, &size), "nvrtcGetPTXSize");
                image = new byte[(int)size];
                fixed (byte* p = image) Nvrtc.Check(Nvrtc.nvrtcGetPTX(program, p), "nvrtcGetPTX");
            }
            return (image, log);
        }
        finally
        {
            Nvrtc.nvrtcDestroyProgram(&program);
        }
    }

    private static void RequireNvrtc()
    {
        NativeLibraries.Register();
        if (NativeLibraries.NvrtcError is { } e)
        {
            throw new KernelCompilationException(e);
        }
    }
}
