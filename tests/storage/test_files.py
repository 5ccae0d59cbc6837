"""The blob store writes atomically under paths built only from validated UIDs."""
from __future__ import annotations

import errno
import os
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage import direct_io
from storage.files import TMP_PREFIX, BlobStore, OutOfSpaceError, UnsafePathError
from storage.uids import InvalidUIDError, is_valid_uid, validate_uid

component = st.one_of(st.just("0"), st.from_regex(r"[1-9][0-9]{0,8}", fullmatch=True))


@given(st.lists(component, min_size=1, max_size=6))
def test_valid_uids_pass(parts):
    uid = ".".join(parts)
    assert validate_uid(uid) == uid
    assert validate_uid(uid + "\x00") == uid  # UI padding


@pytest.mark.parametrize("uid", [
    "", "1.2/3", "../../etc/passwd", "1.2..3", "1.2.3.", ".1.2", "1.02.3", "1.2.3 4",
    "1.2.840.10008.5.1.4.1.1.2/..", "1" * 65, "1.2.a", "1.2.3\n", "-1.2", "1.2.3\\4",
])
def test_invalid_uids_refused(uid):
    assert not is_valid_uid(uid)
    with pytest.raises(InvalidUIDError):
        validate_uid(uid, "SOP Instance UID")


def test_uid_error_names_attribute():
    with pytest.raises(InvalidUIDError, match="Series Instance UID '1.2/../3' is not a valid"):
        validate_uid("1.2/../3", "Series Instance UID")


