"""``nbdqcow create`` / ``info`` / ``snapshot -l`` against qemu-img 7.2.

* every pair of create options (an all-pairs sample of the valid product) gives an image
  that ``qemu-img check`` finds clean, that ``qemu-img info`` describes exactly as
  ``nbdqcow info`` does (JSON and human text), that qemu-io can write, and whose data
  ``qemu-img convert`` and the engine read back as written;
* ``preallocation=off`` images are byte-identical to qemu-img's;
* preallocated images map every guest cluster at one constant host offset;
* info and snapshot -l print what qemu-img prints on images with snapshots, bitmaps,
  dirty and corrupt bits, backing chains, external data files.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from tooling import require_tool

from nbdqcow.cli import main as nbdqcow_main

SIZE = 3_000_000  # not a multiple of any cluster size: the last cluster is partial
VSIZE = (SIZE + 511) // 512 * 512
BACKING_SIZE = 2 * 1024 * 1024
WRITES = ((0x5A, 65536, 200_000), (0xA5, 2_900_000, 100_000), (0x3C, 1_000_003, 7))


def run(*argv: str, cwd: Path | None = None, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    require_tool(argv[0])
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=120, cwd=cwd,
                          env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} failed: {proc.stderr}")
    return proc


@contextlib.contextmanager
def chdir(path: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def nbdqcow(*args: str, cwd: Path) -> tuple[int, str, str]:
    """Run the CLI in-process (fast), in ``cwd``; return (rc, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = nbdqcow_main(list(args))
    return rc, out.getvalue(), err.getvalue()


# --------------------------------------------------------------------------------------
# the option space and an all-pairs sample of it
# --------------------------------------------------------------------------------------
DIMS: dict[str, tuple[str, ...]] = {
    "compat": ("0.10", "1.1"),
    "cluster_size": ("512", "4k", "64k", "2M"),
    "refcount_bits": ("1", "4", "16", "64"),
    "lazy_refcounts": ("off", "on"),
    "extended_l2": ("off", "on"),
    "compression_type": ("zlib", "zstd"),
    "preallocation": ("off", "metadata", "falloc", "full"),
    "data": ("none", "file", "raw"),
    "backing": ("none", "qcow2", "raw"),
    "mapping": ("none", "preserve", "release"),
}
NAMES = tuple(DIMS)
Combo = tuple[str, ...]


def valid(c: dict[str, str]) -> bool:
    v3 = c["compat"] == "1.1"
    if not v3 and (c["refcount_bits"] != "16" or c["lazy_refcounts"] == "on"
                   or c["extended_l2"] == "on" or c["compression_type"] == "zstd"
                   or c["data"] != "none"):
        return False
    if c["extended_l2"] == "on" and c["cluster_size"] in ("512", "4k"):
        return False
    if c["data"] == "raw" and c["backing"] != "none":
        return False
    return not (c["backing"] != "none" and c["preallocation"] != "off"
                and c["extended_l2"] == "off")


def all_pairs() -> list[Combo]:
    """A deterministic greedy cover of every pair of values that some valid combo has."""
    combos = [c for c in itertools.product(*DIMS.values()) if valid(dict(zip(NAMES, c, strict=True)))]
    idx = list(itertools.combinations(range(len(NAMES)), 2))

    def pairs(c: Combo) -> set[tuple[int, int, str, str]]:
        return {(i, j, c[i], c[j]) for i, j in idx}

    uncovered: set[tuple[int, int, str, str]] = set()
    for c in combos:
        uncovered |= pairs(c)
    chosen: list[Combo] = []
    while uncovered:
        i, j, a, b = min(uncovered)
        cands = [c for c in combos if c[i] == a and c[j] == b]
        best = max(cands, key=lambda c: len(pairs(c) & uncovered))
        chosen.append(best)
        uncovered -= pairs(best)
    return chosen


PAIRWISE = all_pairs()


SHORT = {"compat": "v", "cluster_size": "cs", "refcount_bits": "rb", "lazy_refcounts": "lazy",
         "extended_l2": "xl2", "compression_type": "ct", "preallocation": "pre",
         "data": "data", "backing": "back", "mapping": "map"}


def combo_id(c: Combo) -> str:
    d = dict(zip(NAMES, c, strict=True))
    return ",".join(f"{SHORT[k]}={v}" for k, v in d.items() if v not in ("none", "off"))


def create_args(c: dict[str, str], name: str, size: int | None = SIZE) -> list[str]:
    opts = [f"{k}={c[k]}" for k in ("compat", "cluster_size", "refcount_bits",
                                    "lazy_refcounts", "extended_l2", "compression_type",
                                    "preallocation")]
    if c["data"] != "none":
        opts.append("data_file=data.raw")
        if c["data"] == "raw":
            opts.append("data_file_raw=on")
    args = ["create", "-f", "qcow2", "-o", ",".join(opts)]
    if c["backing"] != "none":
        args += ["-b", f"base.{c['backing']}", "-F", c["backing"]]
    args.append(name)
    if size is not None:
        args.append(str(size))
    return args


def make_backing(d: Path, fmt: str) -> bytes:
    run("qemu-img", "create", "-q", "-f", fmt, f"base.{fmt}", str(BACKING_SIZE), cwd=d)
    run("qemu-io", "-f", fmt, "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 1536k 300k",
        f"base.{fmt}", cwd=d)
    return b"\x11" * (1 << 20) + bytes(512 * 1024) + b"\x22" * (300 * 1024) + bytes(
        BACKING_SIZE - (1 << 20) - 512 * 1024 - 300 * 1024)


def qemu_map(path: Path, cwd: Path) -> list[dict[str, object]]:
    """qemu-img map of the image alone (backing detached: reserved clusters of an
    extended-L2 overlay then show their own host offsets)."""
    spec = json.dumps({"driver": "qcow2", "file": {"driver": "file", "filename": str(path)},
                       "backing": None})
    out = run("qemu-img", "map", "--output=json", f"json:{spec}", cwd=cwd).stdout
    return list(json.loads(out))


def assert_check_clean(path: str, cwd: Path) -> None:
    proc = run("qemu-img", "check", "--output=json", path, cwd=cwd, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(proc.stdout)
    assert res.get("check-errors", 0) == 0 and res.get("corruptions", 0) == 0
    assert res.get("leaks", 0) == 0, res


def assert_info_same(path: str, cwd: Path) -> None:
    for output in ("json", "human"):
        want = run("qemu-img", "info", f"--output={output}", path, cwd=cwd).stdout
        rc, got, err = nbdqcow("info", f"--output={output}", path, cwd=cwd)
        assert rc == 0, err
        if output == "json":
            assert json.loads(got) == json.loads(want)
        assert got == want


def constant_offset(mapping: list[dict[str, object]], size: int) -> int:
    """The one host-minus-guest delta of a fully mapped image (asserts there is one)."""
    deltas = {int(e["offset"]) - int(e["start"]) for e in mapping  # type: ignore[call-overload]
              if "offset" in e}
    assert all("offset" in e for e in mapping), mapping
    assert len(deltas) == 1, mapping
    assert sum(int(e["length"]) for e in mapping) == size  # type: ignore[call-overload]
    return deltas.pop()


def holes(path: Path, start: int, end: int) -> list[int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        found = []
        pos = start
        while pos < end:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            if hole >= end:
                break
            found.append(hole)
            try:
                pos = os.lseek(fd, hole, os.SEEK_DATA)
            except OSError:
                break
        return found
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------
# the all-pairs matrix
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("combo", PAIRWISE, ids=[combo_id(c) for c in PAIRWISE])
def test_created_image(tmp_path: Path, combo: Combo) -> None:
    c = dict(zip(NAMES, combo, strict=True))
    qdir, ndir = tmp_path / "qemu", tmp_path / "ours"
    qdir.mkdir()
    ndir.mkdir()
    model = bytearray(VSIZE)
    if c["backing"] != "none":
        base = make_backing(qdir, c["backing"])
        make_backing(ndir, c["backing"])
        model[: len(base)] = base
    args = create_args(c, "img.qcow2")
    if c["mapping"] != "none":
        args[4] += f",mapping={c['mapping']}"
    rc, out, err = nbdqcow(*args, cwd=ndir)
    assert rc == 0, err
    # qemu-img does not know mapping=: create its twin without it
    qargs = create_args(c, "img.qcow2")
    want = run("qemu-img", *qargs, cwd=qdir).stdout
    extra = f" mapping={c['mapping']}" if c["mapping"] != "none" else ""
    assert out == want.rstrip("\n") + extra + "\n"

    img = ndir / "img.qcow2"
    assert_check_clean("img.qcow2", ndir)
    assert_info_same("img.qcow2", ndir)
    if c["mapping"] != "none":
        from nbdqcow.qcow2.header import parse_header
        from nbdqcow.qcow2.layout import EXT_NBDQCOW_POLICY

        h = parse_header(img.read_bytes()[: 2 << 20], img.stat().st_size)
        assert h.extension(EXT_NBDQCOW_POLICY) == c["mapping"].encode()
    elif c["preallocation"] == "off" and c["data"] != "raw":
        # qemu-img's own layout, byte for byte
        assert img.read_bytes() == (qdir / "img.qcow2").read_bytes()
    if c["data"] != "none":
        assert (ndir / "data.raw").stat().st_size == VSIZE

    cs = {"512": 512, "4k": 4096, "64k": 65536, "2M": 2 << 20}[c["cluster_size"]]
    mapped = c["preallocation"] != "off" or c["data"] == "raw"
    if mapped:
        delta = constant_offset(qemu_map(img, ndir), VSIZE)
        data_path = ndir / "data.raw" if c["data"] != "none" else img
        if c["data"] != "none":
            assert delta == 0
        else:
            assert delta % cs == 0 and delta > 0
        area_end = delta + (VSIZE + cs - 1) // cs * cs
        if c["data"] != "none":
            area_end = VSIZE
        if c["preallocation"] == "full":
            assert holes(data_path, delta, area_end) == []
        if c["preallocation"] in ("falloc", "full"):
            assert data_path.stat().st_blocks * 512 >= area_end - delta

    # qemu-io writes; qemu and the engine read back what it wrote
    cmds = []
    for pattern, off, length in WRITES:
        cmds += ["-c", f"write -P {pattern} {off} {length}"]
        model[off : off + length] = bytes([pattern]) * length
    run("qemu-io", "-f", "qcow2", *cmds, "img.qcow2", cwd=ndir)
    assert_check_clean("img.qcow2", ndir)
    run("qemu-img", "convert", "-O", "raw", "img.qcow2", "out.raw", cwd=ndir)
    assert (ndir / "out.raw").read_bytes() == bytes(model)
    if mapped:
        # writes into preallocated clusters landed in place
        assert constant_offset(qemu_map(img, ndir), VSIZE) == delta
    from nbdqcow.image import open_image

    with chdir(ndir):
        drv = open_image("img.qcow2", "qcow2", writable=False)
        try:
            assert drv.pread(0, VSIZE) == bytes(model)
        finally:
            drv.close()


# --------------------------------------------------------------------------------------
# preallocation=off is qemu-img's layout byte for byte (incl. qemu's refcount block order)
# --------------------------------------------------------------------------------------
OFF_CASES = [
    ("", "1G"), ("compat=0.10", "1G"), ("", "0"), ("cluster_size=512", "1G"),
    ("cluster_size=512,refcount_bits=64", "4G"), ("cluster_size=512,refcount_bits=1", "1G"),
    ("cluster_size=4k", "3G"), ("cluster_size=8k", "1M"), ("cluster_size=2M,refcount_bits=8",
                                                           "100G"),
    ("extended_l2=on,compression_type=zstd,lazy_refcounts=on,cluster_size=16k", "1M"),
    ("data_file=d.raw", "1M"), ("data_file=d.raw,data_file_raw=on", "1M"),
    ("compat=v2", "1000"), ("refcount_bits=2,cluster_size=1k", "20G"),
    ("refcount_bits=4,cluster_size=2k", "30G"), ("refcount_bits=32,cluster_size=512", "2G"),
]


@pytest.mark.parametrize(("opts", "size"), OFF_CASES)
def test_off_layout_identical_to_qemu(tmp_path: Path, opts: str, size: str) -> None:
    q, n = tmp_path / "q", tmp_path / "n"
    q.mkdir()
    n.mkdir()
    args = ["create", "-q", "-f", "qcow2"] + (["-o", opts] if opts else []) + ["x.qcow2", size]
    run("qemu-img", *args, cwd=q)
    rc, _, err = nbdqcow(*args, cwd=n)
    assert rc == 0, err
    assert (n / "x.qcow2").read_bytes() == (q / "x.qcow2").read_bytes()
    if "data_file" in opts:
        assert (n / "d.raw").stat().st_size == (q / "d.raw").stat().st_size


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_size_from_backing(tmp_path: Path, fmt: str) -> None:
    q, n = tmp_path / "q", tmp_path / "n"
    for d in (q, n):
        (d / "sub").mkdir(parents=True)
        run("qemu-img", "create", "-q", "-f", fmt, f"base.{fmt}", "5M", cwd=d)
    args = ["create", "-f", "qcow2", "-b", f"../base.{fmt}", "-F", fmt, "sub/top.qcow2"]
    want = run("qemu-img", *args, cwd=q).stdout
    rc, got, err = nbdqcow(*args, cwd=n)
    assert rc == 0, err
    assert got == want
    assert (n / "sub/top.qcow2").read_bytes() == (q / "sub/top.qcow2").read_bytes()
    assert_info_same("sub/top.qcow2", n)
    for output in ("json", "human"):
        want = run("qemu-img", "info", "--backing-chain", f"--output={output}",
                   "sub/top.qcow2", cwd=n).stdout
        assert nbdqcow("info", "--backing-chain", f"--output={output}", "sub/top.qcow2",
                       cwd=n)[1] == want


BAD_OPTIONS = [
    "extended_l2=on,cluster_size=4k", "refcount_bits=3", "refcount_bits=128",
    "compat=0.10,refcount_bits=1", "data_file_raw=on", "cluster_size=1000",
    "cluster_size=4M", "cluster_size=256", "compat=0.10,lazy_refcounts=on",
    "compat=0.10,extended_l2=on", "compat=0.10,compression_type=zstd",
    "compat=0.10,data_file=x.raw", "compat=2", "preallocation=bogus",
    "compression_type=lz4", "lazy_refcounts=maybe", "backing_fmt=raw", "nosuchoption=1",
    "backing_file=b.qcow2,backing_fmt=qcow2,preallocation=full",
    "backing_file=b.qcow2,backing_fmt=qcow2,data_file=x.raw,data_file_raw=on",
]


@pytest.mark.parametrize("opts", BAD_OPTIONS)
def test_invalid_options_rejected_like_qemu(tmp_path: Path, opts: str) -> None:
    run("qemu-img", "create", "-q", "-f", "qcow2", "b.qcow2", "1M", cwd=tmp_path)
    q = run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, "q.qcow2", "1M",
            cwd=tmp_path, check=False)
    assert q.returncode != 0
    rc, out, err = nbdqcow("create", "-q", "-f", "qcow2", "-o", opts, "n.qcow2", "1M",
                           cwd=tmp_path)
    assert rc == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "n.qcow2").exists()


def test_api_probes_backing_format(tmp_path: Path) -> None:
    from nbdqcow.image import probe_file
    from nbdqcow.qcow2.create import create_image
    from nbdqcow.qcow2.info import image_info

    run("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "3M", cwd=tmp_path)
    top = str(tmp_path / "top.qcow2")
    assert create_image(top, None, "qcow2", None, str(tmp_path / "base.qcow2"),
                        probe=probe_file) == 3 << 20
    info = image_info(top, "qcow2")
    assert info["backing-filename-format"] == "qcow2" and info["virtual-size"] == 3 << 20
    assert_check_clean(top, tmp_path)
    # qemu-img's rule on the command line: -b needs -F
    rc, _, err = nbdqcow("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "x.qcow2",
                         cwd=tmp_path)
    assert rc == 1 and "without backing format" in err


def test_missing_size_and_bad_size(tmp_path: Path) -> None:
    for args in (["x.qcow2"], ["x.qcow2", "1Q"], ["x.qcow2", "-5"]):
        rc, _, err = nbdqcow("create", "-q", "-f", "qcow2", *args, cwd=tmp_path)
        assert rc != 0 and len(err.strip().splitlines()) == 1, err


def test_o_help(tmp_path: Path) -> None:
    rc, out, _ = nbdqcow("create", "-f", "qcow2", "-o", "help", cwd=tmp_path)
    assert rc == 0
    for name in ("compat", "cluster_size", "refcount_bits", "lazy_refcounts", "extended_l2",
                 "compression_type", "backing_file", "backing_fmt", "data_file",
                 "data_file_raw", "preallocation", "mapping"):
        assert f"  {name}=<" in out


@pytest.mark.parametrize("prealloc", ["off", "falloc", "full"])
def test_raw_create(tmp_path: Path, prealloc: str) -> None:
    args = ["create", "-f", "raw", "-o", f"preallocation={prealloc}", "x.raw", "1000001"]
    want = run("qemu-img", *args, cwd=tmp_path).stdout
    rc, got, err = nbdqcow(*args, cwd=tmp_path)
    assert rc == 0 and got == want, err
    p = tmp_path / "x.raw"
    assert p.stat().st_size == 1000448
    if prealloc != "off":
        assert p.stat().st_blocks * 512 >= 1000448
    if prealloc == "full":
        assert holes(p, 0, 1000448) == []
    assert p.read_bytes() == bytes(1000448)
    assert_info_same("x.raw", tmp_path)


# --------------------------------------------------------------------------------------
# info / snapshot -l on images that qemu made and changed
# --------------------------------------------------------------------------------------
def set_header_bit(path: Path, offset: int, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        v = struct.unpack(">Q", f.read(8))[0] | (1 << bit)
        f.seek(offset)
        f.write(struct.pack(">Q", v))


def set_bitmap_in_use(path: Path) -> None:
    from nbdqcow.qcow2.header import parse_header
    from nbdqcow.qcow2.layout import EXT_BITMAPS

    data = bytearray(path.read_bytes())
    h = parse_header(bytes(data[: 2 << 20]), len(data))
    ext = h.extension(EXT_BITMAPS)
    assert ext is not None
    doff = struct.unpack_from(">Q", ext, 16)[0]
    flags = struct.unpack_from(">I", data, doff + 12)[0]
    struct.pack_into(">I", data, doff + 12, flags | 1)
    path.write_bytes(bytes(data))


INFO_CASES = {
    "snapshots-bitmaps": [
        ["qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "4M"],
        ["qemu-io", "-c", "write -P 1 0 64k", "img.qcow2"],
        ["qemu-img", "snapshot", "-c", "snap1", "img.qcow2"],
        ["qemu-io", "-c", "write -P 2 0 128k", "img.qcow2"],
        ["qemu-img", "snapshot", "-c", 'é/"\\x tag with a long name', "img.qcow2"],
        ["qemu-img", "bitmap", "--add", "img.qcow2", "bm0"],
        ["qemu-img", "bitmap", "--add", "-g", "128k", "--disable", "img.qcow2", "bm1"],
    ],
    "bitmap-in-use": [
        ["qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "4M"],
        ["qemu-img", "bitmap", "--add", "img.qcow2", "b"],
        ["set-bitmap-in-use"],
    ],
    "v2-snapshot": [
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "img.qcow2", "1M"],
        ["qemu-img", "snapshot", "-c", "old", "img.qcow2"],
    ],
    "dirty-lazy": [
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "img.qcow2",
         "1M"],
        ["set-bit", "72", "0"],
    ],
    "corrupt": [
        ["qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "1M"],
        ["set-bit", "72", "1"],
    ],
    "everything-v3": [
        ["qemu-img", "create", "-q", "-f", "raw", "b.raw", "1M"],
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "b.raw", "-F", "raw", "-o",
         "data_file=d.raw,extended_l2=on,compression_type=zstd,lazy_refcounts=on,"
         "refcount_bits=64,cluster_size=32k", "img.qcow2", "7M"],
    ],
    "absolute-backing": [
        ["qemu-img", "create", "-q", "-f", "qcow2", "b.qcow2", "1M"],
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "{abs}/b.qcow2", "-F", "qcow2",
         "img.qcow2"],
    ],
}


@pytest.mark.parametrize("case", sorted(INFO_CASES))
def test_info_and_snapshot_list(tmp_path: Path, case: str) -> None:
    for step in INFO_CASES[case]:
        if step[0] == "set-bit":
            set_header_bit(tmp_path / "img.qcow2", int(step[1]), int(step[2]))
        elif step[0] == "set-bitmap-in-use":
            set_bitmap_in_use(tmp_path / "img.qcow2")
        else:
            run(*(s.replace("{abs}", str(tmp_path)) for s in step), cwd=tmp_path)
    env = dict(os.environ, TZ="UTC")
    for output in ("json", "human"):
        want = run("qemu-img", "info", "-U", f"--output={output}", "img.qcow2",
                   cwd=tmp_path, env=env).stdout
        with_tz = os.environ.get("TZ")
        os.environ["TZ"] = "UTC"
        try:
            rc, got, err = nbdqcow("info", f"--output={output}", "img.qcow2", cwd=tmp_path)
        finally:
            if with_tz is None:
                del os.environ["TZ"]
            else:
                os.environ["TZ"] = with_tz
        assert rc == 0, err
        assert got == want
    want = run("qemu-img", "snapshot", "-U", "-l", "img.qcow2", cwd=tmp_path, env=env).stdout
    os.environ["TZ"] = "UTC"
    try:
        rc, got, err = nbdqcow("snapshot", "-l", "img.qcow2", cwd=tmp_path)
    finally:
        os.environ.pop("TZ")
    assert rc == 0, err
    assert got == want


@pytest.mark.parametrize("damage", ["snapshots-past-eof", "snapshot-count", "bitmaps-past-eof",
                                    "truncated", "l1-too-small", "size-too-big"])
def test_info_on_broken_tables_fails_cleanly(tmp_path: Path, damage: str) -> None:
    require_tool("qemu-img")
    run("qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "1M", cwd=tmp_path)
    run("qemu-img", "snapshot", "-c", "s", "img.qcow2", cwd=tmp_path)
    run("qemu-img", "bitmap", "--add", "img.qcow2", "b", cwd=tmp_path)
    p = tmp_path / "img.qcow2"
    data = bytearray(p.read_bytes())
    if damage == "snapshots-past-eof":
        struct.pack_into(">Q", data, 64, 1 << 40)
    elif damage == "snapshot-count":
        struct.pack_into(">I", data, 60, 60000)
    elif damage == "bitmaps-past-eof":
        from nbdqcow.qcow2.layout import EXT_BITMAPS

        pos = 112
        while struct.unpack_from(">I", data, pos)[0] != EXT_BITMAPS:
            pos += 8 + (struct.unpack_from(">I", data, pos + 4)[0] + 7) // 8 * 8
        struct.pack_into(">Q", data, pos + 8 + 16, 1 << 40)
    elif damage == "truncated":
        snap_off = struct.unpack_from(">Q", data, 64)[0]
        del data[snap_off + 20 :]
    elif damage == "l1-too-small":
        struct.pack_into(">I", data, 36, 0)
    else:
        struct.pack_into(">Q", data, 24, 1 << 62)
    p.write_bytes(bytes(data))
    if damage in ("l1-too-small", "size-too-big"):  # qemu-img refuses these too
        assert run("qemu-img", "info", "img.qcow2", cwd=tmp_path, check=False).returncode
    for args in (["info", "img.qcow2"], ["info", "--output=json", "img.qcow2"],
                 ["snapshot", "-l", "img.qcow2"]):
        if damage == "bitmaps-past-eof" and args[0] == "snapshot":
            continue
        rc, out, err = nbdqcow(*args, cwd=tmp_path)
        assert rc == 1 and out == "", (args, out)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    # (qemu-img 7.2 is laxer here: it lists zero-filled entries read past the end of
    # the file; nbdqcow refuses such a table with one line)


def test_data_file_path_like_qemu(tmp_path: Path) -> None:
    """qemu-img creates a relative data_file relative to the working directory."""
    for d in ("q", "n"):
        (tmp_path / d / "sub").mkdir(parents=True)
    args = ["create", "-q", "-f", "qcow2", "-o", "data_file=d.raw", "sub/x.qcow2", "1M"]
    run("qemu-img", *args, cwd=tmp_path / "q")
    assert nbdqcow(*args, cwd=tmp_path / "n")[0] == 0
    files = [sorted(str(p.relative_to(tmp_path / d)) for p in (tmp_path / d).rglob("*"))
             for d in ("q", "n")]
    assert files[0] == files[1] == ["d.raw", "sub", "sub/x.qcow2"]
