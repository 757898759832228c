namespace Attend.Cuda;

/// <summary>A CUDA driver call failed; carries the driver's error name (e.g. CUDA_ERROR_OUT_OF_MEMORY) and text.</summary>
public sealed class CudaException : Exception
{
    /// <summary>Creates the exception for a failed driver call.</summary>
    public CudaException(int code, string name, string text, string call)
        : base($"{call} failed: {name}: {text}")
    {
        Code = code;
        ErrorName = name;
    }

    /// <summary>Creates an exception with a message only (no driver call).</summary>
    public CudaException(string message) : base(message) => ErrorName = "";

    /// <summary>Creates an exception with a message only.</summary>
    public CudaException() : this("CUDA error")
    {
    }

    /// <summary>Creates an exception wrapping another.</summary>
    public CudaException(string message, Exception inner) : base(message, inner) => ErrorName = "";

    /// <summary>The CUresult code.</summary>
    public int Code { get; }

    /// <summary>The driver's name of the error.</summary>
    public string ErrorName { get; }
}

/// <summary>NVRTC could not compile a kernel; <see cref="Log"/> holds the compiler's log.</summary>
public sealed class KernelCompilationException : Exception
{
    /// <summary>Creates the exception with the compiler log.</summary>
    public KernelCompilationException(string message, string log) : base(string.IsNullOrEmpty(log) ? message : $"{message}\n{log}") => Log = log;

    /// <summary>Creates the exception.</summary>
    public KernelCompilationException() : this("kernel compilation failed", "")
    {
    }

    /// <summary>Creates the exception.</summary>
    public KernelCompilationException(string message) : this(message, "")
    {
    }

    /// <summary>Creates the exception.</summary>
    public KernelCompilationException(string message, Exception inner) : base(message, inner) => Log = "";

    /// <summary>The NVRTC program log.</summary>
    public string Log { get; }
}
