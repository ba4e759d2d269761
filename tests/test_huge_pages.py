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


def test_a_large_cpu_tensor_is_advised_and_a_small_one_is_not():
    large = torch.empty(_huge_pages.MIN_BYTES * 2, dtype=torch.uint8)
    small = torch.empty(_huge_pages.MIN_BYTES // 64, dtype=torch.uint8)
    assert not advised(middle(large))  # as malloc handed it out
    _huge_pages.advise(large, small, torch.empty(1 << 24, device="meta"))
    assert advised(middle(large))
    assert not advised(middle(small))


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
