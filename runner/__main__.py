import gc
import sys

# The full path imports SQLAlchemy and Alembic: tens of thousands of objects that the cyclic GC
# would scan again and again. Collect nothing until they are loaded (cli re-enables it), so a
# full-path no-op is not slower than plain `alembic upgrade head`; the fast path (runner.fastpath)
# ends the run before the GC would ever have run.
gc.disable()

from runner.cli import main  # noqa: E402

sys.exit(main())
