"""The `esn` command line: the push-to-talk server of the ESN simulator and everything
around it: a demo, load tests, training exercises, the dispatcher console, the recorder,
the secure broker profile, a NATS cluster and the benchmarks."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import socket
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path

from esn import __version__
from esn.core.fleet import FleetError
from esn.extras import MissingExtra, need
from esn.protocol.ids import is_id
from esn.runtime import STOP_SIGNALS, Interrupted, Throttle, run
from esn.tomlfile import load_fleet, read_toml
from esn.tools.nats import ClusterError as NatsStartError
from esn.tools.processes import ServerStartError
from esn.tools.secure import SecureConfigError
from esn.transport import CLIENTS, BrokerConfig, TransportError


class CliError(Exception):
    """Bad command-line input; the message is the one line to print."""


def _broker(args: argparse.Namespace, url: str | None = None) -> BrokerConfig:
    username = args.username or os.environ.get("ESN_MQTT_USERNAME")
    password = args.password or os.environ.get("ESN_MQTT_PASSWORD")
    if args.credentials:  # (the secure profile's generated passwords, e.g. from the demo)
        username = username or getattr(args, "unit", None)
        password = password or _password_in(args.credentials, username)
    try:
        return BrokerConfig.from_url(
            url or args.broker, username=username, password=password, ca_file=args.ca_file
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _password_in(path: str, user: str | None) -> str:
    doc = read_toml(path, "credentials file", CliError)
    password = doc.get("passwords", {}).get(user) if user else None
    if not isinstance(password, str):
        raise CliError(f"--credentials {path}: no password for {user or 'the --username'}")
    return password


def _add_broker_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--broker", required=required, metavar="URL", help="mqtt://HOST:PORT or mqtts://HOST:PORT"
    )
    p.add_argument("--username", help="MQTT username (or ESN_MQTT_USERNAME)")
    p.add_argument("--password", help="MQTT password (or ESN_MQTT_PASSWORD)")
    p.add_argument("--ca-file", help="CA certificate for mqtts://")
    p.add_argument(
        "--credentials",
        metavar="FILE",
        help="a secure profile's credentials.toml: the password of --username (or --unit)",
    )
    p.add_argument(
        "--mqtt-client",
        choices=CLIENTS,
        default="gmqtt",
        help="MQTT client library (default gmqtt; paho is the aiomqtt/paho stack)",
    )


def _above_zero(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"want a number of seconds above 0, got {text!r}")
    return value


def _whole(lo: float, hi: float, want: str) -> Callable[[str], int]:
    """An argparse type: a whole number from `lo` to `hi`, else "want WANT" in one line."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"want {want}, got {text!r}")
        return value

    return parse


_at_least_one = _whole(1, math.inf, "a whole number of at least 1")
_at_least_zero = _whole(0, math.inf, "a whole number, 0 or more")
_port = _whole(0, 65535, "a TCP port, 0 to 65535")


