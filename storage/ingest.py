"""The receive path's write side: store one received instance durably, index it, and group the
syncs of instances that arrive together (issue 8). Each promise this keeps, with its tests:
docs/durability.md.

:meth:`InstanceWriter.store_instance` returns only once the instance is durable in the sense the
configuration promises, so the SCP can answer Success right after it:

- the data: fdatasynced before its row is committed, always; written directly under its final
  name when no file is there (:meth:`storage.files.BlobStore.write_new`, the usual case: no
  rename), otherwise to a temporary file in the same directory
  (:meth:`storage.files.BlobStore.write_temp`, synced at once): a duplicate, a heal, or a
  partial file that a crash left under the final name without an index row.
- the name and the index row: one *group commit* for every instance waiting at that moment.
  The first caller becomes the leader: in one transaction it inserts all rows (an insert that
  does nothing is a duplicate: no query of its own), renames the temporary files of new
  instances into place, fsyncs each directory once, makes every member's data durable, then
  commits (one WAL sync), and wakes the others; callers that arrived meanwhile form the next
  group. No committed row points at a file that is not complete and in place.
- the order of the work: a directly written file's write-back is started at once
  (``sync_file_range``) and its fdatasync deferred (:class:`storage.files.PendingSync`). A
  caller that has to wait for the group before it syncs its own data meanwhile (several
  associations: their syncs run side by side, as before); a leader syncs its own after the
  inserts and the directory fsync, so that their CPU time and that flush overlap the data's
  way to the device instead of following it. One association sends instance after instance
  (storescu waits for each answer), so its groups have one member and each instance waits
  for the device once less in a row. With direct I/O (``storage.direct_io``, the default
  where the file system takes it) the data is on the device when ``write_new`` returns, and
  the deferred fdatasync has only the last partial block and the metadata left; handing the
  direct write to a helper thread, to overlap it with the inserts, measured slower (the
  directory fsync then waited for it: docs/archive/bench-history.md, "Sixth round").

Durability levels, from ``storage.sqlite_synchronous`` (SQLite only; other databases commit
durably and get the first):

- ``FULL`` (default): survives power loss and OS crashes. Per group: directory fsyncs, then
  the commit with a WAL sync.
- ``NORMAL``: survives a crash of the node process (``kill -9``, OOM kill), not a power loss.
  The file data is still fdatasynced before the rename; the directory fsyncs and the WAL sync
  are left to the file system's and SQLite's own schedule (SQLite syncs the WAL at each
  checkpoint). After a power loss the last acknowledged instances (about the last few
  seconds) may be missing from the index or from the store, and the sender must send them
  again, which heals both cases: a re-sent instance whose row survived but whose file did not
  is written again (see :meth:`InstanceWriter.store_instance`). Orthanc's default (SQLite
  ``synchronous=NORMAL``, file fsync) gives the same promise.
"""
from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.files import BlobStore, PendingSync
from storage.index import Index, InstanceRecord

#: Most instances in one group commit (bounds the latency of the group's first member).
MAX_GROUP = 64


