using System.CommandLine;
using Attend.Cli;

RootCommand root = new("attend — efficient attention on CPU and GPU: run, verify and benchmark kernels")
{
    RunCommand.Create(),
    VerifyCommand.Create(),
    BenchCommand.Create(),
    MaskCommand.Create(),
    GenCommand.Create(),
    LmCommand.Create(),
    Report.Create(),
};
return CliErrors.Invoke(root, args);
