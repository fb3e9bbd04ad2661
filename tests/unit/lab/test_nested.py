"""The nested lab's pure parts: the initramfs archive, the module closure, L1's command line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from lab.image import GuestImage
from lab.nested import image as nested_image
from lab.nested.image import _module_closure, newc_archive
from lab.nested.kernel import (
    L1_KERNEL_ENV,
    MTTY_IN_L1,
    MttyModule,
    MttyRecipe,
    selected_l1_kernel,
)
from lab.nested.l1 import L1, WIRE_NICS
from lab.nested.qemu import BINARY_FIXES, BinaryFix, QemuRecipe, UnpackedQemu, apply_fix


def _read_newc(blob: bytes) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, data), parsed the way the kernel's initramfs unpacker reads newc."""
    out: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        head = blob[pos : pos + 110].decode()
        assert head.startswith("070701"), head[:6]
        mode, size, namesize = int(head[14:22], 16), int(head[54:62], 16), int(head[94:102], 16)
        name = blob[pos + 110 : pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        data = blob[pos : pos + size]
        pos += size
        pos += -pos % 4
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, data)


def test_newc_archive_keeps_files_modes_and_symlinks(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "busybox").write_bytes(b"\x7fELF-odd-size")
    (tmp_path / "bin" / "sh").symlink_to("busybox")
    (tmp_path / "init").write_text("#!/bin/sh\n")
    (tmp_path / "init").chmod(0o755)
    files = _read_newc(newc_archive(tmp_path))
    assert files["bin/busybox"][1] == b"\x7fELF-odd-size"
    assert files["bin/sh"] == (0o120777, b"busybox")
    assert files["init"][0] == 0o100755
    assert files["bin"][0] & 0o170000 == 0o040000


