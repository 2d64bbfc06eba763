"""The ``ofa`` batch's pixel staging (ofa_serving.backend_utils.PixelStaging): pinned host memory on a CUDA
instance, ``np.stack`` elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ofa_serving.backend_utils import PixelStaging


def _rows(n: int, dtype=np.uint8) -> list[np.ndarray]:
    return [np.full((3, 4, 4), i + 1, dtype=dtype) for i in range(n)]


def test_on_the_cpu_rows_are_stacked_as_before_and_nothing_is_allocated_or_recorded():
    staging = PixelStaging("cpu", 16, (3, 4, 4))
    staging.allocate()  # nothing to allocate on a CPU instance
    rows = _rows(3)
    batch = staging.stack(rows)
    assert torch.equal(batch, torch.from_numpy(np.stack(rows)))
    assert not staging.pinned and staging.buffer is None
    staging.sent()  # no CUDA event on a CPU instance: a no-op
    assert not batch.is_pinned()


@pytest.mark.parametrize("max_batch_size", [0, None])
def test_no_pinned_buffer_without_a_max_batch_size(max_batch_size):
    assert not PixelStaging("cuda:0", max_batch_size, (3, 4, 4)).pinned


def test_rows_that_do_not_fit_the_buffer_are_stacked_without_touching_cuda():
    staging = PixelStaging("cuda:0", 2, (3, 4, 4))  # allocates nothing until a batch fits
    assert staging.pinned and staging.buffer is None
    for rows in (_rows(3), _rows(2, np.float32), [np.zeros((3, 5, 5), np.uint8)] * 2):
        batch = staging.stack(rows)
        assert torch.equal(batch, torch.from_numpy(np.stack(rows)))
    assert staging.buffer is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned host memory)")
def test_on_cuda_batches_are_views_of_one_pinned_buffer():
    staging = PixelStaging("cuda:0", 4, (3, 4, 4))
    staging.allocate()
    buffer = staging.buffer
    assert buffer.shape == (4, 3, 4, 4) and buffer.is_pinned()
    first = staging.stack(_rows(2))
    assert first.is_pinned() and first.data_ptr() == staging.buffer.data_ptr()
    on_device = first.to("cuda", non_blocking=True)
    staging.sent()
    second = staging.stack(_rows(3))  # waits for the first copy, then reuses the buffer
    assert second.data_ptr() == first.data_ptr() and staging.buffer is buffer
    assert torch.equal(on_device.cpu(), torch.from_numpy(np.stack(_rows(2))))
    assert torch.equal(second, torch.from_numpy(np.stack(_rows(3))))
