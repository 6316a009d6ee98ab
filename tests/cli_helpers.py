"""Helpers shared by the CLI tests: run the command line in-process, and read its one error line."""

from staticprune.cli import main


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of `staticprune ARGV`."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    """The single error line of stderr (progress lines `[staticprune] ...` aside)."""
    lines = [line for line in err.splitlines() if not line.startswith("[staticprune]")]
    assert len(lines) == 1, err
    assert "error" in lines[0]
    return lines[0]
