using System.Diagnostics;
using System.Reflection;
using Xunit.Sdk;

namespace Attend.Cuda.Tests;

/// <summary>
/// A minimal xunit-attribute runner for machines without the .NET SDK (the GPU machine): runs every [Fact] and
/// [Theory] (InlineData/MemberData) in this assembly, honours Skip, prints one line per failure and the closing
/// "N passed, N failed, N skipped". <c>dotnet test</c> does not use it. Optional argument: a name filter.
/// </summary>
public static class Program
{
    public static int Main(string[] args)
    {
        string? filter = args.Length > 0 ? args[0] : null;
        int passed = 0, failed = 0, skipped = 0;
        var total = Stopwatch.StartNew();
        foreach (Type type in typeof(Program).Assembly.GetTypes().Where(t => t.IsClass && !t.IsAbstract).OrderBy(t => t.Name, StringComparer.Ordinal))
        {
            foreach (MethodInfo method in type.GetMethods(BindingFlags.Public | BindingFlags.Instance))
            {
                FactAttribute? fact = method.GetCustomAttribute<FactAttribute>();
                if (fact is null) continue;
                string name = $"{type.Name}.{method.Name}";
                if (filter is not null && !name.Contains(filter, StringComparison.OrdinalIgnoreCase)) continue;
                if (fact.Skip is not null)
                {
                    skipped++;
                    Console.WriteLine($"SKIP {name}: {fact.Skip}");
                    continue;
                }
                IEnumerable<object?[]> cases = fact is TheoryAttribute
                    ? method.GetCustomAttributes<DataAttribute>().SelectMany(d => d.GetData(method))
                    : [[]];
                foreach (object?[] arguments in cases)
                {
                    string label = arguments.Length == 0 ? name : $"{name}({string.Join(", ", arguments)})";
                    var sw = Stopwatch.StartNew();
                    try
                    {
                        object? instance = Activator.CreateInstance(type);
                        try
                        {
                            method.Invoke(instance, arguments);
                        }
                        finally
                        {
                            (instance as IDisposable)?.Dispose();
                        }
                        passed++;
                        Console.WriteLine($"PASS {label} ({sw.Elapsed.TotalMilliseconds:F0} ms)");
                    }
                    catch (TargetInvocationException e)
                    {
                        failed++;
                        Console.WriteLine($"FAIL {label}: {e.InnerException?.GetType().Name}: {e.InnerException?.Message}");
                    }
                }
            }
        }
        Console.WriteLine($"({total.Elapsed.TotalSeconds:F1} s)");
        Console.WriteLine($"{passed} passed, {failed} failed, {skipped} skipped");
        return failed == 0 ? 0 : 1;
    }
}
