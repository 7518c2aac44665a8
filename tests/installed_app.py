"""An application whose migrations ship inside its installed package (`script_location =
fpapp:migrations`, as MLflow's do), installed for real: a wheel built here from
tests/scenarios/fastpath_package (no network, no build backend: a wheel is a zip with a RECORD)
and installed by pip into a throwaway virtualenv, whose site-packages is then the interpreter's
own. The project's environment is reached through a .pth file, as a layered image would."""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from tests.conftest import REPO, assert_no_secrets, runner_env
from tests.result import Result

SCENARIO = REPO / "tests/scenarios/fastpath_package"
VERSION = "1.0"


class InstalledApp:
    """A virtualenv under root with fpapp installed, and root/app/alembic.ini pointing at it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.venv = root / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(self.venv)], check=True,
                       timeout=60)
        self.python = self.venv / "bin" / "python"
        self.site = Path(subprocess.run(
            [str(self.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True, timeout=60).stdout.strip())
        # the project's packages (alembic, SQLAlchemy, psycopg2) from the test environment
        (self.site / "project.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        self.app = root / "app"
        self.app.mkdir()
        shutil.copy(SCENARIO / "alembic.ini", self.app / "alembic.ini")
        self.ini = self.app / "alembic.ini"

    @property
    def versions(self) -> Path:
        """The installed revision files' directory, in site-packages."""
        return self.site / "fpapp" / "migrations" / "versions"

    def install(self, extra: dict[str, str] | None = None) -> None:
        """pip-install fpapp VERSION (again: same version), with extra files (path -> text)."""
        files = {str(p.relative_to(SCENARIO)): p.read_text()
                 for p in sorted((SCENARIO / "fpapp").rglob("*.py"))}
        wheel = _wheel(self.root, "fpapp", VERSION, {**files, **(extra or {})})
        subprocess.run([sys.executable, "-m", "pip", "--python", str(self.python), "install", "-q",
                        "--disable-pip-version-check", "--no-index", "--no-deps", "--force-reinstall",
                        str(wheel)], check=True, capture_output=True, timeout=300)

    def env(self, url: str | None, **extra: str) -> dict[str, str]:
        return runner_env(url, ALEMBIC_CONFIG=str(self.ini), LOG_FORMAT="json", **extra)

    def record(self) -> subprocess.CompletedProcess[str]:
        """`python -m runner.fastpath record --strict`, as an image build runs it."""
        return subprocess.run([str(self.python), "-m", "runner.fastpath", "record", "--strict"],
                              env=self.env(None), cwd=self.app, capture_output=True, text=True,
                              timeout=120)

    def run(self, args: list[str], url: str, **extra: str) -> Result:
        """A runner process of this virtualenv, with an import trace on stderr."""
        proc = subprocess.run([str(self.python), "-m", "runner", *args], cwd=self.app,
                              env=self.env(url, PYTHONPROFILEIMPORTTIME="1", **extra),
                              capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert_no_secrets(proc.stdout, proc.stderr)
        return Result(proc.returncode, proc.stdout, proc.stderr)


def _wheel(dest: Path, name: str, version: str, files: dict[str, str]) -> Path:
    """A pure-Python wheel of files (archive path -> text)."""
    info = f"{name}-{version}.dist-info"
    files = {**files, f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n"}
    path = dest / f"{name}-{version}-py3-none-any.whl"
    rows = []
    with zipfile.ZipFile(path, "w") as archive:
        for arc, text in files.items():
            data = text.encode()
            archive.writestr(arc, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append(f"{arc},sha256={digest},{len(data)}")
        archive.writestr(f"{info}/RECORD", "\n".join([*rows, f"{info}/RECORD,,"]) + "\n")
    return path
