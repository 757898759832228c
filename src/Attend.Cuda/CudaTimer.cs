using Attend.Cuda.Interop;

namespace Attend.Cuda;

/// <summary>Times device work with CUDA events (MEASURING.md: GPU timings only from events).</summary>
public static unsafe class CudaTimer
{
    /// <summary>Runs <paramref name="launch"/> <paramref name="warmup"/> times, then <paramref name="reps"/> times between event pairs; sorted milliseconds.</summary>
    public static List<double> Measure(Action launch, int reps = 20, int warmup = 3)
    {
        ArgumentNullException.ThrowIfNull(launch);
        CudaDevice device = CudaBackend.Device;
        device.MakeCurrent();
        for (int i = 0; i < warmup; i++) launch();
        var starts = new nint[reps];
        var ends = new nint[reps];
        try
        {
            for (int i = 0; i < reps; i++)
            {
                nint s, e;
                Driver.Check(Driver.cuEventCreate(&s, 0), "cuEventCreate");
                starts[i] = s;
                Driver.Check(Driver.cuEventCreate(&e, 0), "cuEventCreate");
                ends[i] = e;
            }
            for (int i = 0; i < reps; i++)
            {
                Driver.Check(Driver.cuEventRecord(starts[i], 0), "cuEventRecord");
                launch();
                Driver.Check(Driver.cuEventRecord(ends[i], 0), "cuEventRecord");
            }
            Driver.Check(Driver.cuEventSynchronize(ends[reps - 1]), "cuEventSynchronize");
            var times = new List<double>(reps);
            for (int i = 0; i < reps; i++)
            {
                float ms;
                Driver.Check(Driver.cuEventElapsedTime(&ms, starts[i], ends[i]), "cuEventElapsedTime");
                times.Add(ms);
            }
            times.Sort();
            return times;
        }
        finally
        {
            foreach (nint e in starts) if (e != 0) Driver.cuEventDestroy(e);
            foreach (nint e in ends) if (e != 0) Driver.cuEventDestroy(e);
        }
    }
}