def _sizes(text: str) -> list[int]:
    """`--sizes`: numbers of handsets, comma-separated, each at least 2."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 2:
        raise argparse.ArgumentTypeError(f"want numbers of handsets like 1000,2000, got {text!r}")
    return sizes


def _check_prefix(prefix: str) -> None:
    if not all(is_id(level) for level in prefix.split("/")):
        raise CliError(f"--prefix {prefix!r}: levels of letters, digits, '_', '.' and '-'")


def _port_free(port: int, option: str) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as the server binds)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise CliError(
                f"{option} {port}: 127.0.0.1:{port} is taken ({exc.strerror or exc}); "
                "choose another, or 0 for any free port"
            ) from None


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    return stop


def default_state(server_id: str) -> str:
    home = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(home, "esn", f"{server_id}.sqlite3")


def cmd_server(args: argparse.Namespace) -> int:
    from esn.server.cluster import ClusterError
    from esn.server.shell import Config, DuplicateServerError, serve
    from esn.store import StoreError

    if args.cluster and args.state not in (None, ":memory:"):
        print(
            "esn server: --state is for one server: a cluster keeps its state in NATS",
            file=sys.stderr,
        )
        return 2
    fleet = load_fleet(args.fleet)
    cluster = tuple(url for url in (args.cluster or "").split(",") if url)
    brokers = [_broker(args, url) for url in args.broker.split(",") if url] or [_broker(args)]
    if len(brokers) > 1 and not cluster:
        raise CliError("several --broker URLs are the nodes of a --cluster, and need one")
    if not is_id(args.server_id):
        raise CliError(f"--server-id {args.server_id!r}: letters, digits, '_', '.' and '-' only")
    _check_prefix(args.prefix)
    if cluster and "." in args.prefix:
        raise CliError(f"--prefix {args.prefix!r}: no '.' in a cluster (it names NATS buckets)")
    if args.metrics_port:  # (taken: said now, before the server touches the broker)
        _port_free(args.metrics_port, "--metrics-port")
    config = Config(
        broker=brokers[0],
        others=tuple(brokers[1:]),
        server_id=args.server_id,
        prefix=args.prefix,
        metrics_port=args.metrics_port,
        mqtt_client=args.mqtt_client,
        state=":memory:" if cluster else args.state or default_state(args.server_id),
        cluster=cluster,
    )

    async def main() -> None:
        await serve(config, fleet, _stop_on_signals())

    try:
        run(main())
    except (DuplicateServerError, StoreError, ClusterError) as exc:
        print(f"esn server: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from esn.tools.nats import ClusterError, NatsCluster

    async def main() -> None:
        stop = _stop_on_signals()
        cluster = NatsCluster(args.nodes)
        try:
            await asyncio.to_thread(cluster.start)
            print(f"NATS cluster of {args.nodes} nodes on 127.0.0.1, JetStream and MQTT on each")
            for node in cluster.nodes:
                print(f"  {node.name}: MQTT {node.mqtt_url}  NATS {node.nats_url}")
            print("Ctrl-C stops it (its folders are removed)", flush=True)
            await stop.wait()
        finally:
            cluster.close()

    try:
        run(main())
    except ClusterError as exc:
        print(f"esn cluster: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from esn.tools.demo import DemoError, DemoOptions, demo_fleet, run_demo

    if args.cluster and (args.broker or args.secure or args.fleet):
        raise CliError("--cluster starts its own brokers and fleet: no --broker, --secure, --fleet")
    groups = args.groups
    if args.fleet:
        try:
            groups = len(demo_fleet(args.fleet)[1])
        except DemoError as exc:
            raise CliError(str(exc)) from None
    if args.handsets < 2 * groups:
        raise CliError(
            f"--handsets must be at least two per talkgroup: "
            f"{2 * groups} for {groups} groups, got {args.handsets}"
        )
    opts = DemoOptions(
        duration=args.duration,
        handsets=args.handsets,
        groups=args.groups,
        mqtt_client=args.mqtt_client,
        metrics_port=args.metrics_port,
        seed=args.seed,
        broker_url=args.broker,
        monitoring=args.monitoring,
        secure=args.secure,
        trace=args.trace,
        trace_dir=args.trace_dir,
        fleet=args.fleet,
    )
    if args.cluster:
        from esn.tools.cluster_demo import run_cluster_demo

        return run(run_cluster_demo(opts))
    return run(run_demo(opts))


def cmd_loadtest(args: argparse.Namespace) -> int:
    need("hdrh", "loadtest", "esn loadtest")
    need("matplotlib", "loadtest", "esn loadtest")
    from esn.loadtest.runner import run_loadtest
    from esn.loadtest.scenario import ScenarioError, load_scenario

    try:
        overrides = [*args.set, *(["run.profile=true"] if args.profile else [])]
        scenario = load_scenario(args.scenario, overrides)
        if args.sizes:
            from esn.loadtest.capacity import run_sizes, sized

            for n in args.sizes:
                sized(scenario, n)  # (refused before anything starts)
            out = Path(
                args.out or f"runs/{scenario.run.name}-capacity-{time.strftime('%Y%m%d-%H%M%S')}"
            )
            return run(run_sizes(scenario, args.sizes, out))
    except ScenarioError as exc:
        raise CliError(str(exc)) from None
    return run(run_loadtest(scenario, Path(args.out) if args.out else None))


def cmd_exercise(args: argparse.Namespace) -> int:
    from esn.exercise.run import run_exercise
    from esn.exercise.script import ExerciseError, load_exercise

    try:
        exercise = load_exercise(args.exercise)
    except ExerciseError as exc:
        raise CliError(str(exc)) from None
    if args.broker is not None:
        try:
            BrokerConfig.from_url(args.broker)  # (a bad URL is refused here, in one line)
        except ValueError as exc:
            raise CliError(str(exc)) from None
    _check_prefix(args.prefix)

    async def main() -> int:
        # (a signal ends the play, not the clean-up: the handlers stay until the loop ends)
        return await run_exercise(
            exercise,
            broker_url=args.broker,
            out=Path(args.out) if args.out else None,
            wait_for_trainee=not args.start_now,
            mqtt_client=args.mqtt_client,
            stop=_stop_on_signals(),
            prefix=args.prefix,
        )

    return run(main(), stoppable=False)  # (it stops itself, and still gives the debrief)


def cmd_record(args: argparse.Namespace) -> int:
    from esn.client.recorder import Recorder
    from esn.store import StoreError

    if not (0 < args.keep_days <= 36500 and 0 < args.keep_mb <= 1e9):
        raise CliError("--keep-days must be within 0..36500 and --keep-mb within 0..1e9")

    async def main() -> None:
        recorder = Recorder(
            _broker(args),
            args.db,
            unit=args.unit,
            prefix=args.prefix,
            mqtt_client=args.mqtt_client,
            keep_days=args.keep_days,
            keep_mb=args.keep_mb,
        )
        stop = _stop_on_signals()
        await recorder.start()
        print(f"esn record: recording every talkgroup of {args.broker} into {args.db}", flush=True)
        try:
            await stop.wait()
        finally:
            await recorder.stop()
            print(f"esn record: {recorder.bursts} talk bursts, {recorder.packets} packets kept")

    try:
        run(main())
    except (StoreError, sqlite3.Error) as exc:
        print(f"esn record: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    need("textual", "console", "esn console")
    from esn.console.app import ConsoleApp

    if not is_id(args.unit):
        raise CliError(f"--unit {args.unit!r}: letters, digits, '_', '.' and '-' only")
    names = None
    if args.fleet:
        names = {tg: g.name or tg for tg, g in load_fleet(args.fleet).groups.items()}
    ConsoleApp(
        _broker(args),
        args.unit,
        prefix=args.prefix,
        mqtt_client=args.mqtt_client,
        all_call=args.all_call,
        recordings=args.recordings,
        names=names,
    ).run()
    return 0


def cmd_broker_config(args: argparse.Namespace) -> int:
    from esn.tools.processes import free_port
    from esn.tools.secure import generate

    fleet = load_fleet(args.fleet)
    profile = generate(
        fleet,
        Path(args.out),
        port=args.port or free_port(),
        tls_port=args.tls_port or free_port(),
        server_id=args.server_id,
        extra_users=tuple(args.user),
        prefix=args.prefix,
    )
    print(
        f"wrote {profile.folder}: mosquitto.conf (listeners 127.0.0.1:{profile.port} and "
        f"TLS 127.0.0.1:{profile.tls_port}), passwd, acl, credentials.toml, ca.crt"
    )
    print(f"run: mosquitto -c {profile.conf}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from esn.tools.bench import BenchOptions, run_bench

    if args.floods:
        from esn.tools.floods import FloodOptions, run_floods

        return run(
            run_floods(FloodOptions(seconds=args.seconds, out=args.out or "docs/floods.json"))
        )

    return run(
        run_bench(
            BenchOptions(
                seconds=args.seconds,
                rate=args.rate,
                out=args.out or "docs/benchmarks.json",
                listeners=args.listeners,
            )
        )
    )


class _Help(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, unless it says it already."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default == [] or "default" in text:
            return text
        return f"{text} (default %(default)s)"


EPILOG = """first steps:
  ./run demo                          a complete simulation, ending in a KPI table
  ./run esn exercise officer-down     a training exercise; it prints the console to start
  esn COMMAND --help                  what each command takes"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esn", description=__doc__, epilog=EPILOG, formatter_class=_Help
    )
    parser.add_argument("--version", action="version", version=f"esn {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    class Sub:  # (each command described in `esn --help` and atop its own --help)
        @staticmethod
        def add_parser(name: str, help: str) -> argparse.ArgumentParser:
            return commands.add_parser(
                name, help=help, description=help[0].upper() + help[1:] + ".", formatter_class=_Help
            )

    sub = Sub()

    p = sub.add_parser("server", help="run the group-communication server")
    _add_broker_args(p)
    p.add_argument(
        "--fleet", required=True, metavar="FLEET.toml", help="fleet file (examples/fleet.toml)"
    )
    p.add_argument(
        "--metrics-port",
        type=_port,
        metavar="N",
        help="serve Prometheus metrics on http://127.0.0.1:N/metrics (0: any free port, "
        "said at start; default: no metrics)",
    )
    p.add_argument("--server-id", default="esn-1", help="server id (MQTT client id)")
    p.add_argument("--prefix", default="esn", help="topic prefix (default esn)")
    p.add_argument(
        "--state",
        metavar="FILE",
        help="the SQLite file that keeps what units were told across restarts (default "
        "$XDG_STATE_HOME/esn/SERVER-ID.sqlite3, i.e. ~/.local/state/esn/...; ':memory:' "
        "keeps nothing)",
    )
    p.add_argument(
        "--cluster",
        metavar="nats://H:P[,...]",
        help="share the groups with the other servers of a NATS cluster (each with its own "
        "--server-id; --broker is then any node's MQTT port, or several, comma-separated, "
        "tried in turn when the link is lost): see docs/scaling.md",
    )
    p.set_defaults(func=cmd_server)

    p = sub.add_parser("demo", help="a complete simulation on an embedded Mosquitto")
    p.add_argument(
        "--duration",
        type=_above_zero,
        default=30.0,
        metavar="SECONDS",
        help="how long the traffic runs (default %(default)g)",
    )
    p.add_argument(
        "--handsets",
        type=_at_least_one,
        default=200,
        metavar="N",
        help="simulated handsets, at least two per talkgroup (default %(default)s)",
    )
    p.add_argument(
        "--groups",
        type=_at_least_one,
        default=10,
        metavar="N",
        help="talkgroups (default %(default)s)",
    )
    p.add_argument(
        "--mqtt-client",
        choices=CLIENTS,
        default="gmqtt",
        help="the MQTT stack of the server and handsets (default %(default)s)",
    )
    p.add_argument(
        "--metrics-port",
        type=_port,
        metavar="N",
        help="serve the server's metrics on this port (default: any free port)",
    )
    p.add_argument(
        "--broker",
        metavar="URL",
        help="use this broker instead of starting an embedded Mosquitto (default: embedded)",
    )
    p.add_argument("--seed", type=int, default=1, help="random seed for the traffic mix")
    p.add_argument(
        "--fleet",
        metavar="FLEET.toml",
        help="run the demo on this fleet's talkgroups (names, timers, dispatchers; "
        "examples/fleet.toml) instead of --groups generated ones",
    )
    p.add_argument(
        "--secure",
        action="store_true",
        help="run the broker in the secure profile: passwords, ACL, TLS for the server",
    )
    p.add_argument(
        "--monitoring",
        action="store_true",
        help="also start Prometheus (grafana/prometheus) on the server and handsets",
    )
    p.add_argument(
        "--cluster",
        action="store_true",
        help="run it on a 3-node NATS cluster with 3 server instances, and kill one "
        "instance, then one node, in the middle of calls (needs esn[cluster])",
    )
    p.add_argument(
        "--trace",
        metavar="FILE",
        help="write every floor request and its outcome to this CSV file (docs/traces.md)",
    )
    p.add_argument(
        "--trace-dir",
        metavar="DIR",
        help="write the access, message and floor state traces (access.csv, messages.csv, "
        "floor.csv) into this folder, made if need be (docs/traces.md)",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("loadtest", help="drive thousands of handsets from a scenario file")
    p.add_argument(
        "scenario",
        metavar="SCENARIO",
        help="a scenario file, or the name of a shipped one: ci-small, city",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="where to write result.json and report.html (default runs/NAME-TIME)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a scenario value for this run (repeatable)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="write a profile of each worker beside result.json (profile-N.txt and "
        "profile-N.pstats; cProfile slows the workers: quote the figures of a run without it)",
    )
    p.add_argument(
        "--sizes",
        type=_sizes,
        metavar="N,N,...",
        help="run the scenario at each of these numbers of handsets in turn (its groups "
        "and fleet-wide rates scaled alike), then write the capacity curve: "
        "capacity.md and capacity.svg in --out",
    )
    p.set_defaults(func=cmd_loadtest)

    p = sub.add_parser(
        "exercise", help="a dispatcher training exercise, ending in a debrief of how it went"
    )
    p.add_argument(
        "exercise",
        metavar="EXERCISE",
        help="an exercise file, or the name of a shipped one: flood, pursuit, officer-down",
    )
    p.add_argument(
        "--broker",
        metavar="URL",
        help="an open broker to run on (mqtt://HOST:PORT; default: an embedded Mosquitto); "
        "the exercise starts its own server there",
    )
    p.add_argument(
        "--prefix",
        default="esn",
        help="topic prefix, to keep clear of another server on a shared --broker",
    )
    p.add_argument(
        "--mqtt-client", choices=CLIENTS, default="gmqtt", help="the MQTT stack of the handsets"
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="where to write debrief.html and debrief.json (default runs/NAME-TIME)",
    )
    p.add_argument(
        "--start-now",
        action="store_true",
        help="start the clock at once (default: when the trainee's console comes online)",
    )
    p.set_defaults(func=cmd_exercise)

    p = sub.add_parser("console", help="the dispatcher console (a terminal app)")
    _add_broker_args(p)
    p.add_argument("--unit", required=True, help="the dispatcher's unit id (role dispatcher)")
    p.add_argument("--prefix", default="esn", help="topic prefix (default esn)")
    p.add_argument(
        "--all-call",
        default="tg-all",
        metavar="TG",
        help="the broadcast group for all-calls (default tg-all)",
    )
    p.add_argument(
        "--recordings",
        metavar="FILE",
        help="the recorder's file (esn record --db): instant recall with p",
    )
    p.add_argument(
        "--fleet",
        metavar="FLEET.toml",
        help="the server's fleet file, to show talkgroups by their names (default: by id)",
    )
    p.set_defaults(func=cmd_console)

    p = sub.add_parser(
        "record", help="record every talk burst, its voice and the groups' events (SQLite)"
    )
    _add_broker_args(p)
    p.add_argument("--db", required=True, metavar="FILE", help="the recordings file (SQLite)")
    p.add_argument(
        "--unit",
        default="recorder",
        help="its unit id: a dispatcher in a secure fleet (default recorder)",
    )
    p.add_argument("--prefix", default="esn", help="topic prefix (default esn)")
    p.add_argument(
        "--keep-days", type=_above_zero, default=30.0, help="drop bursts older than this many days"
    )
    p.add_argument(
        "--keep-mb",
        type=_above_zero,
        default=1024.0,
        help="drop the oldest bursts while the voice kept is over this many MB",
    )
    p.set_defaults(func=cmd_record)

    p = sub.add_parser("broker-config", help="generate the secure Mosquitto profile from a fleet")
    p.add_argument("fleet", metavar="FLEET.toml", help="the fleet file: one account per unit")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the profile to")
    p.add_argument(
        "--port", type=_port, help="plain (authenticated) listener port (default: a free one)"
    )
    p.add_argument("--tls-port", type=_port, help="TLS listener port (default: a free one)")
    p.add_argument("--server-id", default="esn-1", help="the server's account")
    p.add_argument(
        "--user",
        action="append",
        default=[],
        help="an account for a unit not listed in the fleet file (repeatable)",
    )
    p.add_argument("--prefix", default="esn", help="topic prefix (default esn)")
    p.set_defaults(func=cmd_broker_config)

    p = sub.add_parser(
        "cluster", help="run a NATS cluster on loopback (JetStream and MQTT on each node)"
    )
    p.add_argument(
        "--nodes", type=int, default=3, choices=range(1, 10), metavar="N", help="nodes, 1 to 9"
    )
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser("bench", help="relay throughput and latency against raw Mosquitto")
    p.add_argument("--seconds", type=_above_zero, default=5.0, help="length of each measurement")
    p.add_argument(
        "--rate",
        type=_at_least_zero,
        default=0,
        help="offered packets/s in the throughput runs (0: flat out)",
    )
    p.add_argument(
        "--listeners", type=_at_least_one, default=1, help="group members receiving media"
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="where to write the figures (default docs/benchmarks.json, "
        "or docs/floods.json with --floods)",
    )
    p.add_argument(
        "--floods",
        action="store_true",
        help="instead: floor access in one group while a unit floods each class",
    )
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for handler in logging.getLogger().handlers:  # every library's lines, too
        handler.addFilter(Throttle())
    try:
        return int(args.func(args))
    except (
        FleetError,
        TransportError,
        CliError,
        SecureConfigError,
        MissingExtra,
        ServerStartError,
        NatsStartError,
        OSError,
    ) as exc:
        print(f"esn {args.command}: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, FleetError | CliError) else 1
    except Interrupted as exc:
        print(f"esn {args.command}: {exc}; everything it started is stopped", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:  # before the event loop ran
        return 130


if __name__ == "__main__":
    sys.exit(main())
