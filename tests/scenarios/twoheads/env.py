"""Never runs: the runner refuses two heads before it loads env.py."""

raise AssertionError("env.py must not run when the scripts have two heads")