def test_module_closure_follows_modules_dep(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text(
        "kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/lib/crc16.ko\n"
        "kernel/fs/jbd2/jbd2.ko:\nkernel/lib/crc16.ko:\n"
        "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko\n"
        "kernel/drivers/virtio/virtio.ko:\nkernel/unrelated.ko:\n"
    )
    (tmp_path / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    got = _module_closure(tmp_path, ("virtio_pci", "virtio_blk", "ext4"))
    assert sorted(got) == [
        "kernel/drivers/block/virtio_blk.ko",
        "kernel/drivers/virtio/virtio.ko",
        "kernel/fs/ext4/ext4.ko",
        "kernel/fs/jbd2/jbd2.ko",
        "kernel/lib/crc16.ko",
    ]
    with pytest.raises(RuntimeError, match="nosuch"):
        _module_closure(tmp_path, ("nosuch",))


def test_l1_gets_an_iommu_before_its_devices_and_each_wire_nic_its_own_root_port(
    tmp_path: Path,
) -> None:
    qemu = UnpackedQemu(tmp_path / "qemu")
    argv = L1(GuestImage(tmp_path), tmp_path / "l2.raw", tmp_path, qemu).argv(tmp_path / "o.qcow2")
    # L0's QEMU is the unpacked one, through its own loader, firmware and libraries
    assert argv[:4] == [
        str(tmp_path / "qemu/usr/lib64/ld-linux-x86-64.so.2"),
        "--library-path",
        f"{tmp_path}/qemu/usr/lib/x86_64-linux-gnu:{tmp_path}/qemu/lib/x86_64-linux-gnu",
        str(tmp_path / "qemu/usr/bin/qemu-system-x86_64"),
    ]
    assert argv[4:8] == [
        "-L",
        f"{tmp_path}/qemu/usr/share/qemu",
        "-L",
        f"{tmp_path}/qemu/usr/share/seabios",
    ]
    assert qemu.env()["QEMU_MODULE_DIR"] == f"{tmp_path}/qemu/usr/lib/x86_64-linux-gnu/qemu"
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert devices[0] == "intel-iommu,intremap=on,caching-mode=on"
    assert "intel_iommu=on" in argv[argv.index("-append") + 1]
    for nic in WIRE_NICS:
        (mine,) = [d for d in devices if f"mac={nic.mac}" in d]
        port = mine.split("bus=")[1].split(",")[0]
        assert sum(f"bus={port}," in d for d in devices) == 1
    # the libvirtd forwards listen on loopback only
    netdev = next(
        argv[i + 1]
        for i, a in enumerate(argv)
        if a == "-netdev" and argv[i + 1].startswith("user,")
    )
    assert all(f.startswith("tcp:127.0.0.1:") for f in netdev.split("hostfwd=")[1:])


def test_the_nested_qemu_is_keyed_by_its_recipe() -> None:
    """Another suite, package or mirror unpacks again; the same recipe reuses the cache."""
    base = QemuRecipe(mirror="http://deb.example/debian")
    assert base.key() == QemuRecipe(mirror="http://deb.example/debian").key()
    assert base.key() != QemuRecipe(mirror="http://other.example/debian").key()
    assert base.key() != QemuRecipe(mirror=base.mirror, backports="forky-backports").key()


def test_a_binary_fix_is_part_of_the_cache_key() -> None:
    """A QEMU unpacked without a fix is never taken for one with it."""
    base = QemuRecipe(mirror="http://deb.example/debian")
    assert base.key() != QemuRecipe(mirror=base.mirror, fixes=()).key()


def _disassemble(code: bytes, tmp_path: Path) -> list[str]:
    raw = tmp_path / "code.bin"
    raw.write_bytes(code)
    argv = ["objdump", "-D", "-b", "binary", "-m", "i386:x86-64", "--no-show-raw-insn"]
    out = subprocess.run([*argv, str(raw)], capture_output=True, text=True, check=True).stdout
    return [" ".join(line.split("\t", 1)[1].split()) for line in out.splitlines() if ":\t" in line]


def test_the_svm_fix_drops_only_the_store_of_the_injected_vector(tmp_path: Path) -> None:
    """Decoded, the fix is the same instructions with cs->exception_index's store (at
    -0x3db0 from env in that build) replaced by a NOP of the same length."""
    fix = BINARY_FIXES["svm-intr-injected-once"]
    before, after = _disassemble(fix.before, tmp_path), _disassemble(fix.after, tmp_path)
    assert before == [
        "movzbl %r12b,%esi",
        "mov %r13d,0x3480(%rbx)",
        "mov %esi,-0x3db0(%rbx)",
        "movl $0x0,0x3484(%rbx)",
    ]
    assert after == [before[0], before[1], "nopw 0x0(%rax,%rax,1)", before[3]]
    assert len(fix.after) == len(fix.before)


def test_a_binary_fix_applies_where_its_code_occurs_once(tmp_path: Path) -> None:
    fix = BinaryFix(before=b"\x89\xb3\x50", after=b"\x66\x90\x90", why="test")
    binary = tmp_path / "qemu"
    binary.write_bytes(b"head" + fix.before + b"tail")
    assert apply_fix(binary, fix) == "applied"
    assert binary.read_bytes() == b"head" + fix.after + b"tail"
    assert apply_fix(binary, fix) == "already applied"
    assert binary.read_bytes() == b"head" + fix.after + b"tail"


@pytest.mark.parametrize("times", [0, 2])
def test_a_binary_fix_leaves_another_build_unchanged(tmp_path: Path, times: int) -> None:
    """Code that is not there, or there twice, is another build: nothing is written."""
    fix = BinaryFix(before=b"\x89\xb3\x50", after=b"\x66\x90\x90", why="test")
    binary = tmp_path / "qemu"
    content = b"head" + b"mid".join([fix.before] * times) + b"tail"
    binary.write_bytes(content)
    assert (
        apply_fix(binary, fix)
        == f"not applied: its code occurs {times} times in this build, not once"
    )
    assert binary.read_bytes() == content


def test_bench_vfio_reads_its_json_back_and_names_links_from_the_monitor() -> None:
    from lab.nested.bench import _ifname, load, outages_from, table

    result = load(Path(__file__).parents[3] / "docs" / "benchmarks" / "vfio.json")
    text = table(result)
    assert f"{result.rate} echo requests/s" in text
    assert len(text.splitlines()) == 2 + len(result.moves)
    assert _ifname(" 3: va@vb: <BROADCAST,MULTICAST> mtu 1500") == "va"
    assert _ifname("12: eth3: <NO-CARRIER,BROADCAST>") == "eth3"
    assert _ifname("Deleted 12: eth3: <>") == ""
    traffic = {
        "clock_offset_s": 2.0,
        "outages": [
            {"start_ns": 105_500_000_000, "end_ns": 106_000_000_000, "lost": 100, "phase": "bind"},
            {"start_ns": 90_000_000_000, "end_ns": 90_100_000_000, "lost": 20, "phase": "migrate"},
        ],
    }
    # L1's clock is 2 s ahead: the outage starts 3.5 s after a bind that began at L0's 100 s
    assert outages_from(traffic, 100.0, "bind") == [(3.5, 4.0, 100)]


def _fake_mtty(tmp_path: Path, content: bytes = b"\x7fELF mtty") -> MttyModule:
    root = tmp_path / "mtty-x"
    root.mkdir(parents=True, exist_ok=True)
    (root / "mtty.ko").write_bytes(content)
    kernel = {"release": "6.12.95+deb12-amd64", "version": "6.12.95-1~bpo12+1", "gcc": "gcc-12"}
    (root / "manifest.json").write_text(json.dumps({"kernel": kernel}))
    return MttyModule(root)


def test_l1_kernel_is_6_1_unless_asked_and_a_bad_choice_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(L1_KERNEL_ENV, raising=False)
    assert selected_l1_kernel() == "6.1"
    monkeypatch.setenv(L1_KERNEL_ENV, "6.12")
    assert selected_l1_kernel() == "6.12"
    monkeypatch.setenv(L1_KERNEL_ENV, "6.13")
    with pytest.raises(ValueError, match=r"6\.1, 6\.12"):
        selected_l1_kernel()


def test_the_6_12_l1_pins_the_kernel_mtty_was_built_for_and_loads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = _fake_mtty(tmp_path)
    monkeypatch.setattr(nested_image, "build_mtty", lambda: module)
    default, hybrid = nested_image.l1_recipe("6.1"), nested_image.l1_recipe("6.12")
    assert "linux-image-6.12.95+deb12-amd64=6.12.95-1~bpo12+1" in hybrid.backports
    assert not any(p.startswith("linux-image") for p in default.backports)
    assert hybrid.binary_files == {MTTY_IN_L1: module.ko}
    assert f"insmod {MTTY_IN_L1}" in hybrid.files["/sbin/ptmig-l1-init"]
    assert "mtty" not in default.files["/sbin/ptmig-l1-init"]
    assert not default.binary_files
    # separate caches: building one kernel's image never prunes the other's
    assert nested_image.l1_cache("6.1") != nested_image.l1_cache("6.12")
    with pytest.raises(ValueError):
        nested_image.l1_recipe("5.10")


def test_a_rebuilt_module_gives_a_new_l1_image_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nested_image, "build_mtty", lambda: _fake_mtty(tmp_path, b"one"))
    first = nested_image.l1_recipe("6.12").image_key()
    monkeypatch.setattr(nested_image, "build_mtty", lambda: _fake_mtty(tmp_path, b"two"))
    assert nested_image.l1_recipe("6.12").image_key() != first


def test_the_mtty_build_is_keyed_by_its_recipe() -> None:
    assert MttyRecipe(mirror="a").key() == MttyRecipe(mirror="a").key()
    assert MttyRecipe(mirror="a").key() != MttyRecipe(mirror="b").key()
    assert MttyRecipe(mirror="a").key() != MttyRecipe(mirror="a", backports="trixie").key()
