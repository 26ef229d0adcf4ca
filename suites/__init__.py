"""pytest-benchmark suites over stbench cases (`pytest suites/ --benchmark-only`)."""
