"""atheris harness for the elf reader: `python fuzz/fuzz_elf.py [libFuzzer options] [CORPUS]`."""

from _harness import main

if __name__ == "__main__":
    main("elf")
