"""Naming L2's module addresses in a stall report: L2's module sections read at boot,
the module's symbols from L1's copy of its ``.ko`` (a minimal ELF64 reader)."""

from __future__ import annotations

import lzma
import struct
from pathlib import Path

import pytest

from lab.nested import inside
from lab.nested.inside import elf_section_symbols, module_symbols, symbolize
from lab.nested.vlab import module_sections, module_text_words


def relocatable(sections: dict[str, list[tuple[int, str, int]]]) -> bytes:
    """A little-endian ELF64 relocatable object whose *sections* (name -> [(offset, name,
    st_info)]) each hold their symbols; laid out as ld would read it, not as gcc writes it
    (the reader looks only at the section headers, the symbol table and string tables)."""
    names = [".null", *sections, ".symtab", ".strtab", ".shstrtab"]
    shstr = b"\0" + b"".join(n.encode() + b"\0" for n in names[1:])
    name_off = {n: shstr.index(b"\0" + n.encode() + b"\0") + 1 for n in names[1:]}
    strtab, symtab = b"\0", bytes(24)  # symbol 0 is the null symbol
    for index, symbols in enumerate(sections.values(), start=1):
        for offset, sym, info in symbols:
            symtab += struct.pack("<IBBHQQ", len(strtab), info, 0, index, offset, 4)
            strtab += sym.encode() + b"\0"
    body = symtab + strtab + shstr
    data_at = 64
    headers = [bytes(64)]
    for name in sections:
        headers.append(struct.pack("<IIQQQQIIQQ", name_off[name], 1, 6, 0, data_at, 0, 0, 0, 16, 0))
    strtab_index = len(headers) + 1
    headers.append(
        struct.pack(
            "<IIQQQQIIQQ",
            name_off[".symtab"],
            2,
            0,
            0,
            data_at,
            len(symtab),
            strtab_index,
            1,
            8,
            24,
        )
    )
    headers.append(
        struct.pack(
            "<IIQQQQIIQQ",
            name_off[".strtab"],
            3,
            0,
            0,
            data_at + len(symtab),
            len(strtab),
            0,
            0,
            1,
            0,
        )
    )
    shstr_at = data_at + len(symtab) + len(strtab)
    headers.append(
        struct.pack("<IIQQQQIIQQ", name_off[".shstrtab"], 3, 0, 0, shstr_at, len(shstr), 0, 0, 1, 0)
    )
    shoff = data_at + len(body)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, len(headers), len(headers) - 1
    )
    return header + body + b"".join(headers)


FUNC, NOTYPE, OBJECT = 0x12, 0x10, 0x11

IGBVF = relocatable(
    {
        ".text": [
            (0x40, "igbvf_intr_msix_rx", FUNC),
            (0x0, "igbvf_poll", FUNC),
            (0x90, "x", OBJECT),
        ],
        ".text.unlikely": [(0x0, "igbvf_reset.cold", FUNC)],
    }
)


def test_a_modules_functions_are_read_by_section_and_sorted() -> None:
    assert elf_section_symbols(IGBVF, ".text") == [
        (0x0, "igbvf_poll"),
        (0x40, "igbvf_intr_msix_rx"),
    ]
    assert elf_section_symbols(IGBVF, ".text.unlikely") == [(0x0, "igbvf_reset.cold")]
    assert elf_section_symbols(IGBVF, ".init.text") == []


def test_what_is_not_an_elf64_object_is_refused() -> None:
    with pytest.raises(ValueError, match="ELF64"):
        elf_section_symbols(b"\x7fELF\x01\x01" + bytes(60), ".text")


def test_l1s_copy_of_a_module_is_found_compressed_or_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = tmp_path / "lib/modules/6.12.0-test/kernel/drivers/net"
    release.mkdir(parents=True)
    (release / "igbvf.ko.xz").write_bytes(lzma.compress(IGBVF))
    (release / "virtio_net.ko").write_bytes(IGBVF)
    monkeypatch.setattr(inside, "Path", lambda p: tmp_path / p.lstrip("/"))
    module_symbols.cache_clear()  # read once per process: nothing from another test
    assert module_symbols("igbvf", ".text", "6.12.0-test")[0] == (0x0, "igbvf_poll")
    assert module_symbols("virtio_net", ".text", "6.12.0-test")[1] == (0x40, "igbvf_intr_msix_rx")
    assert module_symbols("bonding", ".text", "6.12.0-test") == []
    (release / "igbvf.ko.xz").unlink()  # a report's second address in it: not read again
    assert module_symbols("igbvf", ".text", "6.12.0-test")[0] == (0x0, "igbvf_poll")


def test_module_sections_from_sysfs_leave_out_hidden_bases() -> None:
    out = (
        "/sys/module/igbvf/sections/.text:0xffffffffc0b55000\n"
        "/sys/module/igbvf/sections/.text.unlikely:0xffffffffc0b5e000\n"
        "/sys/module/bonding/sections/.text:0x0000000000000000\n"
        "some console noise\n"
    )
    assert module_sections(out) == {
        "igbvf/.text": "0xffffffffc0b55000",
        "igbvf/.text.unlikely": "0xffffffffc0b5e000",
    }


def test_module_words_of_a_dump_are_found_once_each_and_kernel_text_is_not() -> None:
    dump = (
        "ffffd4d100003d10: 0xffffffffc0b5a13c 0xffffffffab4c2b1e\n"
        "ffffd4d100003d20: 0xffffffffc0b5a13c 0xffff8e0217023138\n"
    )
    assert module_text_words(dump) == ["ffffffffc0b5a13c"]


def test_an_address_in_a_module_is_named_by_its_section_and_symbol() -> None:
    modules = {"igbvf/.text": 0xFFFFFFFFC0B55000, "bonding/.text": 0xFFFFFFFFC0A00000}
    symbols = {("igbvf", ".text"): elf_section_symbols(IGBVF, ".text")}

    def symbols_of(module: str, section: str) -> list[tuple[int, str]]:
        return symbols.get((module, section), [])

    named = symbolize(
        "ffffffffaee00000 T _text\n",
        0xFFFFFFFFAB400000,
        [0xFFFFFFFFC0B55044, 0xFFFFFFFFC0A00010, 0xFFFFFFFFC0900000],
        modules,
        symbols_of,
    )
    assert named == [
        "ffffffffc0b55044 igbvf_intr_msix_rx+0x4 [igbvf .text+0x44]",
        "ffffffffc0a00010 [bonding .text+0x10]",  # L1 has no symbols for it: the offset
        "ffffffffc0900000 ?",  # below every module
    ]
