"""Fresh large CPU outputs are advised transparent huge pages (sj_temporal_fusion._huge_pages),
read back from the kernel's own record of each mapping (/proc/self/smaps' VmFlags: 'hg')."""
import sys

import pytest
import torch

from sj_temporal_fusion import _huge_pages, ops
from sj_temporal_fusion.functional import parameter_tensor
from sj_temporal_fusion.neurons import REGISTRY
from sj_temporal_fusion.surrogate import DEFAULT_ID

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise hints are Linux's")


def advised(address: int) -> bool:
    """Whether the mapping holding ``address`` carries MADV_HUGEPAGE ('hg')."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(a, 16) for a in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                return "hg" in line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def middle(t: torch.Tensor) -> int:
    return t.data_ptr() + t.numel() * t.element_size() // 2


def test_a_large_cpu_tensor_is_advised():
    large = torch.empty(_huge_pages.MIN_BYTES * 2, dtype=torch.uint8)
    _huge_pages.advise(large)
    assert advised(middle(large))


def test_only_whole_huge_pages_of_large_cpu_tensors_are_advised(monkeypatch):
    """(Whether a small tensor's mapping carries the flag says nothing: glibc may hand out memory
    that an earlier large tensor's advice covered.)"""
    calls = []
    monkeypatch.setattr(_huge_pages, "_madvise", lambda: lambda *call: calls.append(call))
    large = torch.empty(_huge_pages.MIN_BYTES * 2 + 12345, dtype=torch.uint8)
    _huge_pages.advise(large, torch.empty(_huge_pages.MIN_BYTES // 64, dtype=torch.uint8),
                       torch.empty(1 << 24, device="meta"))
    [(start, length, advice)] = calls
    assert advice == _huge_pages.MADV_HUGEPAGE and start % _huge_pages.HUGE_PAGE == 0 == length % _huge_pages.HUGE_PAGE
    assert large.data_ptr() <= start < start + length <= large.data_ptr() + large.numel()
    assert length >= large.numel() - 2 * _huge_pages.HUGE_PAGE


def test_the_forward_and_backward_outputs_are_advised():
    m = REGISTRY["lif"]
    params, _ = parameter_tensor(m.param_values(dict(m.defaults)), torch.float32, torch.device("cpu"))
    form = m.form(dict(m.defaults))
    x = torch.rand(8, _huge_pages.MIN_BYTES // 2)  # 4 bytes x 8 steps: 4 x MIN_BYTES
    spike, _, _, v_seq, checkpoints = ops.neuron_forward(
        x, torch.zeros(x.shape[1:]), torch.empty(0), params, "lif", m.forward_form(dict(m.defaults)), form,
        DEFAULT_ID, 4.0, 0.0, 0, True, True)
    assert advised(middle(spike)) and advised(middle(v_seq))
    grad_x = ops.neuron_backward(torch.ones_like(x[0]), None, None, None, x, checkpoints, params, "lif", form,
                                 DEFAULT_ID, 4.0, 0.0, 0, True, False)[0]
    assert advised(middle(grad_x))
