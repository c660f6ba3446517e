"""`covspec link`: a delaying ZeroMQ forwarder between devices and an edge."""

from __future__ import annotations

import signal
import threading

import click

from covspec.bench.harness.link import PROFILES, LinkEmulator, profile_named


@click.command()
@click.option("--listen", default="tcp://127.0.0.1:5556", show_default=True,
              help="Address devices connect to (use it as `device run --edge`).")
@click.option("--edge", default="tcp://127.0.0.1:5555", show_default=True, help="Address of the edge server.")
@click.option("--profile", "profile_name", default="wifi", show_default=True,
              type=click.Choice(list(PROFILES) + ["custom"]),
              help="lan: 1 ms/1 Gbit/s, wifi: 10 ms/100 Mbit/s, 5g: 25 ms/50 Mbit/s, 4g: 60 ms/10 Mbit/s.")
@click.option("--rtt-ms", type=click.FloatRange(min=0), help="Round-trip time for --profile custom.")
@click.option("--bandwidth-mbps", type=click.FloatRange(min=0), help="Bandwidth for --profile custom (0 = unlimited).")
def link(listen: str, edge: str, profile_name: str, rtt_ms: float | None, bandwidth_mbps: float | None) -> None:
    """Emulate a network link: every message is delayed by half the round trip
    plus its size over the bandwidth, in order, in each direction. Ctrl-C stops it."""
    try:
        profile = profile_named(profile_name, rtt_ms, bandwidth_mbps)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    emulator = LinkEmulator(listen, edge, profile).start()
    click.echo(f"link {profile.name} (RTT {profile.rtt_ms} ms, {profile.bandwidth_mbps or 'unlimited'} Mbit/s): "
               f"{emulator.address} -> {edge}", err=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        stopped.wait()
    except KeyboardInterrupt:
        pass
    finally:
        emulator.stop()
