"""atheris harness for the openvmm reader: `python fuzz/fuzz_openvmm.py [libFuzzer options] [CORPUS]`."""

from _harness import main

if __name__ == "__main__":
    main("openvmm")
