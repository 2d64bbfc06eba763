"""Test-only ``ofa`` adapter: the committed one plus a fault hook; it exists only in the tests' repository copy.

``tests/hardening/test_healing.py`` copies the model repository and installs this file as ``ofa/1/model.py``,
with the committed adapter beside it as ``ofa/1/committed_model.py``. Everything is the committed adapter, except
that the engine of the stub process whose PID is written in the file named by ``OFA_TEST_POISON_FILE`` fails
every batch, as a CUDA context poisoned by an illegal memory access would: a process-bound fault that only a
new stub process cures.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "committed_ofa_model", Path(__file__).with_name("committed_model.py")
)
_committed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_committed)


def _poisoned() -> bool:
    path = os.environ.get("OFA_TEST_POISON_FILE", "")
    try:
        return bool(path) and Path(path).read_text().strip() == str(os.getpid())
    except OSError:
        return False


class TritonPythonModel(_committed.TritonPythonModel):
    """The committed adapter whose engine fails while this process is named in ``OFA_TEST_POISON_FILE``."""

    def initialize(self, args):
        super().initialize(args)
        generate = self.captioner.generate_n_best  # what the adapter calls for every engine batch

        def faulty_generate(*a, **kw):
            if _poisoned():
                raise RuntimeError(
                    "CUDA error: an illegal memory access was encountered (simulated by the test)"
                )
            return generate(*a, **kw)

        self.captioner.generate_n_best = faulty_generate
