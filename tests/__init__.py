"""The test suite, a package so that tests import their helpers as `tests.helpers` and
`tests.reference` (pytest's `pythonpath = ["."]` puts the repository root on sys.path)."""
