"""atheris harness for fingerprint files (scan FILE.ksmfp.parquet): `python fuzz/fuzz_fpfile.py [libFuzzer options] [CORPUS]`."""

from _harness import main_fingerprints

if __name__ == "__main__":
    main_fingerprints("fpfile")
