"""``python -m ksm_analyze``."""

from ._entry import main

main()
