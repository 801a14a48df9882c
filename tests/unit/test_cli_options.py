"""The global options (``--config``, ``--log-level``, ``--log-json``) before or after
the command: ``dicomnode serve --config node.yaml`` is what people type."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dicomnode.cli import build_parser, main


@pytest.mark.parametrize("argv", [
    ["serve", "--config", "node.yaml"],
    ["--config", "node.yaml", "serve"],
    ["serve", "-c", "node.yaml"],
    ["-c", "other.yaml", "serve", "--config", "node.yaml"],  # given twice: the later wins
    ["serve", "--no-worker", "--config", "node.yaml"],
])
def test_config_before_or_after_the_command(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert args.command == "serve" and args.config == "node.yaml"
    assert args.log_level is None and args.log_json is False


def test_all_global_options_at_every_level_of_subcommands() -> None:
    p = build_parser()
    args = p.parse_args(["jobs", "list", "--log-level", "DEBUG", "--log-json", "-c", "a.yaml"])
    assert (args.config, args.log_level, args.log_json) == ("a.yaml", "DEBUG", True)
    args = p.parse_args(["--log-level", "DEBUG", "jobs", "--config", "b.yaml", "list"])
    assert (args.config, args.log_level, args.log_json) == ("b.yaml", "DEBUG", False)
    args = p.parse_args(["worker", "--once"])
    assert (args.config, args.log_level, args.log_json) == (None, None, False)
    for name in ("serve", "worker", "send", "studies", "db", "models", "jobs", "routes", "demo"):
        help_text = _command_help(p, name)
        assert "--config" in help_text and "--log-level" in help_text, name


def _command_help(parser: object, name: str) -> str:
    """The ``--help`` text of one command (formatted, not printed)."""
    import argparse

    assert isinstance(parser, argparse.ArgumentParser)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name].format_help()


def test_an_unknown_option_is_still_a_clean_argparse_error(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--config", "node.yaml", "--bogus"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --bogus" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--config"])  # the option's value is missing
    assert exc.value.code == 2
    assert "expected one argument" in capsys.readouterr().err


def test_routes_check_reads_the_config_given_after_the_command(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({
        "models": {"path": str(tmp_path / "no-models")},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                          "port": 4242}],
        "routes": [{"name": "forward-all", "default": True, "forward": ["pacs"]}],
    }))
    outputs = []
    for argv in (["routes", "check", "--config", str(cfg)],
                 ["--config", str(cfg), "routes", "check"]):
        assert main(argv) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and "forward-all" in outputs[0]


@pytest.mark.parametrize("before", [True, False])
def test_serve_as_a_user_types_it(tmp_path: Path, before: bool) -> None:
    """A real ``python -m dicomnode``: both orders read the file (here: it is missing,
    and the one-line error names it)."""
    missing = tmp_path / "missing.yaml"
    opts = ["--config", str(missing)]
    argv = [*opts, "serve"] if before else ["serve", *opts]
    r = subprocess.run([sys.executable, "-m", "dicomnode", *argv], capture_output=True,
                       text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"dicomnode: error: config file {missing}: not found"
