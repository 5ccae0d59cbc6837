"""The blob store writes atomically under paths built only from validated UIDs."""
from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

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
