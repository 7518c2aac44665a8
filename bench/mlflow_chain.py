"""MLflow's migration chain, for the verify bench only: a real third-party chain (70-odd revisions)
whose first revision alters tables MLflow creates with create_all() before running Alembic.

Downloaded from PyPI into a temporary directory with `pip download --no-deps` (mlflow, and the
protobuf and opentelemetry-proto wheels its generated protocol code needs); nothing of it is
committed and no test uses it. The chain runs with an env.py of ours (one transaction for the
whole chain, as MLflow's own) and VERIFY_SETUP creating MLflow's initial tables. MLflow's other
Python dependencies are not installed: stand-ins (below, as sitecustomize.py) answer for them
and for MLflow's client-side packages, which its models import and its migrations never use.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

WHEELS = ("mlflow", "protobuf", "opentelemetry-proto")

ENV_PY = '''\
from alembic import context
from sqlalchemy import engine_from_config, pool

config = context.config


def run(connection):
    context.configure(connection=connection)  # one transaction for the whole chain, as MLflow's
    with context.begin_transaction():
        context.run_migrations()


if config.attributes.get("connection") is not None:
    run(config.attributes["connection"])
else:
    with engine_from_config(config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.",
                            poolclass=pool.NullPool).connect() as connection:
        run(connection)
'''

SETUP_PY = '''\
from mlflow.store.tracking.dbmodels.initial_models import Base


def setup(connection):
    Base.metadata.create_all(connection)  # what MLflow does before its first Alembic revision
'''

SITECUSTOMIZE = '''\
"""Bench only: stand-ins for MLflow's dependencies that are not installed."""
import importlib.abc
import importlib.machinery
import os
import sys
import types


class _Stub(type):
    """Any attribute, call or iteration of a missing module gives another stand-in."""

    def __getattr__(cls, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Stub(name, (), {})

    def __call__(cls, *args, **kw):
        return cls

    def __iter__(cls):
        return iter(())

    def __getitem__(cls, item):
        return cls

    def __bool__(cls):
        return False

    def __len__(cls):
        return 0

    def __or__(cls, other):
        return cls

    __ror__ = __or__


class _Module(types.ModuleType):
    def __getattr__(self, name):
        if name == "__version__":
            return "99.0.0"
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        value = _Stub(name, (), {})
        setattr(self, name, value)
        return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, prefixes=None):
        self.prefixes = prefixes

    def find_spec(self, name, path, target=None):
        if self.prefixes is not None and not name.startswith(self.prefixes):
            return None
        if self.prefixes is None and name.split(".")[0] in sys.stdlib_module_names:
            return None  # a platform's module (msvcrt, _winapi): missing is the right answer
        return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec):
        module = _Module(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


# MLflow's client side, which its models import and its migrations never use
sys.meta_path.insert(0, _Finder(("mlflow.genai", "mlflow.tracking", "mlflow.tracing", "mlflow.data",
                                 "mlflow.store.artifact", "mlflow.store._unity_catalog", "mlflow.server",
                                 "mlflow.models", "mlflow.telemetry", "mlflow.artifacts")))
sys.meta_path.append(_Finder())  # any other module that is not installed

# mlflow/__init__.py imports the whole client: load the package's modules without running it
_root = os.environ.get("MLFLOW_WHEEL_ROOT")
if _root:
    _package = types.ModuleType("mlflow")
    _package.__path__ = [os.path.join(_root, "mlflow")]
    sys.modules["mlflow"] = _package
'''


def prepare(work: Path) -> tuple[Path, dict[str, str]]:
    """Download and lay out the chain under work; return its alembic.ini and the environment
    verify needs for it (VERIFY_SETUP, PYTHONPATH additions)."""
    wheels, site, chain = work / "wheels", work / "site", work / "chain"
    for d in (wheels, site, chain):
        d.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels),
                    *WHEELS], check=True)
    for wheel in wheels.glob("*.whl"):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    migrations = chain / "migrations"
    shutil.copytree(site / "mlflow" / "store" / "db_migrations", migrations)
    (migrations / "env.py").write_text(ENV_PY)
    (chain / "setup.py").write_text(SETUP_PY)
    ini = chain / "alembic.ini"
    ini.write_text("[alembic]\nscript_location = %(here)s/migrations\n")
    env = {"VERIFY_SETUP": str(chain / "setup.py"), "MLFLOW_WHEEL_ROOT": str(site),
           "PYTHONPATH_PREFIX": str(site), "PYTHONWARNINGS": "ignore"}
    return ini, env


def revisions(ini: Path) -> int:
    return len(list((ini.parent / "migrations" / "versions").glob("*.py")))
