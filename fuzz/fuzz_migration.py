"""atheris harness for the migration reader: `python fuzz/fuzz_migration.py [libFuzzer options] [CORPUS]`."""

from _harness import main

if __name__ == "__main__":
    main("migration")
