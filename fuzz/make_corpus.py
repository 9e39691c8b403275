"""Write the seed corpora of the atheris harnesses: ``fuzz/corpus/<format>/`` and
``fuzz/corpus/<format>.dict`` (libFuzzer dictionary of the format's magic strings).

The seeds are the ones ``tests/test_fuzz.py`` mutates (``FUZZED``), so a format added there
gets a corpus here; nothing binary is committed. Usage: ``python fuzz/make_corpus.py [DIR]``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import test_fuzz

from ksm_analyze.formats import DumpFormat

TOKENS = {
    DumpFormat.RAW: [],
    DumpFormat.ELF: [b"\x7fELF", b"CORE\0", b"QEMU\0", b"VMCOREINFO\0", b"VBCORE\0",
                     b"Xen\0", b"FILE", b"ELIF", b"\x04\x00", b"\x00\x04", b"\xff\xff"],
    DumpFormat.KDUMP: [b"KDUMP   ", b"DISKDUMP", b"makedumpfile\0\0\0\0",
                       b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
                       b"i686\0", b"x86_64\0", b"arm\0", b"\x00\x10\x00\x00", b"\x00\x00\x10\x00"],
    DumpFormat.LIME: [b"EMiL", b"AVML", b"\x01\x00\x00\x00", b"\x02\x00\x00\x00"],
    DumpFormat.AVML: [b"AVML", b"EMiL", b"\xff\x06\x00\x00sNaPpY", b"\x02\x00\x00\x00",
                      b"\x01\x00\x00\x00", b"\xfe", b"\x00\x00\x01\x00"],
    DumpFormat.MIGRATION: [b"QEVM\x00\x00\x00\x03", b"LibvirtQemudSave", b"LibvirtQemudPart",
                           b"\x03ram", b"\x06pc.ram", b"\x0bmapped-ram", b"\x7e",
                           b"\x00\x00\x00\x00\x00\x00\x00\x10",
                           b"\x00\x00\x00\x00\x00\x00\x00\x28",
                           b"\x00\x00\x00\x00\x00\x00\x00\x22"],
    DumpFormat.SNAPSHOT: [b"\x7fELF", b"KSM-ANALYZE\0", b"\x01MSK", b"\x02MSK", b"\x03MSK",
                          b'"processes"', b'"page_size"', b'"runs"', b'"loads"', b'"vmas"',
                          b'"start"', b'"end"', b'"vmflags"', b'"path"', b"1e999", b"[[[[",
                          b"null", b"-1"],
    # microVM snapshots (issue 20): flat memory; state.json; a protobuf manifest
    DumpFormat.FIRECRACKER: [],
    DumpFormat.FIRECRACKER_DIFF: [],
    DumpFormat.CLOUD_HYPERVISOR: [b'"memory-manager"', b'"snapshot_data"', b'"state"',
                                  b'"memory_ranges"', b'"data"', b'"gpa"', b'"length"',
                                  b'\\"', b"18446744073709551615", b"1e999", b"[[[[", b"-1"],
    DumpFormat.OPENVMM: [b"\x08\x01", b"\x20", b"\x30\x80\x20", b"\x1a", b"\x3a\x06x86_64",
                         b"\xff\xff\xff\xff\xff\xff\xff\xff\x7f"],
    DumpFormat.VMRS: [b"\x14\x20\x28\x01", b"\x01\x00\x11\x01", b"savedstate\0", b"RamBlock0\0",
                      b"\xff\xff\xff\xff", b"\xfe\xff\xff\xff", b"\xfd\xff\xff\xff",
                      b"\xfc\xff\xff\xff", b"\x00\x10\x00\x00", b"\x00\x00\x10\x00"],
    # issue 20 (vmwin)
    DumpFormat.VMWARE: [b"\xd2\xbe\xd2\xbe", b"\xd0\xbe\xd0\xbe", b"memory\0", b"Memory",
                        b"regionsCount", b"regionPPN", b"regionPageNum", b"regionSize",
                        b"\x3f", b"\x3e", b"\x04\x00\x00\x00", b"\xff\xff\xff\xff"],
    DumpFormat.WINDOWS: [b"PAGEDU64", b"PAGEDUMP", b"SDMPDUMP", b"FDMPDUMP",
                         b"\x01\x00\x00\x00", b"\x05\x00\x00\x00", b"\x06\x00\x00\x00",
                         b"\xff\xff\xff\xff\xff\xff\xff\xff"],
}


def _dict_entry(token: bytes) -> str:
    return '"' + "".join(f"\\x{b:02x}" for b in token) + '"'


def write_corpus(out: Path) -> None:
    for fmt in test_fuzz.FUZZED:
        where = out / fmt.value
        shutil.rmtree(where, ignore_errors=True)
        where.mkdir(parents=True)
        for seed in test_fuzz.build_seeds(fmt, out / ".build"):
            (where / seed.name).write_bytes(seed.data)
        lines = [f"kw{i}={_dict_entry(t)}" for i, t in enumerate(TOKENS.get(fmt, []))]
        (out / f"{fmt.value}.dict").write_text("".join(f"{line}\n" for line in lines))
    where = out / "wrapped"  # fuzz_wrapped.py: compressed wrappers, the format inside detected
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    for name, data in test_fuzz.wrapped_seeds(out / ".build"):
        (where / name).write_bytes(data)
    (out / "wrapped.dict").write_text("".join(
        f"kw{i}={_dict_entry(t)}\n" for i, t in enumerate(
            [b"\x1f\x8b\x08", b"\x28\xb5\x2f\xfd", b"\x7fELF", b"EMiL", b"\xff\xff\xff\xff",
             b"QEVM\x00\x00\x00\x03", b"LibvirtQemudSave", b"PAGEDU64", b"\x00\x00\x00\x28",
             b"\x00\x00\x00\x22"])))
    seed = test_fuzz.fingerprint_seed()  # the fingerprint file and cache entry of vm-b.raw
    for target, source in (("fpfile", seed.file), ("cache", seed.entry)):
        where = out / target
        shutil.rmtree(where, ignore_errors=True)
        where.mkdir(parents=True)
        (where / "vm-b.raw.ksmfp.parquet").write_bytes(source.read_bytes())
        tokens = [b"PAR1", b"ksm-analyze", b'"inputs"', b'"extents"', b"1e999", b"[[[[", b"-1"]
        (out / f"{target}.dict").write_text(
            "".join(f"kw{i}={_dict_entry(t)}\n" for i, t in enumerate(tokens)))
        print(f"{where}: {len(list(where.iterdir()))} seeds")
    shutil.rmtree(out / ".build", ignore_errors=True)


if __name__ == "__main__":
    write_corpus(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "fuzz" / "corpus")
