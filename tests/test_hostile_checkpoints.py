"""Hostile checkpoint files: a file never makes the reader allocate much more than its own size, and every
malformed file is a CheckpointError naming it. Sizes here are 64 MiB where the real attacks use 1 GiB: enough
for the old reader to fail these tests, small enough for a shared machine."""

import struct
import tracemalloc
import zipfile

import pytest
import torch

from promptcore.checkpoints import CheckpointError, UnsafeCheckpointError, read_torch_checkpoint

MiB = 2 ** 20
BIG = 64 * MiB


def _archive(path, pkl: bytes, records=None):
    """A torch-style zip archive (stored records) holding ``pkl`` as its data.pkl."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        for name, data in (records or {}).items():
            z.writestr(f"archive/{name}", data)
    return path


def _peak_while(fn):
    """(exception raised by fn, peak bytes traced by tracemalloc while it ran)."""
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError) as err:
            fn()
        return err.value, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _call(module: bytes, name: bytes, arg: bytes) -> bytes:
    """Protocol-2 pickle of ``module.name(arg)``; ``arg`` is the pickled argument."""
    return b"\x80\x02c" + module + b"\n" + name + b"\n" + arg + b"\x85R."


SIZE_TAKING = {
    "bytearray": _call(b"builtins", b"bytearray", b"J" + struct.pack("<i", BIG)),
    "bytes": _call(b"builtins", b"bytes", b"J" + struct.pack("<i", BIG)),
    # list(range(n)): a lazy range copied into a list of n ints
    "list-of-range": b"\x80\x02cbuiltins\nlist\n"
                     + _call(b"builtins", b"range", b"J" + struct.pack("<i", 2 ** 20))[2:-1] + b"\x85R.",
}


@pytest.mark.parametrize("case", list(SIZE_TAKING))
def test_size_taking_constructors_are_refused_before_allocating(case, tmp_path):
    path = _archive(tmp_path / "model.pth.tar-1", SIZE_TAKING[case])
    assert path.stat().st_size < 1000
    err, peak = _peak_while(lambda: read_torch_checkpoint(path))
    assert isinstance(err, UnsafeCheckpointError) and str(path) in str(err)
    assert peak < 4 * MiB


def test_copies_of_one_list_are_bounded_by_the_file(tmp_path):
    # A list of 2000 references, then tuple(list) 4000 times: 8M pointers (64 MiB) from a ~30 kB pickle.
    pkl = bytearray(b"\x80\x02]q\x00(" + b"N" * 2000 + b"ecbuiltins\ntuple\nq\x01]q\x02(")
    pkl += b"h\x01h\x00\x85R" * 4000 + b"e."
    path = _archive(tmp_path / "model.pth.tar-1", bytes(pkl))
    err, peak = _peak_while(lambda: read_torch_checkpoint(path))
    assert isinstance(err, UnsafeCheckpointError) and "more items than the record has bytes" in str(err)
    assert peak < 8 * MiB


def test_huge_memo_index_is_refused(tmp_path):
    # LONG_BINPUT 2**23: the C unpickler would size its memo to 2**24 slots (128 MiB) for a 9-byte pickle.
    path = _archive(tmp_path / "model.pth.tar-1", b"\x80\x02Nr" + struct.pack("<I", 2 ** 23) + b".")
    err, peak = _peak_while(lambda: read_torch_checkpoint(path))
    assert "memo slot 8388608" in str(err) and str(path) in str(err)
    assert peak < 4 * MiB


@pytest.mark.parametrize("view", ["expanded", "overlapping"])
def test_views_larger_than_their_storage_are_refused(view, tmp_path):
    # 64 MiB once materialised, from a 1.6 kB / 34 kB file
    base = torch.zeros(1 if view == "expanded" else 8192)
    tensor = base.expand(4096, 4096) if view == "expanded" else base.as_strided((4096, 4096), (1, 1))
    path = tmp_path / "model.pth.tar-1"
    torch.save({"state_dict": {"ctx": tensor}}, path)
    assert path.stat().st_size < 40000
    with pytest.raises(CheckpointError, match=r"state_dict\.ctx has shape \(4096, 4096\) .*larger than their storage") \
            as err:
        read_torch_checkpoint(path)
    assert str(path) in str(err.value)


def test_many_views_of_one_storage_share_it(tmp_path):
    # 64 distinct views of one 1 MiB storage: the old reader cloned each (64 MiB); views share the bytes read once.
    base = torch.arange(MiB // 4, dtype=torch.float32)
    path = tmp_path / "model.pth.tar-1"
    torch.save({"views": [base[:] for _ in range(64)]}, path)
    views = read_torch_checkpoint(path)["views"]
    assert len(views) == 64 and torch.equal(views[0], base)
    assert len({v.data_ptr() for v in views}) == 1


def _small_torch_file(tmp_path):
    path = tmp_path / "src.pth"
    torch.save({"state_dict": {"ctx": torch.zeros(4, 64)}}, path)
    return path


def test_compressed_record_is_refused_before_inflating(tmp_path):
    path = tmp_path / "model.pth.tar-1"
    # data/0 padded with 64 MiB of zeros, deflated to ~64 kB (written in chunks: the test never holds it)
    with zipfile.ZipFile(_small_torch_file(tmp_path)) as a, zipfile.ZipFile(path, "w") as b:
        for info in a.infolist():
            data = a.read(info.filename)
            if not info.filename.endswith("data/0"):
                b.writestr(info.filename, data)
                continue
            record = zipfile.ZipInfo(info.filename)
            record.compress_type = zipfile.ZIP_DEFLATED
            with b.open(record, "w", force_zip64=True) as out:
                out.write(data)
                for _ in range(BIG // MiB):
                    out.write(bytes(MiB))
    assert path.stat().st_size < MiB
    err, peak = _peak_while(lambda: read_torch_checkpoint(path))
    assert "data/0 is compressed" in str(err) and str(path) in str(err)
    assert peak < 4 * MiB


def test_record_claiming_more_than_the_file_is_refused(tmp_path):
    path = tmp_path / "model.pth.tar-1"
    with zipfile.ZipFile(_small_torch_file(tmp_path)) as a, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as b:
        for info in a.infolist():
            b.writestr(info.filename, a.read(info.filename))
    raw = bytearray(path.read_bytes())
    name = next(n for n in zipfile.ZipFile(path).namelist() if n.endswith("data/0")).encode()
    at = next(i for i in range(len(raw)) if raw.startswith(b"PK\x01\x02", i) and raw[i + 46:i + 46 + len(name)] == name)
    raw[at + 24:at + 28] = struct.pack("<I", 2 ** 31)  # the central directory's uncompressed size
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"data/0 claims 2147483648 bytes, more than the whole file") as err:
        read_torch_checkpoint(path)
    assert str(path) in str(err.value)


def test_garbled_central_directory_names_the_file(tmp_path):
    path = _small_torch_file(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b"PK\x01\x02", b"PK\x01\x09", 1))
    assert zipfile.is_zipfile(path)  # the end record is intact: only opening the directory fails
    with pytest.raises(CheckpointError, match="is corrupt") as err:
        read_torch_checkpoint(path)
    assert str(path) in str(err.value)


def test_self_referencing_structure_is_read(tmp_path):
    loop = []
    loop.append(loop)
    path = tmp_path / "model.pth.tar-1"
    torch.save({"state_dict": {"ctx": torch.ones(2)}, "loop": loop}, path)
    loaded = read_torch_checkpoint(path)
    assert loaded["loop"][0] is loaded["loop"] and torch.equal(loaded["state_dict"]["ctx"], torch.ones(2))
