"""The command line's shape: every subcommand present, honest help, one name per flag."""

from __future__ import annotations

import json
import re

import pytest

from easgd.cli import _SUBCOMMANDS, build_parser, main
from easgd.cli.train import DEFAULT_EPOCHS, config_from_args

pytestmark = pytest.mark.timeout(60)


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _option_help(text: str, flag: str) -> str:
    """The help of ``flag`` in ``text``, its wrapped lines joined."""
    match = re.search(rf"^  {re.escape(flag)}\b(.*?)(?=^  -|\Z)", text, re.M | re.S)
    assert match, f"{flag} is not in the help"
    return " ".join(match.group(1).split())


def test_every_subcommand_is_registered() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert list(sub.choices or ()) == list(_SUBCOMMANDS)


def test_train_help_shows_each_default_once_and_the_true_one(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    text = _help(["train"], capsys)
    epochs = _option_help(text, "--epochs")
    assert epochs.count("default") == 1 and f"(default: {DEFAULT_EPOCHS:g} when" in epochs
    out = _option_help(text, "--out")
    assert out.count("default") == 1 and "runs/<method>-<date>-<time>" in out
    assert "(default: None)" not in text
    assert "(default: 4)" in _option_help(text, "--workers")
    assert "(default: 6)" not in text
    args = build_parser().parse_args(["train"])
    assert config_from_args(args).epochs == DEFAULT_EPOCHS == 60


def test_simulate_help_has_no_none_defaults(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    text = _help(["simulate"], capsys)
    assert "(default: None)" not in text
    assert "--workers P, --p P" in text


@pytest.mark.parametrize("flag", ["--workers", "--p"])
def test_simulate_takes_workers_and_its_alias_p(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["simulate", "--method", "easgd", "--schedule", "sync", flag, "3", "--tau", "1",
            "--lr", "0.1", "--steps", "5", "--json"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["p"] == 3


@pytest.mark.parametrize("flag", ["--workers", "--p"])
def test_stability_takes_workers_and_its_alias_p(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["stability", "--map", "easgd-sync", flag, "4", "--eta", "0.1", "--alpha", "0.225"]
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["p"] == 4


def test_train_takes_workers() -> None:
    args = build_parser().parse_args(["train", "--workers", "3", "--steps", "5"])
    assert config_from_args(args).workers == 3