class Outcome(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"     # the SOP Instance UID is indexed and its file is present


@dataclass
class _Waiter:
    item: Any
    ready: threading.Event
    lead: bool = False
    done: bool = False
    result: Any = None
    error: BaseException | None = None

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


class GroupCommit:
    """Leader/follower group commit: ``submit(item)`` returns ``fn([...item...])``'s result
    for ``item`` once a call of ``fn`` that contained it has returned.

    No thread of its own: the first submitter runs ``fn`` for everything pending, the ones
    that arrive while it runs wait and form the next group, whose first member leads it. A
    single submitter thus pays no thread hand-off at all.
    """

    def __init__(self, fn: Callable[[list[Any]], Sequence[Any]], max_group: int = MAX_GROUP):
        self._fn = fn
        self._max = max_group
        self._lock = threading.Lock()
        self._pending: list[_Waiter] = []
        self._busy = False

    def submit(self, item: Any, prepare: Callable[[], object] | None = None) -> Any:
        """``fn``'s result for ``item``. ``prepare``: the caller's own share of the work, run
        while it waits for the group before its own (not when it leads at once: then ``fn``
        does it). Its errors are ignored here, so ``fn`` must meet them again (an idempotent
        step, such as :meth:`storage.files.PendingSync.sync`)."""
        me = _Waiter(item, threading.Event())
        with self._lock:
            self._pending.append(me)
            lead = not self._busy
            self._busy = True
        if not lead:
            if prepare is not None:
                try:
                    prepare()
                except BaseException:  # noqa: BLE001 - fn meets it again, reports it per member
                    pass
            me.ready.wait()
            if not me.lead:
                return me.outcome()
        while not me.done:
            with self._lock:
                group, self._pending = self._pending[:self._max], self._pending[self._max:]
            self._run(group, me)
        with self._lock:  # hand the lead to the next group's first member, if any
            if self._pending:
                self._pending[0].lead = True
                self._pending[0].ready.set()
            else:
                self._busy = False
        return me.outcome()

    def _run(self, group: list[_Waiter], me: _Waiter) -> None:
        try:
            results = list(self._fn([w.item for w in group]))
            for w, r in zip(group, results, strict=True):
                w.result = r
        except BaseException as exc:  # noqa: BLE001 - each member hears about it
            if len(group) == 1:
                group[0].error = exc
            else:  # one bad member must not fail the others: one by one
                for w in group:
                    try:
                        w.result = list(self._fn([w.item]))[0]
                    except BaseException as single:  # noqa: BLE001
                        w.error = single
        for w in group:
            w.done = True
            if w is not me:
                w.ready.set()


class InstanceWriter:
    """Stores received instances for the SCP (see the module docstring)."""

    def __init__(self, store: BlobStore, index: Index, *, sync_dirs: bool = True):
        self.store = store
        self.index = index
        self.sync_dirs = sync_dirs
        self._group = GroupCommit(self._commit)

    @classmethod
    def from_settings(cls, settings, store: BlobStore, index: Index) -> "InstanceWriter":
        normal = index.db.is_sqlite and settings.storage.sqlite_synchronous == "NORMAL"
        return cls(store, index, sync_dirs=not normal)

    def store_instance(self, record: InstanceRecord, data: bytes | Sequence[bytes]) -> Outcome:
        """Write, sync and index one instance; raises OutOfSpaceError/OSError (nothing kept
        under the final name) or the index's error.

        ``data``: the file's bytes, or buffers written one after the other. A new instance's
        file is written directly under its final name when nothing is there
        (:meth:`storage.files.BlobStore.write_new`: no rename; its fdatasync deferred until
        the row is inserted, see the module docstring); otherwise (a duplicate, a file left by
        a crash, a heal) the data goes to a temporary file first. The group commit inserts the
        row and, inside the same transaction, syncs the data of a directly written file, names
        a temporary file (a new instance), drops the data (a duplicate: the
        first copy stays) or names it at the indexed path (indexed, but its file is gone, e.g.
        after a power loss with ``storage.sqlite_synchronous = NORMAL``: the re-sent copy heals
        it). So the duplicate check is the insert itself, not a query of its own, and no
        committed row points at a file that is not complete.
        """
        new = self.store.write_new(record.path, data, defer_sync=True)
        if new is not None:
            pending = new.pending
            try:
                outcome = self._group.submit((new.path, record, True, pending),
                                             prepare=pending.sync if pending else None)
            except BaseException:
                self.store.remove_if_same(new.path, new.inode)  # not indexed: nothing stays
                raise
            finally:
                if pending is not None:
                    pending.close()  # synced by the commit, or an error: closed either way
            if outcome is Outcome.DUPLICATE and self._unindexed(record):
                self.store.remove_if_same(new.path, new.inode)
            return outcome
        tmp = self.store.write_temp(record.path, data)
        try:
            outcome = self._group.submit((tmp, record, False, None))
        except BaseException:
            tmp.unlink(missing_ok=True)  # not named: nothing stays behind
            raise
        if outcome is Outcome.DUPLICATE:
            tmp.unlink(missing_ok=True)  # the first copy stays
        return outcome

    def _unindexed(self, record: InstanceRecord) -> bool:
        """A duplicate written under its own final name: is that name one no row points at
        (the first copy was indexed under another study or series)?"""
        return self.index.instance_path(record.sop_instance_uid) != record.path

    def _commit(self, items: list[tuple[Path, InstanceRecord, bool, PendingSync | None]],
                ) -> list[Outcome]:
        outcomes: list[Outcome] = []

        def place(new: list[bool], known: list[str | None]) -> None:
            placed: list[Path] = []
            named: set[str] = set()   # final names a temporary file of this group went to
            outcomes.clear()          # a retried transaction places again
            for (path, record, direct, _), is_new, known_path in zip(items, new, known):
                if direct:
                    # Already under its final name. New: nothing to rename. Indexed under this
                    # very name: it heals a missing file, unless a temporary file of this
                    # group was renamed onto it (a concurrent copy: then a duplicate).
                    placed.append(path)
                    if is_new or (known_path == record.path and record.path not in named):
                        outcomes.append(Outcome.STORED)
                    else:
                        outcomes.append(Outcome.DUPLICATE)
                    continue
                if is_new:
                    target = record.path
                elif known_path is not None and not self.store.exists(known_path):
                    target = known_path  # heal: the row is there, its file is not
                else:
                    outcomes.append(Outcome.DUPLICATE)
                    continue
                placed.append(self.store.place(path, target))
                named.add(target)
                outcomes.append(Outcome.STORED)
            if self.sync_dirs:
                self.store.sync_dirs(placed)
            for *_, pending in items:  # the data is durable before its row is committed
                if pending is not None:
                    pending.sync()

        self.index.add_instances([item[1] for item in items], before_commit=place)
        return outcomes
