namespace Attend.Cuda.Tests;

/// <summary>A fact that is skipped, with the reason, where no CUDA device is usable.</summary>
public sealed class CudaFactAttribute : FactAttribute
{
    public CudaFactAttribute()
    {
        if (!CudaBackend.IsAvailable) Skip = $"no CUDA: {CudaBackend.UnavailableReason}";
    }
}

/// <summary>A theory that is skipped, with the reason, where no CUDA device is usable.</summary>
public sealed class CudaTheoryAttribute : TheoryAttribute
{
    public CudaTheoryAttribute()
    {
        if (!CudaBackend.IsAvailable) Skip = $"no CUDA: {CudaBackend.UnavailableReason}";
    }
}