def test_atomic_write_leaves_only_the_final_file(tmp_path):
    store = BlobStore(tmp_path / "store")
    rel = store.instance_relpath("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert rel == "instances/1.2.3/1.2.3.4/1.2.3.4.5.dcm"
    path = store.write_atomic(rel, b"DICM" * 1000)
    assert path.read_bytes() == b"DICM" * 1000
    assert os.listdir(path.parent) == ["1.2.3.4.5.dcm"]
    # Rewriting replaces atomically (same name, new content).
    store.write_atomic(rel, b"x")
    assert path.read_bytes() == b"x"


def test_failed_write_leaves_nothing(tmp_path):
    store = BlobStore(tmp_path / "store")
    rel = store.instance_relpath("1.2", "1.2.3", "1.2.3.4")

    def chunks():
        yield b"part one"
        raise RuntimeError("connection lost")

    with pytest.raises(RuntimeError):
        store.write_atomic(rel, chunks())
    directory = store.path(rel).parent
    assert os.listdir(directory) == []


def test_paths_cannot_leave_the_store(tmp_path):
    store = BlobStore(tmp_path / "store")
    for bad in ("../x", "/etc/passwd", "instances/../../x", "instances/.tmp-1"):
        with pytest.raises(UnsafePathError):
            store.path(bad)
    with pytest.raises(InvalidUIDError):
        store.instance_relpath("1.2", "1.2/../../..", "1.2.3")
    with pytest.raises(InvalidUIDError):
        store.instance_relpath("..", "1.2", "1.2.3")
    with pytest.raises(UnsafePathError):
        store.result_relpath("1.2", "1.3", 1, 1, "../summary.json")
    assert not any(p.name != "store" for p in tmp_path.iterdir())


def test_out_of_space_writes_nothing(tmp_path):
    store = BlobStore(tmp_path / "store", min_free_mb=10**9)  # a petabyte floor
    rel = store.instance_relpath("1.2", "1.2.3", "1.2.3.4")
    with pytest.raises(OutOfSpaceError):
        store.write_atomic(rel, b"data")
    assert not store.path(rel).exists()


def test_temporaries_from_a_crash_are_removed(tmp_path):
    store = BlobStore(tmp_path / "store")
    rel = store.instance_relpath("1.2", "1.2.3", "1.2.3.4")
    store.write_atomic(rel, b"ok")
    stray = store.path(rel).parent / f"{TMP_PREFIX}deadbeef"
    stray.write_bytes(b"half")
    assert store.remove_temporaries() == 1
    assert not stray.exists() and store.exists(rel)


# -- direct I/O (issue 8) ------------------------------------------------------------------------
SIZES = [0, 1, 4095, 4096, 4097, direct_io.DIRECT_CHUNK - 1, direct_io.DIRECT_CHUNK,
         direct_io.DIRECT_CHUNK + 1, 2 * direct_io.DIRECT_CHUNK + 4099]


def _created_flags(monkeypatch) -> list[int]:
    """The flags of every file the store creates from now on (``os.open`` with ``O_CREAT``)."""
    flags: list[int] = []
    real_open = os.open

    def spy(path, mode, *args):
        if mode & os.O_CREAT:
            flags.append(mode)
        return real_open(path, mode, *args)

    monkeypatch.setattr(os, "open", spy)
    return flags


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("size", SIZES)
def test_every_byte_and_the_exact_length_with_and_without_direct_io(tmp_path, monkeypatch,
                                                                     size, direct):
    """Sizes around the block (4096) and the staging buffer's size, from buffers of every
    kind: a new instance file, a temporary file and an atomically written result hold exactly
    the data; with direct I/O every file is opened with O_DIRECT, without it none."""
    store = BlobStore(tmp_path / "store", direct_io=direct)
    if direct and not store.direct_io:
        pytest.skip("the file system under tmp_path refuses O_DIRECT")
    flags = _created_flags(monkeypatch)
    data = random.Random(size).randbytes(size)
    a, b = size // 3, size // 3 + size // 5
    parts = [data[:a], memoryview(data)[a:b], bytearray(data[b:])]
    rel = store.instance_relpath("1.2", "1.2.3", f"1.2.3.{size}")
    new = store.write_new(rel, parts, defer_sync=True)
    new.pending.sync()
    assert store.read_bytes(rel) == data
    assert store.write_temp(rel, parts).read_bytes() == data
    result = store.write_atomic(store.result_relpath("1.2", "1.2.3", 1, 1, "seg.dcm"), data)
    assert result.read_bytes() == data
    assert len(flags) == 3
    assert all(bool(f & os.O_DIRECT) is direct for f in flags)


def test_direct_io_staging_buffers_are_reused(tmp_path):
    store = BlobStore(tmp_path / "store")
    if not store.direct_io:
        pytest.skip("the file system under tmp_path refuses O_DIRECT")
    before = len(direct_io.staging._free)
    for k in range(20):
        store.write_new(store.instance_relpath("1.2", "1.2.3", f"1.2.3.{k}"), [b"x" * 9000])
    assert len(direct_io.staging._free) == max(before, 1)


def test_a_file_system_that_refuses_o_direct_gets_the_page_cache(tmp_path, monkeypatch):
    """As tmpfs did before Linux 6.6: O_DIRECT is refused (EINVAL). The store finds out once,
    with a probe file it removes, and writes through the page cache."""
    real_open = os.open
    tries = []

    def refuse(path, mode, *args):
        if mode & os.O_DIRECT:
            tries.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, mode, *args)

    monkeypatch.setattr(os, "open", refuse)
    store = BlobStore(tmp_path / "store")
    for k in range(3):
        rel = store.instance_relpath("1.2", "1.2.3", f"1.2.3.{k}")
        new = store.write_new(rel, [b"abc", b"def"], defer_sync=True)
        new.pending.sync()
        assert store.read_bytes(rel) == b"abcdef"
    assert store.direct_io is False and len(tries) == 1
    assert not [p for p in store.root.rglob("*") if p.name.startswith(TMP_PREFIX)]


def test_a_failed_direct_write_leaves_nothing(tmp_path, monkeypatch):
    store = BlobStore(tmp_path / "store")
    if not store.direct_io:
        pytest.skip("the file system under tmp_path refuses O_DIRECT")
    rel = store.instance_relpath("1.2", "1.2.3", "1.2.3.4")

    def no_space(fd, buffers):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct_io, "write_all", no_space)
    with pytest.raises(OSError):
        store.write_new(rel, [b"x" * 10_000], defer_sync=True)
    assert os.listdir(store.path(rel).parent) == []
