"""The no-op fast path: `upgrade` and `wait --until-head` answered from facts recorded in the image.

`python -m runner.fastpath record` (an image build step) runs env.py without a database and writes
what a no-op needs next to alembic.ini (facts.py, record.py); at run time `answer()` checks those
facts against the files and environment present and asks the database one question (answer.py).
"""

from runner.fastpath.answer import answer

__all__ = ["answer"]
