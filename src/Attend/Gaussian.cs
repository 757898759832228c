namespace Attend;

/// <summary>Standard normal samples (Box–Muller), for the seeded random projections and generators.</summary>
internal static class Gaussian
{
    public static double Next(Random rng) => Math.Sqrt(-2 * Math.Log(1 - rng.NextDouble())) * Math.Cos(2 * Math.PI * rng.NextDouble());
}
