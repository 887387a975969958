"""The fleet file: defaults, per-group overrides, and one-line errors for bad files."""

from __future__ import annotations

from pathlib import Path

import pytest

from esn.core.fleet import FleetError, parse_fleet
from esn.protocol.codec import MAX_PAYLOAD
from esn.tomlfile import dump_fleet, load_fleet
from esn.tools.secure import MAX_PACKET


def test_defaults_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text("""
[defaults]
max_talk_ms = 20000
unit_priority = 90
[[talkgroup]]
id = "tg-1"
name = "North"
hang_ms = 500
[[talkgroup]]
id = "tg-2"
members = ["a"]
broadcast = true
[[unit]]
id = "disp"
role = "dispatcher"
priority = 250
""")
    fleet = load_fleet(path)
    g1, g2 = fleet.groups["tg-1"], fleet.groups["tg-2"]
    assert (g1.name, g1.policy.max_talk_ms, g1.policy.hang_ms) == ("North", 20000, 500)
    assert (g2.policy.hang_ms, g2.broadcast, g2.admits("a"), g2.admits("b")) == (
        4000,
        True,
        True,
        False,
    )
    assert fleet.profile("disp").is_dispatcher  # type: ignore[union-attr]
    assert fleet.profile("stranger").priority == 90  # type: ignore[union-attr]


def test_closed_registration_knows_only_listed_units() -> None:
    fleet = parse_fleet({"defaults": {"open_registration": False}, "unit": [{"id": "a"}]})
    assert fleet.profile("a") is not None and fleet.profile("b") is None


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"defaults": {"max_talk_ms": "long"}}, "defaults.max_talk_ms: must be int"),
        ({"defaults": {"queue_depth": 0}}, "defaults.queue_depth: must be at least 1"),
        ({"defaults": {"colour": 1}}, "defaults: unknown key 'colour'"),
        ({"talkgroup": [{"id": "bad id"}]}, "talkgroup[0].id: must be an id"),
        ({"talkgroup": [{"id": "a"}, {"id": "a"}]}, "talkgroup[1].id: 'a' is defined twice"),
        ({"talkgroup": [{"id": "a", "members": ["x y"]}]}, "members must be unit ids"),
        ({"unit": [{"id": "u", "role": "king"}]}, "role must be 'handset' or 'dispatcher'"),
        ({"unit": [{"id": "u", "priority": 300}]}, "unit[0].priority: must be within 0..255"),
        ({"units": []}, "unknown top-level key 'units'"),
    ],
)
def test_bad_files_are_refused_with_the_key_named(doc: dict[str, object], message: str) -> None:
    with pytest.raises(FleetError) as err:
        parse_fleet(doc)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(FleetError, match="cannot read fleet file"):
        load_fleet(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[talkgroup]\n")
    with pytest.raises(FleetError, match="not valid TOML"):
        load_fleet(bad)


def test_a_written_fleet_reads_back_as_the_same_fleet(tmp_path: Path) -> None:
    doc = {
        "defaults": {"max_talk_ms": 20000, "queue": False, "open_registration": False},
        "limits": {"floor": {"per_s": 2.5, "burst": 10}},
        "talkgroup": [
            {"id": "tg-1", "name": 'Quote " and \\ backslash', "members": ["u1", "disp"]},
            {"id": "tg-all", "broadcast": True, "hang_ms": 0},
        ],
        "unit": [{"id": "disp", "role": "dispatcher", "priority": 250}, {"id": "u1"}],
    }
    path = tmp_path / "fleet.toml"
    path.write_text(dump_fleet(doc))
    assert load_fleet(path) == parse_fleet(doc)


def test_both_broker_profiles_cap_packets_alike_and_above_what_the_codec_accepts() -> None:
    conf = Path(__file__).resolve().parent.parent / "broker_config" / "mosquitto.conf"
    local = next(
        int(line.split()[1])
        for line in conf.read_text().splitlines()
        if line.startswith("max_packet_size")
    )
    assert local == MAX_PACKET > MAX_PAYLOAD
