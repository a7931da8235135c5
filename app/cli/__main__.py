"""`python -m app.cli`: the same as the `moerag` command (tests and benchmarks run it this way)."""

from app.cli import main

main()
