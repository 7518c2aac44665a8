"""pytest fixtures (registered in conftest.py via pytest_plugins)."""
