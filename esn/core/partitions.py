"""Who serves what in a cluster of servers: partitions, their owners, and lease fencing.

Talkgroups (and units) are split into `PARTITIONS` partitions by a stable hash of their id
(`partition_of`). Each partition is owned under a lease: a key in a replicated key-value
bucket (JetStream) whose entries expire `ttl` seconds after they were last written. An
instance takes a free partition by creating its key (which fails if it exists), keeps it
by updating the key with the revision it last wrote (which fails if anyone else wrote
since), and gives it up by deleting it.

Which instance should own a partition is decided by rendezvous hashing over the live
instances, with a cap of an even share each (`assignment`): every instance computes the
same answer from the same member list, and few partitions move when one joins or
leaves. A free partition whose preferred owner has not taken it within `grace`
is taken by whoever sees it, so no partition stays unserved while its owner is stuck.

Fencing. An instance may act for a partition (grant floors, write its groups' records)
only while `acting(p, now)` holds: until `sent + ttl - margin`, where `sent` is when it
*sent* the write that last succeeded. The bucket stamps that write later than it was
sent, and nobody can create the key before the stamp plus `ttl`; so an instance that
cannot renew (paused, cut off, its renewals failing) stops acting at least `margin`
before another can take over, even if it never hears back. `margin` covers the
difference between clocks' rates and the time an action takes to reach the broker.

No I/O and no clock: the shell (the server's cluster link) performs what `plan` asks and
reports each outcome with the local time its request was sent.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from esn.protocol import messages as m
from esn.protocol.ids import PARTITIONS, call_owner, partition_of

__all__ = ["PARTITIONS", "Ownership", "Plan", "acts_on", "assignment", "partition_of", "preferred"]

RENEW_S = 2.0  # a lease is renewed at least this often (a quarter of its time if sooner)


def acts_on(unit: str, msg: m.Message) -> str:
    """Whose partition acts on a message a unit sent up: the group it names (an emergency,
    a regroup, a short message to a group), the unit it is for (a short message to a unit,
    kept by that unit's partition while it is offline; listening in, which that unit's
    partition relays; a private call, kept by its callee's partition), else the
    sender's own."""
    if isinstance(msg, m.AmbientListen | m.AmbientEnd | m.PrivateCall):
        return msg.unit
    if isinstance(msg, m.PrivateAnswer | m.PrivateTalk | m.PrivateEnd):
        return call_owner(msg.call) or unit
    tg = getattr(msg, "tg", None)
    if isinstance(tg, str):
        return tg
    if isinstance(msg, m.Sds):
        return msg.to.partition(":")[2]
    return unit


def _weight(partition: int, member: str) -> int:
    digest = hashlib.blake2b(f"{partition}/{member}".encode(), digest_size=8).digest()
    return int.from_bytes(digest)


def preferred(partition: int, members: Iterable[str], partitions: int = PARTITIONS) -> str | None:
    """The live member that should own the partition, if any."""
    return assignment(frozenset(members), partitions).get(partition)


@functools.lru_cache(maxsize=64)
def assignment(members: frozenset[str], partitions: int = PARTITIONS) -> dict[int, str]:
    """Every partition's owner among `members`: rendezvous hashing (each partition goes
    to the member that weighs most for it) with a cap of an even share per member, so the
    shares differ by one at most. Every instance computes the same from the same members,
    and a member joining or leaving moves few partitions besides its own."""
    if not members:
        return {}
    share, extra = divmod(partitions, len(members))
    room = {mid: share + (i < extra) for i, mid in enumerate(sorted(members))}
    owners = {}
    for p in range(partitions):
        ranked = sorted(members, key=lambda mid: (_weight(p, mid), mid), reverse=True)
        owner = next(mid for mid in ranked if room[mid] > 0)
        owners[p] = owner
        room[owner] -= 1
    return owners


@dataclass(frozen=True, slots=True)
class Plan:
    """What to ask of the bucket now: create these keys, update these (with the revision
    last written), delete these (the instance has stopped acting for them already)."""

    acquire: list[int] = field(default_factory=list)
    renew: list[tuple[int, int]] = field(default_factory=list)
    release: list[tuple[int, int]] = field(default_factory=list)


@dataclass(slots=True)
class _Lease:
    revision: int
    valid_until: float  # local time: we may act until then
    renew_at: float
    release_at: float | None = None  # stopped acting; the key is deleted from then on


class Ownership:
    """One instance's side of the partition leases."""

    def __init__(
        self,
        me: str,
        *,
        ttl: float = 3.0,
        margin: float = 1.0,
        grace: float = 2.0,
        partitions: int = PARTITIONS,
    ) -> None:
        if not 0 < margin < ttl:
            raise ValueError("the fencing margin must be within the lease time")
        self.me = me
        self.ttl, self.margin, self.grace = ttl, margin, grace
        self.partitions = partitions
        self.leases: dict[int, _Lease] = {}
        self._pending: set[int] = set()  # requests out, not yet answered
        self._free_since: dict[int, float] = {}  # partitions seen free, and since when
        self._live_since: dict[str, float] = {}
        self._lost_at: dict[int, int] = {}  # partition -> the revision that took it from us

    # --- views ------------------------------------------------------------------------

    def acting(self, partition: int, now: float) -> bool:
        lease = self.leases.get(partition)
        return lease is not None and lease.release_at is None and now < lease.valid_until

    def owned(self, now: float) -> set[int]:
        return {p for p in self.leases if self.acting(p, now)}

    # --- what to do -------------------------------------------------------------------

    def plan(
        self, now: float, live: Collection[str], free: Collection[int], *, sure: bool = True
    ) -> Plan:
        """`live`: the instances heard from lately (ourselves included or not); `free`:
        the partitions whose key the shell found absent or expired just now. When the
        shell is not `sure` of these (its view of the bucket may be stale), only the leases
        held are renewed: nothing is taken or given up on a view that may be wrong."""
        members = {*live, self.me}
        for mid in members:
            self._live_since.setdefault(mid, now)
        for mid in [x for x in self._live_since if x not in members]:
            del self._live_since[mid]
        for p in list(self._free_since):
            if p not in free:
                del self._free_since[p]
        for p in free:
            self._free_since.setdefault(p, now)
        plan = Plan()
        for p in range(self.partitions):
            if p in self._pending:
                continue
            lease = self.leases.get(p)
            if lease is not None and lease.release_at is not None:
                if now >= lease.release_at:  # (the margin has passed: what we did is out)
                    plan.release.append((p, lease.revision))
                continue
            if lease is None:
                if (
                    sure
                    and p in free
                    and (
                        preferred(p, members, self.partitions) == self.me
                        or now - self._free_since[p] >= self.grace
                    )
                ):
                    plan.acquire.append(p)
                continue
            if now >= lease.valid_until:  # fenced already: never acted on late
                del self.leases[p]
                continue
            owner = preferred(p, members, self.partitions)
            settled = now - self._live_since.get(owner or "", now) >= self.grace
            if sure and owner != self.me and settled:
                # hand it to its preferred owner: stop acting now, and delete the key only
                # after the margin, so nothing we did can reach the broker after the next
                # owner's first act
                lease.release_at = now + self.margin
            elif now >= lease.renew_at:
                plan.renew.append((p, lease.revision))
        self._pending.update(plan.acquire)
        self._pending.update(p for p, _ in plan.renew)
        self._pending.update(p for p, _ in plan.release)
        return plan

    # --- what the bucket answered -----------------------------------------------------

    def written(self, partition: int, revision: int, sent: float) -> None:
        """A create or update of ours succeeded; `sent` is when it was sent."""
        self._pending.discard(partition)
        lease = self.leases.get(partition)
        if lease is not None and lease.release_at is not None:
            return
        if lease is not None and revision < lease.revision:
            return  # an older answer arriving late (the same revision: our write, which
            # the watch showed (`revised`) before its answer came: its time counts now)
        if lease is None and revision < self._lost_at.get(partition, 0):
            return  # the answer to a write made before the key was deleted or taken
        self._lost_at.pop(partition, None)
        self.leases[partition] = _Lease(
            revision, sent + self.ttl - self.margin, sent + min(self.ttl / 4, RENEW_S)
        )

    def refused(self, partition: int, at: int = 0) -> None:
        """A create or update failed: the key is someone else's (or was, or the bucket
        could not be reached). We stop acting for it now. `at`: the revision that deleted
        the key or wrote another's value, when known; an answer to an earlier write of
        ours, coming after it, is then not taken for a new lease."""
        self._pending.discard(partition)
        self.leases.pop(partition, None)
        if at:
            self._lost_at[partition] = at

    def unanswered(self, partition: int) -> None:
        """No answer (in time, or an error that is not a refusal: the bucket's leader
        is being elected, say): a lease held runs on until its fenced end, and is renewed
        again meanwhile."""
        self._pending.discard(partition)

    def revised(self, partition: int, revision: int) -> None:
        """Our key holds a newer revision of ours: a write of ours whose answer was lost (it
        was made, but not answered in time) moved it on. Renew from that revision; how long
        we may act is not changed, as we do not know when that write was sent."""
        lease = self.leases.get(partition)
        if lease is not None and revision > lease.revision:
            lease.revision = revision

    def released(self, partition: int) -> None:
        self._pending.discard(partition)
        self.leases.pop(partition, None)

    def stop_acting(self, now: float) -> dict[int, int]:
        """Leaving: act for nothing from now on; returns the leases (partition ->
        revision) to delete once the margin has passed."""
        held = {p: lease.revision for p, lease in self.leases.items()}
        for lease in self.leases.values():
            lease.release_at = now + self.margin
        return held
