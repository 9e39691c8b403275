"""atheris harness for compressed wrappers (gzip, zstd around raw, ELF, LiME, Windows and QEMU
stream seeds; a libvirt save image of the gzip format), the
format inside detected: `python fuzz/fuzz_wrapped.py [libFuzzer options] [CORPUS]`."""

from _harness import main

if __name__ == "__main__":
    main("wrapped")
