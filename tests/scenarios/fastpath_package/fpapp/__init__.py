"""An application that pip-installs its own migrations (tests/scenarios/fastpath_package)."""
