import gc
import sys

# Startup imports SQLAlchemy and Alembic: tens of thousands of objects that the cyclic GC would
# scan again and again. Collect nothing until they are loaded (cli re-enables it), so a no-op
# run is not slower than plain `alembic upgrade head`.
gc.disable()

from runner.cli import main  # noqa: E402

sys.exit(main())
