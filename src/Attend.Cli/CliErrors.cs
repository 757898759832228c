using System.CommandLine;

namespace Attend.Cli;

/// <summary>Bad input ends the program with exit code 2 and one line on stderr, never a stack trace.</summary>
internal static class CliErrors
{
    public const int BadInput = 2;

    public static int Invoke(RootCommand root, string[] args)
    {
        ParseResult parsed = root.Parse(args);
        if (parsed.Errors.Count > 0)
        {
            foreach (var e in parsed.Errors) Console.Error.WriteLine($"attend: {e.Message}");
            return BadInput;
        }
        try
        {
            return parsed.Invoke(new InvocationConfiguration { EnableDefaultExceptionHandler = false });
        }
        catch (Exception e) when (IsBadInput(e))
        {
            Console.Error.WriteLine($"attend: {OneLine(e.Message)}");
            return BadInput;
        }
    }

    private static bool IsBadInput(Exception e) =>
        e is ArgumentException or InvalidDataException or FileNotFoundException or DirectoryNotFoundException
            or KeyNotFoundException or NotSupportedException or UnauthorizedAccessException or EndOfStreamException or FormatException;

    private static string OneLine(string message) => message.ReplaceLineEndings(" ");
}
