using System.Globalization;

namespace Attend.Cli;

/// <summary>Memory one call of a benchmarked kernel used: managed bytes it allocated and growth of the peak resident set.</summary>
/// <param name="AllocatedBytes">Managed bytes allocated during the call, on every thread (GC.GetTotalAllocatedBytes).</param>
/// <param name="PeakResidentGrowthBytes">
/// Peak resident set during the call minus the resident set before it: managed and native working memory together
/// (Linux: the peak is reset through /proc/self/clear_refs first); null where the OS does not expose it.
/// </param>
internal readonly record struct MemoryUse(long AllocatedBytes, long? PeakResidentGrowthBytes);

/// <summary>Observes the memory of one call (run after the timed repetitions, so caches and pools are warm).</summary>
internal static class MemoryProbe
{
    public static MemoryUse Observe(Action action)
    {
        GC.Collect();
        GC.WaitForPendingFinalizers();
        bool peakReset = TryResetPeak();
        long? before = peakReset ? StatusKiB("VmRSS:") : null;
        long allocated = GC.GetTotalAllocatedBytes(precise: true);
        action();
        allocated = GC.GetTotalAllocatedBytes(precise: true) - allocated;
        long? peak = peakReset ? StatusKiB("VmHWM:") : null;
        long? growth = before is { } b && peak is { } p ? Math.Max(0, p - b) * 1024 : null;
        return new MemoryUse(allocated, growth);
    }

    /// <summary>Writing 5 to /proc/self/clear_refs resets the peak resident set (VmHWM) to the current one (Linux ≥ 4.0).</summary>
    private static bool TryResetPeak()
    {
        try
        {
            if (!OperatingSystem.IsLinux()) return false;
            File.WriteAllText("/proc/self/clear_refs", "5");
            return true;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return false;
        }
    }

    private static long? StatusKiB(string field)
    {
        foreach (string line in File.ReadLines("/proc/self/status"))
        {
            if (!line.StartsWith(field, StringComparison.Ordinal)) continue;
            string number = line[field.Length..].Trim().Split(' ')[0];
            return long.TryParse(number, NumberStyles.Integer, CultureInfo.InvariantCulture, out long kib) ? kib : null;
        }
        return null;
    }
}
