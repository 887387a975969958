"""The command line as a user meets it: a missing optional part is one line that says what
to install, never a traceback."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from esn.cli import main


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
