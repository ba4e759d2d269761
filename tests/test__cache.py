"""The on-disk kernel cache (sj_temporal_fusion/_cache.py): files with a digest beside them,
written so that threads of one process (nn.DataParallel, prebuild) writing one entry at once never
leave or return a damaged file."""
import os
import threading

from sj_temporal_fusion import _cache

ROUNDS = 30


def _hammer(path, payloads, readers=2):
    """Writers (one per payload) write ``path`` ROUNDS times each while readers read it; returns
    (errors, every non-None read)."""
    errors, reads, done = [], [], threading.Event()

    def write(data):
        try:
            for _ in range(ROUNDS):
                _cache.write_verified(path, data)
        except Exception as exc:  # noqa: BLE001 - collected and reported by the test
            errors.append(exc)

    def read():
        while not done.is_set():
            data = _cache.read_verified(path)
            if data is not None:
                reads.append(data)
    writers = [threading.Thread(target=write, args=(p,)) for p in payloads]
    watchers = [threading.Thread(target=read) for _ in range(readers)]
    for t in watchers + writers:
        t.start()
    for t in writers:
        t.join()
    done.set()
    for t in watchers:
        t.join()
    return errors, reads


def test_threads_writing_one_entry_never_damage_it(tmp_path):
    path = tmp_path / "entry" / "kernel.cubin"
    data = os.urandom(1 << 21)  # 2 MiB: writes long enough to overlap
    errors, reads = _hammer(path, [data] * 4)
    assert not errors, errors[:3]
    assert all(r == data for r in reads)
    assert _cache.read_verified(path) == data
    assert sorted(p.name for p in path.parent.iterdir()) == ["kernel.cubin", "kernel.cubin.sha256"]  # no temporaries left


def test_a_read_returns_only_what_some_writer_wrote(tmp_path):
    """Different bytes for one entry (a rebuild racing a reader): a read gets one writer's bytes
    whole, or None (rebuilt), never a mix."""
    path = tmp_path / "kernel.cubin"
    payloads = [bytes([i]) * (1 << 20) for i in (1, 2)]
    errors, reads = _hammer(path, payloads)
    assert not errors, errors[:3]
    assert all(r in payloads for r in reads)


def test_damaged_or_unverified_files_are_not_returned(tmp_path, capsys):
    path = tmp_path / "libtf.so"
    _cache.write_verified(path, b"good bytes")
    assert _cache.read_verified(path) == b"good bytes" and _cache.is_verified(path)
    path.write_bytes(b"good byt")
    assert _cache.read_verified(path) is None and not _cache.is_verified(path)
    assert "does not match its digest" in capsys.readouterr().err
    (tmp_path / "libtf.so.sha256").unlink()
    assert _cache.read_verified(path) is None
    assert _cache.read_verified(tmp_path / "absent") is None


def test_commit_moves_a_build_into_place_with_its_digest(tmp_path):
    tmp = tmp_path / "libtf.1234.tmp"
    tmp.write_bytes(b"library")
    _cache.commit(tmp, tmp_path / "libtf.so")
    assert not tmp.exists() and _cache.read_verified(tmp_path / "libtf.so") == b"library"
