"""The simulation suite (a package, so its conftest is not the root tests/conftest.py to `from conftest import`)."""
