"""The command line as a user meets it: a missing optional part is one line that says what
to install, never a traceback."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path

import pytest

from esn.cli import build_parser, main
from esn.runtime import Throttle


@pytest.mark.parametrize(
    ("argv", "module", "hint"),
    [
        (
            ["console", "--broker", "mqtt://127.0.0.1:1", "--unit", "disp"],
            "textual",
            "pip install 'esn[console]'",
        ),
        (["loadtest", "ci-small"], "hdrh", "pip install 'esn[loadtest]'"),
        (
            [
                "server",
                "--broker",
                "mqtt://127.0.0.1:1",
                "--fleet",
                "FLEET",
                "--mqtt-client",
                "paho",
            ],
            "aiomqtt",
            "pip install 'esn[paho]'",
        ),
    ],
)
def test_a_missing_extra_is_a_one_line_hint(
    argv: list[str],
    module: str,
    hint: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('[[talkgroup]]\nid = "tg-1"\n')
    argv = [str(fleet) if a == "FLEET" else a for a in argv]
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and hint in err, err


def test_the_bench_runs_the_stacks_that_are_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    from esn.transport import available_clients

    assert available_clients() == ["gmqtt", "paho"]
    monkeypatch.setitem(sys.modules, "aiomqtt", None)  # a plain `pip install .`
    assert available_clients() == ["gmqtt"]


def test_a_repeated_log_line_is_held_back_and_counted() -> None:
    throttle = Throttle(burst=3, window_s=60)

    def record(at: float, msg: str = "publish on %s failed") -> logging.LogRecord:
        r = logging.LogRecord("esn.transport", logging.WARNING, "x", 1, msg, ("t",), None)
        r.created = at
        return r

    passed = [throttle.filter(record(t / 1000)) for t in range(10_000)]  # 10 s of a flood
    assert sum(passed) == 3
    assert throttle.filter(record(1, "another line"))  # others are not held back
    later = record(61.0)
    assert throttle.filter(later) and "9997 like it held back" in later.getMessage()


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--broker", "mqtt://127.0.0.1:1,mqtt://127.0.0.1:2"], "nodes of a --cluster"),
        (["--broker", "mqtt://127.0.0.1:1", "--server-id", "srv/#"], "--server-id 'srv/#'"),
        (["--broker", "mqtt://127.0.0.1:1", "--prefix", "esn/+"], "--prefix 'esn/+'"),
        (["--broker", "mqtt://127.0.0.1:1", "--prefix", "esn/"], "--prefix 'esn/'"),
    ],
)
def test_a_server_refuses_what_would_break_its_topics_in_one_line(
    extra: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('[[talkgroup]]\nid = "tg-1"\n')
    assert main(["server", "--fleet", str(fleet), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err, err


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--groups", "0"], "--groups: want a whole number of at least 1, got '0'"),
        (["--duration", "-5"], "--duration: want a number of seconds above 0, got '-5'"),
        (["--handsets", "5"], "at least two per talkgroup: 20 for 10 groups, got 5"),
    ],
)
def test_a_demo_refuses_what_it_cannot_run_in_one_line(
    extra: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: --groups 0 hung, --duration -5 ran, --handsets 5 quietly became 20."""
    code: int | str | None
    try:
        code = main(["demo", *extra])
    except SystemExit as exc:  # (argparse's own refusal, after the usage)
        code = exc.code
    assert code == 2
    assert says in capsys.readouterr().err.splitlines()[-1]


def test_every_command_and_option_says_what_it_is_and_its_default() -> None:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    described = {c.dest: c.help for c in commands._choices_actions}
    assert set(described) == set(commands.choices) and all(described.values())
    for name, sub in commands.choices.items():
        assert sub.description, name
        for action in sub._actions:
            where = f"esn {name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{where}: no help"
            d = action.default
            if not (d is None or d is False or d == [] or d is argparse.SUPPRESS):
                assert "default" in sub.formatter_class(name)._get_help_string(action), where


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["bench", "--seconds", "0"], "--seconds: want a number of seconds above 0, got '0'"),
        (["bench", "--listeners", "0"], "--listeners: want a whole number of at least 1"),
        (["bench", "--rate", "-1"], "--rate: want a whole number, 0 or more, got '-1'"),
        (["broker-config", "f", "--out", "d", "--port", "70000"], "want a TCP port"),
        (["demo", "--metrics-port", "x"], "--metrics-port: want a TCP port, 0 to 65535"),
        (["demo", "--cluster", "--fleet", "f.toml"], "--cluster starts its own brokers"),
        (["demo", "--fleet", "/no/such/fleet.toml"], "cannot read fleet file /no/such/fleet"),
        (["exercise", "/no/such.toml"], "cannot read exercise /no/such.toml"),
        (["console", "--broker", "mqtt://127.0.0.1:1", "--unit", "a b"], "--unit 'a b'"),
    ],
)
def test_a_bad_value_is_refused_in_one_line(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code: int | str | None
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert says in last, last


def test_a_taken_metrics_port_is_named_before_the_server_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('[[talkgroup]]\nid = "tg-1"\n')
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["server", "--broker", "mqtt://127.0.0.1:1", "--fleet", str(fleet)]
        assert main([*argv, "--metrics-port", str(port), "--state", ":memory:"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--metrics-port {port}: 127.0.0.1:{port} is taken" in err
